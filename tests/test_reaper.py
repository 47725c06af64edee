"""The reaper's timers: registration, error handling and log levels."""

from __future__ import annotations

import logging
import threading

import pytest

from vastai_pool import reaper
from vastai_pool.reaper import Timers, start_timers


def noop() -> None:
    pass


def test_all_timers_run_one_at_a_time() -> None:
    scheduler = start_timers(
        Timers(
            reap_idle=noop,
            heartbeat=noop,
            idle_timeout=300.0,
            budget=noop,
            recover_stale_runs=noop,
            reconcile=noop,
        )
    )
    try:
        jobs = {job.id: job for job in scheduler.get_jobs()}
    finally:
        scheduler.shutdown(wait=True)
    assert set(jobs) == {
        "reap-idle",
        "run-heartbeat",
        "budget",
        "recover-stale-runs",
        "reconcile",
    }
    for job in jobs.values():
        assert job.max_instances == 1, job.id
        assert job.coalesce, job.id
        assert job.next_run_time is not None, f"{job.id} is paused"


def test_optional_timers_left_out() -> None:
    scheduler = start_timers(Timers(reap_idle=noop, heartbeat=noop, idle_timeout=60))
    try:
        names = {job.id for job in scheduler.get_jobs()}
    finally:
        scheduler.shutdown(wait=True)
    assert names == {"reap-idle", "run-heartbeat"}


def test_apscheduler_info_turned_down() -> None:
    assert logging.getLogger("apscheduler").getEffectiveLevel() >= logging.WARNING


def test_failing_timer_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    outcomes = iter([ValueError("api down")] * 3 + [None] + [ValueError("api down")])

    def flaky() -> None:
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome

    timer = reaper._Guarded("budget", flaky)
    with caplog.at_level(logging.DEBUG, logger="vastai_pool.reaper"):
        for _ in range(5):
            timer()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "budget timer failed" in warnings[0].getMessage()
    assert "api down" in warnings[0].getMessage()
    recovered = [r for r in caplog.records if "succeeded again" in r.getMessage()]
    assert len(recovered) == 1


def test_failing_timer_keeps_its_schedule() -> None:
    calls = 0
    enough = threading.Event()

    def broken() -> None:
        nonlocal calls
        calls += 1
        if calls >= 3:
            enough.set()
        raise RuntimeError("timer bug")

    scheduler = start_timers(
        Timers(
            reap_idle=noop,
            heartbeat=noop,
            idle_timeout=300.0,
            budget=broken,
            budget_interval=0.05,
        )
    )
    try:
        assert enough.wait(timeout=30)
        assert scheduler.running
    finally:
        scheduler.shutdown(wait=True)


def test_budget_interval_bounds() -> None:
    assert reaper.budget_check_seconds(0.05) == 1.0
    assert reaper.budget_check_seconds(2.0) == 4.0
    assert reaper.budget_check_seconds(60.0) == 5.0


def test_stale_run_timer_runs_at_start() -> None:
    ran = threading.Event()
    scheduler = start_timers(
        Timers(
            reap_idle=noop,
            heartbeat=noop,
            idle_timeout=300.0,
            recover_stale_runs=ran.set,
        )
    )
    try:
        assert ran.wait(timeout=30)
    finally:
        scheduler.shutdown(wait=True)
