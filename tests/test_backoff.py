"""Backoff of the instance list on 429 and 5xx replies, against a sandbox
whose fault hooks send bursts of them on the v1 list route."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.pool_helpers import (
    booted,
    create,
    environment,
    run,
    snakemake_command,
    write_workflow,
)
from vastai_pool import store as pool_store
from vastai_pool.api import Backoff, VastApi
from vastai_pool.errors import ApiError
from vastai_pool.sandbox.faults import FaultHooks, Reply

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

LIST_ROUTE = "/api/v1/instances"
SHOW_ROUTE = re.compile(r"/api/v0/instances/\d+")
# What Vast.ai sends when rate limiting: plain text, no Retry-After.
TOO_FREQUENT = Reply(429, "API requests too frequent endpoint threshold=1")
UNAVAILABLE = Reply(503, {"success": False, "error": "service_unavailable"})


class ListBursts(FaultHooks):
    """Fault hooks failing the list route with ``burst`` replies (429 text and
    503 in turn), then letting ``every`` calls through, then failing again.
    With ``show``, the show-instance route fails the same way."""

    def __init__(
        self, burst: int, *, every: int = 1_000_000, show: bool = False
    ) -> None:
        self.burst = burst
        self.every = every
        self.show = show
        self.calls = 0
        self.failed = 0
        self._lock = threading.Lock()

    def http_reply(self, method: str, path: str) -> Reply | None:
        path = path.rstrip("/")
        listed = path == LIST_ROUTE
        shown = self.show and SHOW_ROUTE.fullmatch(path) is not None
        if method != "GET" or not (listed or shown):
            return None
        with self._lock:
            position = self.calls % (self.burst + self.every)
            self.calls += 1
            if position >= self.burst:
                return None
            self.failed += 1
            return TOO_FREQUENT if self.failed % 2 else UNAVAILABLE


class FakeClock:
    """Stands in for ``time.sleep`` and ``time.monotonic`` of a VastApi."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


def clocked_api(sandbox: Sandbox, backoff: Backoff | None = None) -> tuple:
    api = VastApi(sandbox.url, sandbox.api_key)
    clock = FakeClock()
    api._sleep = clock.sleep
    api._monotonic = clock.monotonic
    if backoff is not None:
        api.list_backoff = backoff
    return api, clock


def test_list_survives_burst_of_429_text_and_503(sandbox: Sandbox) -> None:
    ids = {create(sandbox, f"vastai-pool-b-{n}") for n in range(3)}
    faults = ListBursts(4)
    sandbox.faults = faults
    api, clock = clocked_api(sandbox)

    listed = api.list_instances()

    assert {instance.id for instance in listed} == ids
    assert faults.failed == 4
    assert len(clock.pauses) == 4
    assert all(0 <= pause <= api.list_backoff.cap for pause in clock.pauses)


def test_list_pages_through_every_page(sandbox: Sandbox) -> None:
    # The v1 list gives at most 25 rows a page.
    client_ids = {create(sandbox, f"vastai-pool-p-{n}") for n in range(27)}
    api, _ = clocked_api(sandbox)
    assert {instance.id for instance in api.list_instances()} == client_ids


def test_list_gives_up_after_bounded_attempts(sandbox: Sandbox) -> None:
    sandbox.faults = ListBursts(1_000)
    api, clock = clocked_api(sandbox, Backoff(attempts=5, first=0.1, cap=1, total=60))

    with pytest.raises(ApiError, match="gave up after 5 attempts") as caught:
        api.list_instances()

    assert caught.value.status in (429, 503)
    assert len(clock.pauses) == 4


def test_list_gives_up_when_time_runs_out(sandbox: Sandbox) -> None:
    sandbox.faults = ListBursts(1_000)
    backoff = Backoff(attempts=1_000, first=1.0, cap=1.0, total=10.0)
    api, clock = clocked_api(sandbox, backoff)
    # Every pause lasts the whole first step, so time, not attempts, ends it.
    api.list_backoff = backoff
    with pytest.raises(ApiError, match="gave up"):
        api.list_instances()
    assert clock.now <= backoff.total


def test_list_obeys_numeric_retry_after(sandbox: Sandbox) -> None:
    class RetryAfter(FaultHooks):
        sent = False

        def http_reply(self, method: str, path: str) -> Reply | None:
            if path.rstrip("/") != LIST_ROUTE or self.sent:
                return None
            self.sent = True
            return Reply(429, "slow down", headers={"Retry-After": "3"})

    sandbox.faults = RetryAfter()
    api, clock = clocked_api(sandbox)
    assert api.list_instances() == []
    assert clock.pauses == [3.0]


def test_list_does_not_retry_a_bad_key(sandbox: Sandbox) -> None:
    api = VastApi(sandbox.url, "not-the-key")
    clock = FakeClock()
    api._sleep = clock.sleep
    with pytest.raises(ApiError) as caught:
        api.list_instances()
    assert caught.value.status == 401
    assert clock.pauses == []


def cli(sandbox: Sandbox, home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vastai_pool.cli", *args]
        + ["--api-url", sandbox.url, "--api-key", sandbox.api_key],
        env=environment(home),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ls_and_gc_survive_list_bursts(sandbox: Sandbox, tmp_path: Path) -> None:
    db_path = tmp_path / "pool.sqlite"
    account = pool_store.account_id(sandbox.url, sandbox.api_key)
    with pool_store.Store(db_path) as store:
        run_id = pool_store.start_run(
            store, account=account, workdir="/w", budget_usd=None, linger_seconds=0
        )
        record = booted(
            store,
            run_id,
            account,
            "vastai-pool-x-1",
            create(sandbox, "vastai-pool-x-1"),
        )
        pool_store.end_run(store, run_id)

    sandbox.faults = ListBursts(3, every=1)
    listed = cli(sandbox, tmp_path, "ls", "--db", str(db_path))
    assert listed.returncode == 0, listed.stderr
    assert "database only" not in listed.stderr
    assert str(record.vast_id) in listed.stdout

    cleaned = cli(sandbox, tmp_path, "gc", "--db", str(db_path))
    assert cleaned.returncode == 0, cleaned.stderr
    assert f"destroyed instance {record.vast_id}" in cleaned.stdout
    assert sandbox.ledger()["alive"] == []


def test_run_completes_through_status_bursts(sandbox: Sandbox, tmp_path: Path) -> None:
    # Status rounds use the list or the show route: both get bursts.
    faults = ListBursts(3, every=4, show=True)
    sandbox.faults = faults
    pool_db = tmp_path / "pool.sqlite"
    write_workflow(tmp_path / "wf", jobs=2, command="sleep 0.2")

    run(snakemake_command(sandbox, pool_db, jobs=2), tmp_path / "wf", tmp_path / "h")

    assert len(list((tmp_path / "wf" / "out").iterdir())) == 2
    assert faults.failed >= 3
    assert sandbox.ledger()["alive"] == []
