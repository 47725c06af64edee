"""The run's budget against a sandbox marketplace: refused rentals, stopped jobs.

Each test ends with the sandbox ledger's ``alive`` empty and its bill within
the budget plus one budget timer interval of the instances that ran.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vastai_pool import store as db
from vastai_pool.api import VastApi
from vastai_pool.models import DestroyReason, InstanceState
from vastai_pool.pool import JobSpec, JobState, JobStatus, Pool, PoolConfig
from vastai_pool.reaper import budget_check_seconds
from vastai_pool.requirements import Requirements

IMAGE = "python:3.11-slim"
POLL_INTERVAL = 0.05
# Seconds of billing the budget may be overrun by: one budget timer interval.
TIMER_INTERVAL = budget_check_seconds(POLL_INTERVAL)


@pytest.fixture
def market() -> Iterator[object]:
    from vastai_pool.sandbox import Sandbox

    sandbox = Sandbox(boot_seconds=0.2)
    sandbox.start()
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture
def make_pool(market, tmp_path: Path) -> Iterator[Callable[..., Pool]]:
    opened: list[Pool] = []
    workdir = tmp_path / "workflow"
    workdir.mkdir()

    def make(**overrides: object) -> Pool:
        settings: dict = dict(
            api_url=market.url,
            api_key=market.api_key,
            db_path=tmp_path / "pool.sqlite",
            workdir=workdir,
            logs_dir=tmp_path / "logs",
            key_dir=tmp_path / "keys",
            boot_timeout=30.0,
            poll_interval=POLL_INTERVAL,
        )
        settings.update(overrides)
        pool = Pool(PoolConfig(**settings))
        pool.open()
        opened.append(pool)
        return pool

    yield make
    for pool in opened:
        pool.close(interrupted=True)
    assert market.ledger()["alive"] == []


def requirements(model: str) -> Requirements:
    return Requirements(
        image=IMAGE, disk_gb=10, num_gpus=1, gpu_names=(model,), datacenter_only=False
    )


def job(
    job_id: int, command: str, model: str, runtime_minutes: float | None = None
) -> JobSpec:
    return JobSpec(
        rule="train",
        job_id=job_id,
        attempt=1,
        requirements=requirements(model),
        command=command,
        inputs=(),
        outputs=(),
        logs=(),
        source_archive=None,
        source_checksum=None,
        runtime_minutes=runtime_minutes,
    )


def cheapest_price(market, model: str) -> float:
    """Return the lowest ``dph_total`` of a one-GPU offer of ``model``, in $/h."""
    wanted = requirements(model)
    offers = VastApi(market.url, market.api_key).search_offers(
        wanted.offer_query(), order=wanted.order, disk_gb=wanted.disk_gb
    )
    return min(offer.hardware.dph_total for offer in offers)


def finish(pool: Pool, handle: str, timeout: float = 120.0) -> JobStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = pool.status(handle)
        if status.state in (JobState.SUCCEEDED, JobState.FAILED):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {handle} did not finish: {pool.status(handle)}")


def wait_for_destroyed(pool: Pool, timeout: float = 60.0) -> list[db.InstanceRecord]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = db.list_instances(pool.store, include_destroyed=True)
        if all(r.state is InstanceState.DESTROYED for r in records):
            return records
        time.sleep(0.05)
    raise AssertionError(f"instances still alive: {db.list_instances(pool.store)}")


def test_budget_refuses_rental_that_would_cross(make_pool, market) -> None:
    cheap = cheapest_price(market, "RTX_3090")
    # Ten minutes of the cheapest RTX 3090: one five-minute job fits, five
    # minutes of an H100 (at least $1.70/h) do not.
    budget = cheap * 10 / 60
    pool = make_pool(budget=budget)

    first = finish(pool, pool.submit(job(1, "true", "RTX_3090", runtime_minutes=5)))
    assert first.state is JobState.SUCCEEDED, first.message

    refused = finish(pool, pool.submit(job(2, "true", "H100_SXM", runtime_minutes=5)))
    assert refused.state is JobState.FAILED
    assert f"the budget of ${budget:.6f} would be exceeded by $" in refused.message
    assert "committed by running jobs" in refused.message
    assert "for renting offer" in refused.message
    assert "--vastai-budget" in refused.message

    # Once a rental is refused, nothing more is placed, not even on a warm
    # instance, and the run's idle instances are destroyed.
    later = finish(pool, pool.submit(job(3, "true", "RTX_3090", runtime_minutes=5)))
    assert later.state is JobState.FAILED
    assert "the budget of $" in later.message
    (record,) = wait_for_destroyed(pool)
    assert record.destroy_reason is DestroyReason.BUDGET

    pool.close()
    ledger = market.ledger()
    assert ledger["rented"] == 1
    assert ledger["alive"] == []
    assert ledger["billed_usd"] <= budget + cheap * TIMER_INTERVAL / 3600


def test_budget_stops_job_that_would_overspend(make_pool, market) -> None:
    cheap = cheapest_price(market, "RTX_3090")
    # Eight seconds of the cheapest RTX 3090; the job would run for minutes.
    budget = cheap * 8 / 3600
    pool = make_pool(budget=budget)

    stopped = finish(pool, pool.submit(job(1, "sleep 300", "RTX_3090")))
    assert stopped.state is JobState.FAILED
    assert f"the budget of ${budget:.6f} would be" in stopped.message
    assert "billed by the running instances in the next" in stopped.message
    (record,) = wait_for_destroyed(pool)
    assert record.destroy_reason is DestroyReason.BUDGET

    unplaced = finish(pool, pool.submit(job(2, "true", "RTX_3090")))
    assert unplaced.state is JobState.FAILED
    assert "was not placed: the budget of $" in unplaced.message

    pool.close()
    ledger = market.ledger()
    assert ledger["rented"] == 1
    assert ledger["alive"] == []
    assert ledger["billed_usd"] <= budget + cheap * TIMER_INTERVAL / 3600


def test_no_budget_runs_no_budget_timer(make_pool) -> None:
    pool = make_pool()
    assert pool._scheduler is not None
    names = {scheduled.id for scheduled in pool._scheduler.get_jobs()}
    assert "budget" not in names
    assert {"reap-idle", "run-heartbeat"} <= names
