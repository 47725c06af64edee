"""A run killed with SIGKILL, and what ``vastai-pool gc``, ``reconcile`` and
``recover_stale_runs`` do about what it left, against a sandbox."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.pool_helpers import (
    booted,
    create,
    environment,
    query,
    renting_row,
    sdk,
    snakemake_command,
    start,
    wait_for,
    write_workflow,
)
from vastai_pool import inventory
from vastai_pool import store as pool_store
from vastai_pool.api import VastApi
from vastai_pool.models import InstanceState, LeaseOutcome

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox


def gc(sandbox: Sandbox, pool_db: Path, home: Path, *flags: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "vastai_pool.cli", "gc", "--db", str(pool_db)]
        + ["--api-url", sandbox.url, "--api-key", sandbox.api_key, *flags],
        env=environment(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_gc_after_sigkill_destroys_every_instance_of_the_run(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    workdir, home, pool_db = tmp_path / "wf", tmp_path / "home", tmp_path / "p.db"
    write_workflow(workdir, jobs=3, command="sleep 600")
    process = start(snakemake_command(sandbox, pool_db, jobs=3), workdir, home)
    try:
        wait_for(
            lambda: (
                len(query(pool_db, "SELECT id FROM leases WHERE ended_at IS NULL")) >= 2
            ),
            what="two jobs running on the pool",
        )
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    ((run_id,),) = query(pool_db, "SELECT id FROM runs")
    account = pool_store.account_id(sandbox.url, sandbox.api_key)
    # What a kill between the create call and its bookkeeping leaves: an
    # instance whose row has no Vast.ai id yet, and one with no row at all.
    with pool_store.Store(pool_db) as store:
        prefix = f"{store.label_prefix}{run_id[:8]}-"
        renting_row(store, run_id, account, f"{prefix}98")
    half_recorded = create(sandbox, f"{prefix}98")
    unrecorded = create(sandbox, f"{prefix}99")
    assert len(sandbox.ledger()["alive"]) >= 4

    listed = gc(sandbox, pool_db, home, "--dry-run")
    assert f"would destroy instance {unrecorded}" in listed
    assert sandbox.ledger()["alive"] != []

    cleaned = gc(sandbox, pool_db, home)
    assert f"ended run {run_id}" in cleaned
    assert sandbox.ledger()["alive"] == []
    assert half_recorded not in sandbox.ledger()["alive"]
    assert query(pool_db, "SELECT ended_at IS NOT NULL FROM runs") == [(1,)]
    assert query(pool_db, "SELECT outcome FROM leases WHERE ended_at IS NULL") == []
    outcomes = {row[0] for row in query(pool_db, "SELECT outcome FROM leases")}
    assert outcomes == {LeaseOutcome.LOST.value}
    states = {row[0] for row in query(pool_db, "SELECT state FROM instances")}
    assert states <= {InstanceState.DESTROYED.value, InstanceState.LOST.value}
    assert gc(sandbox, pool_db, home) == "Nothing to destroy.\n"


@pytest.fixture
def pool_db(sandbox: Sandbox, tmp_path: Path):
    with pool_store.Store(tmp_path / "pool.sqlite") as store:
        yield store


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_reconcile_leaves_live_runs_and_stopped_instances_alone(
    sandbox: Sandbox, pool_db: pool_store.Store
) -> None:
    account = pool_store.account_id(sandbox.url, sandbox.api_key)
    api = VastApi(sandbox.url, sandbox.api_key)
    live = pool_store.start_run(
        pool_db, account=account, workdir="/w", budget_usd=None, linger_seconds=0
    )
    mine = booted(
        pool_db,
        live,
        account,
        "vastai-pool-live-1",
        create(sandbox, "vastai-pool-live-1"),
    )
    stopped_id = create(sandbox, "vastai-pool-live-2")
    stopped = booted(pool_db, live, account, "vastai-pool-live-2", stopped_id)
    sdk(sandbox).stop_instance(stopped_id)
    foreign = create(sandbox, "someone-else")
    stray = create(sandbox, f"{pool_db.label_prefix}gone-1")
    # Another pool database's instance on the same account is not a stray.
    other_pool = create(sandbox, "vastai-pool-0therp00l-run-1")

    report = inventory.reconcile(pool_db, api, account)

    assert report.ok
    assert [s.remote.id for s in report.strays] == [stray]
    alive = set(sandbox.ledger()["alive"])
    assert alive == {mine.vast_id, stopped.vast_id, foreign, other_pool}
    states = {r.pk: r.state for r in pool_store.list_instances(pool_db)}
    assert states == {mine.pk: InstanceState.IDLE, stopped.pk: InstanceState.IDLE}


def test_reconcile_marks_unlisted_rows_lost_and_destroys_known_destroyed(
    sandbox: Sandbox, pool_db: pool_store.Store
) -> None:
    account = pool_store.account_id(sandbox.url, sandbox.api_key)
    api = VastApi(sandbox.url, sandbox.api_key)
    run = pool_store.start_run(
        pool_db, account=account, workdir="/w", budget_usd=None, linger_seconds=0
    )
    pool_store.end_run(pool_db, run)
    vanished_id = create(sandbox, "vastai-pool-old-1")
    vanished = booted(pool_db, run, account, "vastai-pool-old-1", vanished_id)
    sdk(sandbox).destroy_instance(vanished_id)
    zombie_id = create(sandbox, "vastai-pool-old-2")
    zombie = booted(pool_db, run, account, "vastai-pool-old-2", zombie_id)
    pool_store.transition(pool_db, zombie.pk, InstanceState.DESTROYED, why="test")

    report = inventory.reconcile(pool_db, api, account)

    assert [r.pk for r in report.marked_lost] == [vanished.pk]
    assert [s.remote.id for s in report.strays] == [zombie_id]
    assert sandbox.ledger()["alive"] == []
    assert pool_store.get_instance(pool_db, vanished.pk).state is InstanceState.LOST


def test_recover_ends_dead_run_and_leaves_its_idle_instance_adoptable(
    sandbox: Sandbox, pool_db: pool_store.Store
) -> None:
    account = pool_store.account_id(sandbox.url, sandbox.api_key)
    api = VastApi(sandbox.url, sandbox.api_key)
    dead = pool_store.start_run(
        pool_db,
        account=account,
        workdir="/w",
        budget_usd=None,
        linger_seconds=0,
        idle_timeout=60,
    )
    live = pool_store.start_run(
        pool_db, account=account, workdir="/w", budget_usd=None, linger_seconds=0
    )
    with pool_db.sessions.write() as session:
        session.get(pool_store.Run, dead).pid = dead_pid()
    idle = booted(
        pool_db,
        dead,
        account,
        "vastai-pool-dead-1",
        create(sandbox, "vastai-pool-dead-1"),
    )
    busy = booted(
        pool_db,
        dead,
        account,
        "vastai-pool-dead-2",
        create(sandbox, "vastai-pool-dead-2"),
    )
    lease = pool_store.lease_new(
        pool_db, busy.pk, run_id=dead, rule="r", job_id=1, attempt=1
    )
    renting = renting_row(pool_db, dead, account, "vastai-pool-dead-3")
    half = create(sandbox, "vastai-pool-dead-3")
    theirs = booted(
        pool_db,
        live,
        account,
        "vastai-pool-live-1",
        create(sandbox, "vastai-pool-live-1"),
    )

    assert inventory.recover_stale_runs(pool_db, api, account) == [dead]

    assert set(sandbox.ledger()["alive"]) == {idle.vast_id, theirs.vast_id}
    assert half not in sandbox.ledger()["alive"]
    kept = pool_store.get_instance(pool_db, idle.pk)
    assert kept.state is InstanceState.IDLE
    assert kept.linger_until == pytest.approx(idle.idle_since + 60)
    assert pool_store.get_instance(pool_db, busy.pk).state is InstanceState.DESTROYED
    assert pool_store.get_instance(pool_db, renting).state is InstanceState.DESTROYED
    assert pool_store.get_instance(pool_db, theirs.pk).state is InstanceState.IDLE
    (ended,) = [x for x in pool_store.run_leases(pool_db, dead) if x.id == lease]
    assert ended.outcome is LeaseOutcome.LOST
    assert pool_store.get_run(pool_db, dead).ended_at is not None
    assert pool_store.get_run(pool_db, live).ended_at is None
    assert inventory.recover_stale_runs(pool_db, api, account) == []
