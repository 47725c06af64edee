"""Lingering instances: adoption by a later run, and the detached
``vastai-pool reap`` process that destroys them at their deadline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tests.pool_helpers import (
    booted,
    create,
    environment,
    query,
    run,
    snakemake_command,
    wait_for,
    write_workflow,
)
from vastai_pool import reap
from vastai_pool import store as pool_store
from vastai_pool.models import InstanceState

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

# Long enough for a second Snakemake process to start inside it on a busy
# machine. The test waits for the reaper, never for a fixed time.
LINGER_SECONDS = 15


def lingering_pool(sandbox: Sandbox, db_path: Path, seconds: float) -> list[int]:
    """Two idle instances of an ended run, lingering for ``seconds``."""
    account = pool_store.account_id(sandbox.url, sandbox.api_key)
    ids = []
    with pool_store.Store(db_path) as store:
        run_id = pool_store.start_run(
            store, account=account, workdir="/w", budget_usd=None, linger_seconds=1
        )
        for n in (1, 2):
            label = f"vastai-pool-{run_id[:8]}-{n}"
            record = booted(store, run_id, account, label, create(sandbox, label))
            pool_store.set_linger(
                store, record, store.clock() + seconds, why="test linger"
            )
            ids.append(record.vast_id)
        pool_store.end_run(store, run_id)
    return ids


def reaper_gone(db_path: Path, sandbox: Sandbox) -> bool:
    account = pool_store.account_id(sandbox.url, sandbox.api_key)
    return not reap.reaper_running(db_path, account)


def test_reaper_destroys_lingering_instances_at_deadline_and_exits(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    db_path = tmp_path / "pool.sqlite"
    ids = lingering_pool(sandbox, db_path, seconds=1.5)

    reap.spawn_reaper(db_path, sandbox.url, sandbox.api_key)

    account = pool_store.account_id(sandbox.url, sandbox.api_key)
    lock = reap.lock_path(db_path, account)
    pid = int(wait_for(lambda: lock.exists() and lock.read_text().strip(), what="pid"))
    # The key reaches the reaper through its environment only.
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert sandbox.api_key not in cmdline
    assert set(ids) <= set(sandbox.ledger()["alive"])
    wait_for(lambda: sandbox.ledger()["alive"] == [], what="lingering destroyed")
    wait_for(lambda: reaper_gone(db_path, sandbox), what="the reaper to exit")
    with pool_store.Store(db_path) as store:
        assert pool_store.list_instances(store) == []
    log = reap.log_path(db_path).read_text()
    assert "linger deadline" in log or "lingering instance" in log
    assert sandbox.api_key not in log


def test_second_reaper_leaves_the_pool_to_the_first(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    db_path = tmp_path / "pool.sqlite"
    ids = lingering_pool(sandbox, db_path, seconds=0.5)
    account = pool_store.account_id(sandbox.url, sandbox.api_key)
    with reap._held(reap.lock_path(db_path, account)) as handle:
        assert handle is not None
        result = subprocess.run(
            [sys.executable, "-m", "vastai_pool.cli", "reap", "--foreground"]
            + ["--db", str(db_path), "--api-url", sandbox.url],
            env=environment(tmp_path) | {"VAST_API_KEY": sandbox.api_key},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        # It returned without destroying what the lock holder owns.
        assert set(ids) <= set(sandbox.ledger()["alive"])
    result = subprocess.run(
        [sys.executable, "-m", "vastai_pool.cli", "reap", "--foreground"]
        + ["--db", str(db_path), "--api-url", sandbox.url],
        env=environment(tmp_path) | {"VAST_API_KEY": sandbox.api_key},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert sandbox.ledger()["alive"] == []


def test_adopted_instance_is_not_reaped(sandbox: Sandbox, tmp_path: Path) -> None:
    db_path = tmp_path / "pool.sqlite"
    account = pool_store.account_id(sandbox.url, sandbox.api_key)
    first, second = lingering_pool(sandbox, db_path, seconds=1.0)
    with pool_store.Store(db_path) as store:
        adopter = pool_store.start_run(
            store, account=account, workdir="/w", budget_usd=None, linger_seconds=0
        )
        (record,) = [r for r in pool_store.list_instances(store) if r.vast_id == first]
        with store.sessions.write() as session:
            row = session.get(pool_store.Instance, record.pk)
            row.linger_until = None
            row.run_id = adopter
        reaper = reap.Reaper(store, reap.VastApi(sandbox.url, sandbox.api_key), account)
        reaper.start()
        try:
            assert reaper.done.wait(timeout=60)
        finally:
            reaper.stop()
        assert set(sandbox.ledger()["alive"]) == {first}
        states = {r.vast_id: r.state for r in pool_store.list_instances(store)}
        assert states == {first: InstanceState.IDLE}
        assert second not in sandbox.ledger()["alive"]


def test_linger_run_is_adopted_by_next_run_then_reaped(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    pool_db = tmp_path / "pool.sqlite"
    linger = ["--vastai-linger", str(LINGER_SECONDS)]
    command = snakemake_command(sandbox, pool_db, jobs=2, extra=linger)
    for name in ("first", "second"):
        write_workflow(tmp_path / name, jobs=2, command="sleep 1")

    run(command, tmp_path / "first", tmp_path / "home1")
    rented = sandbox.ledger()["rented"]
    lingering = query(
        pool_db, "SELECT vast_id FROM instances WHERE linger_until IS NOT NULL"
    )
    assert rented >= 1
    assert len(lingering) == len(sandbox.ledger()["alive"]) >= 1

    run(command, tmp_path / "second", tmp_path / "home2")
    assert sandbox.ledger()["rented"] == rented
    warm = query(
        pool_db,
        "SELECT COUNT(*) FROM leases JOIN runs ON runs.id = leases.run_id "
        "WHERE leases.warm GROUP BY runs.id ORDER BY runs.started_at",
    )
    assert warm[-1][0] >= 1

    # Nothing but the reaper that Pool.close started destroys them now.
    wait_for(
        lambda: sandbox.ledger()["alive"] == [],
        what="the reaper to destroy the lingering instances",
        timeout=LINGER_SECONDS + 60,
    )
    wait_for(lambda: reaper_gone(pool_db, sandbox), what="the reaper to exit")
    assert query(
        pool_db,
        "SELECT COUNT(*) FROM instances WHERE state NOT IN ('destroyed', 'lost')",
    ) == [(0,)]
