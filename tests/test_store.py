"""The pool database: transitions, leasing, concurrency and bad files."""

from __future__ import annotations

import multiprocessing
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select

from vastai_pool import db
from vastai_pool import store as pool_store
from vastai_pool.errors import PoolDatabaseError, PoolError
from vastai_pool.models import (
    DestroyReason,
    InstanceState,
    Lease,
    LeaseOutcome,
)
from vastai_pool.requirements import Hardware, Requirements
from vastai_pool.store import Store, account_id

ACCOUNT = account_id("http://127.0.0.1:1", "key-a")
IMAGE = "pytorch/pytorch:latest"

HARDWARE = Hardware(
    num_gpus=1,
    gpu_name="RTX 4090",
    cpu_cores_effective=8.0,
    cpu_ram_mb=32000.0,
    disk_gb=50.0,
    dph_total=0.40,
    reliability=0.99,
    datacenter=True,
    country="US",
)
REQUIREMENTS = Requirements(image=IMAGE, disk_gb=20.0, gpu_names=("RTX_4090",))


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[Store]:
    opened = Store(tmp_path / "nested" / "pool.sqlite")
    opened.clock = clock
    yield opened
    opened.close()


def start_run(store: Store, account: str = ACCOUNT) -> str:
    return pool_store.start_run(
        store, account=account, workdir="/work", budget_usd=None, linger_seconds=0
    )


def add_idle(
    store: Store,
    run_id: str,
    *,
    label: str,
    hardware: Hardware = HARDWARE,
    image: str = IMAGE,
    extra_query: str = "",
    account: str = ACCOUNT,
    vast_id: int = 1000,
) -> int:
    pk = pool_store.record_rental(
        store,
        run_id=run_id,
        account=account,
        label=label,
        offer_id=vast_id + 1,
        machine_id=None,
        image=image,
        extra_query=extra_query,
        hardware=hardware,
        keep=False,
    )
    pool_store.transition(
        store, pk, InstanceState.BOOTING, why="created", vast_id=vast_id
    )
    pool_store.transition(store, pk, InstanceState.IDLE, why="prepared")
    return pk


def lease(store: Store, run_id: str, **overrides: object) -> object:
    arguments: dict[str, object] = {
        "run_id": run_id,
        "account": ACCOUNT,
        "requirements": REQUIREMENTS,
        "rule": "train",
        "job_id": 1,
        "attempt": 1,
        "input_sizes": {},
    }
    arguments.update(overrides)
    return pool_store.lease_idle(store, **arguments)


def test_account_id_hashes_key(tmp_path: Path) -> None:
    account = account_id("https://Console.vast.ai/", "secret-key")
    assert account.startswith("https://console.vast.ai#")
    assert len(account.split("#")[1]) == 16
    assert "secret-key" not in account
    assert account == account_id("https://console.vast.ai", "secret-key")
    assert account != account_id("https://console.vast.ai", "other-key")


def test_default_db_path_honours_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert pool_store.default_db_path() == tmp_path / "snakemake-vastai/pool.sqlite"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home/.local/share/snakemake-vastai/pool.sqlite"
    assert pool_store.default_db_path() == expected


def test_store_creates_parent_dirs_and_wal(store: Store) -> None:
    assert store.path.exists()
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_transitions_set_timestamps_and_events(store: Store, clock: FakeClock) -> None:
    run_id = start_run(store)
    pk = pool_store.record_rental(
        store,
        run_id=run_id,
        account=ACCOUNT,
        label="pool-test-1",
        offer_id=7,
        machine_id=3,
        image=IMAGE,
        extra_query="",
        hardware=HARDWARE,
        keep=False,
    )
    rented_at = clock.now
    clock.now += 10
    booting = pool_store.transition(
        store, pk, InstanceState.BOOTING, why="created", vast_id=42, ssh_port=2222
    )
    assert booting.vast_id == 42
    assert booting.ssh_port == 2222
    assert booting.rented_at == rented_at

    clock.now += 10
    idle = pool_store.transition(store, pk, InstanceState.IDLE, why="prepared")
    assert idle.ready_at == clock.now
    assert idle.idle_since == clock.now
    ready_at = clock.now

    clock.now += 5
    lease_id = pool_store.lease_new(
        store, pk, run_id=run_id, rule="train", job_id=1, attempt=1
    )
    busy = pool_store.get_instance(store, pk)
    assert busy.state is InstanceState.BUSY
    assert busy.idle_since is None

    clock.now += 60
    pool_store.end_lease(
        store,
        lease_id,
        LeaseOutcome.SUCCEEDED,
        0,
        instance_state=InstanceState.IDLE,
    )
    idle_again = pool_store.get_instance(store, pk)
    assert idle_again.state is InstanceState.IDLE
    assert idle_again.ready_at == ready_at
    assert idle_again.idle_since == clock.now
    assert idle_again.last_busy_at == clock.now

    clock.now += 300
    gone = pool_store.transition(
        store,
        pk,
        InstanceState.DESTROYED,
        why="idle for 300 s",
        reason=DestroyReason.IDLE_TIMEOUT,
    )
    assert gone.destroyed_at == clock.now
    assert gone.destroy_reason is DestroyReason.IDLE_TIMEOUT
    assert gone.idle_since is None

    events = pool_store.instance_events(store, pk)
    kinds = [event.kind for event in events]
    assert kinds == ["renting", "booting", "idle", "busy", "idle", "destroyed"]
    assert events[-1].reason is DestroyReason.IDLE_TIMEOUT
    assert events[-1].from_state is InstanceState.IDLE
    assert events[-1].detail == "idle for 300 s"
    assert all(event.run_id == run_id for event in events)

    leases = pool_store.run_leases(store, run_id)
    assert [lease.outcome for lease in leases] == [LeaseOutcome.SUCCEEDED]
    assert leases[0].exit_code == 0
    assert leases[0].warm is False


def test_transition_rejects_leaving_destroyed(store: Store) -> None:
    pk = add_idle(store, start_run(store), label="pool-test-1")
    pool_store.transition(store, pk, InstanceState.DESTROYED, why="done")
    with pytest.raises(PoolError, match="already destroyed"):
        pool_store.transition(store, pk, InstanceState.IDLE, why="revive")


def test_transition_rejects_managed_fields(store: Store) -> None:
    pk = add_idle(store, start_run(store), label="pool-test-1")
    with pytest.raises(TypeError, match="idle_since"):
        pool_store.transition(store, pk, InstanceState.IDLE, why="x", idle_since=1.0)
    with pytest.raises(TypeError, match="no_such_column"):
        pool_store.transition(store, pk, InstanceState.IDLE, why="x", no_such_column=1)


def test_lease_prefers_input_overlap(store: Store) -> None:
    run_id = start_run(store)
    cheap = add_idle(store, run_id, label="cheap", vast_id=1)
    holder = add_idle(
        store,
        run_id,
        label="holder",
        vast_id=2,
        hardware=replace(HARDWARE, dph_total=0.9),
    )
    pool_store.record_files(store, holder, [("data/a.bin", 5000, "aa")])
    pool_store.record_files(store, cheap, [("data/a.bin", 5000, "stale")])

    leased = lease(store, run_id, input_sizes={"data/a.bin": (5000, "aa")})

    assert leased is not None
    record, lease_id = leased
    assert record.pk == holder
    assert record.state is InstanceState.BUSY
    assert pool_store.get_instance(store, cheap).state is InstanceState.IDLE
    assert pool_store.run_leases(store, run_id)[0].id == lease_id
    assert pool_store.run_leases(store, run_id)[0].warm is True


def test_lease_prefers_cheaper_without_overlap(store: Store) -> None:
    run_id = start_run(store)
    add_idle(
        store,
        run_id,
        label="dear",
        vast_id=1,
        hardware=replace(HARDWARE, dph_total=0.9),
    )
    cheap = add_idle(store, run_id, label="cheap", vast_id=2)

    leased = lease(store, run_id, input_sizes={"data/a.bin": (5000, "aa")})

    assert leased is not None
    assert leased[0].pk == cheap


def test_lease_adopts_lingering_instance(store: Store) -> None:
    old_run = start_run(store)
    pk = add_idle(store, old_run, label="lingering")
    pool_store.transition(store, pk, InstanceState.IDLE, why="linger", linger_until=5.0)
    pool_store.end_run(store, old_run)
    new_run = start_run(store)

    leased = lease(store, new_run)

    assert leased is not None
    assert leased[0].run_id == new_run
    assert leased[0].linger_until is None


@pytest.mark.parametrize(
    "change",
    [
        {"hardware": replace(HARDWARE, gpu_name="RTX 3090")},
        {"hardware": replace(HARDWARE, num_gpus=0)},
        {"hardware": replace(HARDWARE, disk_gb=10.0)},
        {"image": "other/image:1"},
        {"extra_query": "cuda_vers>=12.4"},
        {"account": account_id("http://127.0.0.1:1", "key-b")},
    ],
    ids=["model", "count", "disk", "image", "extra-query", "account"],
)
def test_lease_skips_non_matching(store: Store, change: dict[str, object]) -> None:
    run_id = start_run(store)
    pk = add_idle(store, run_id, label="other", **change)

    assert lease(store, run_id) is None
    assert pool_store.get_instance(store, pk).state is InstanceState.IDLE


def test_lease_requires_identical_extra_query(store: Store) -> None:
    run_id = start_run(store)
    add_idle(store, run_id, label="q", extra_query="cuda_vers>=12.4")
    requirements = replace(REQUIREMENTS, extra_query="cuda_vers>=12.4")

    assert lease(store, run_id, requirements=requirements) is not None


def test_end_lease_keeps_destroyed_instance(store: Store) -> None:
    run_id = start_run(store)
    pk = add_idle(store, run_id, label="a")
    leased = lease(store, run_id)
    assert leased is not None
    pool_store.transition(store, pk, InstanceState.DESTROYED, why="cancelled")

    pool_store.end_lease(
        store,
        leased[1],
        LeaseOutcome.CANCELLED,
        None,
        instance_state=InstanceState.IDLE,
    )

    assert pool_store.get_instance(store, pk).state is InstanceState.DESTROYED
    assert pool_store.run_leases(store, run_id)[0].outcome is LeaseOutcome.CANCELLED


def test_write_session_holds_write_lock(store: Store) -> None:
    start_run(store)
    with store.sessions.write():
        other = sqlite3.connect(store.path, timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()


def test_sources_files_and_counts(store: Store) -> None:
    run_id = start_run(store)
    pk = add_idle(store, run_id, label="a")
    pool_store.mark_sources(store, pk, "abc")
    pool_store.mark_sources(store, pk, "abc")
    pool_store.mark_sources(store, pk, "def")
    pool_store.record_files(store, pk, [("x", 1, "h1"), ("y", 2, "h2")])
    pool_store.record_files(store, pk, [("x", 3, "h3")])
    lease(store, run_id)

    assert pool_store.get_instance(store, pk).sources == frozenset({"abc", "def"})
    assert pool_store.files_on(store, pk) == {"x": (3, "h3"), "y": (2, "h2")}
    assert pool_store.count_alive(store, ACCOUNT) == 1
    assert pool_store.run_summary_counts(store, run_id) == {
        "instances_rented": 1,
        "jobs": 1,
        "warm_jobs": 1,
        "instances_alive": 1,
    }


def test_run_is_over_rules(store: Store, clock: FakeClock) -> None:
    run_id = start_run(store)
    run = pool_store.get_run(store, run_id)
    assert not pool_store.run_is_over(run, clock.now)
    assert pool_store.run_is_over(run, clock.now + pool_store.RUN_STALE_SECONDS + 1)
    assert pool_store.run_is_over(replace(run, pid=2**22 + 12345), clock.now)
    assert not pool_store.run_is_over(
        replace(run, pid=2**22 + 12345, host="elsewhere"), clock.now
    )
    pool_store.end_run(store, run_id)
    assert pool_store.live_run_ids(store) == set()


def _race_lease(path: str, run_id: str, barrier: object, results: object) -> None:
    contender = Store(Path(path))
    barrier.wait()
    leased = lease(contender, run_id)
    results.put(None if leased is None else leased[1])
    contender.close()


def test_two_processes_lease_one_instance_once(tmp_path: Path) -> None:
    path = tmp_path / "pool.sqlite"
    setup = Store(path)
    run_id = start_run(setup)
    pk = add_idle(setup, run_id, label="only")
    setup.close()

    context = multiprocessing.get_context("fork")
    contenders = 4
    barrier = context.Barrier(contenders)
    results = context.Queue()
    processes = [
        context.Process(target=_race_lease, args=(str(path), run_id, barrier, results))
        for _ in range(contenders)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    winners = [outcome for outcome in outcomes if outcome is not None]
    assert len(winners) == 1
    check = Store(path)
    with check.sessions.read() as session:
        leases = list(session.scalars(select(Lease)))
    assert [(row.id, row.instance_pk) for row in leases] == [(winners[0], pk)]
    assert pool_store.get_instance(check, pk).state is InstanceState.BUSY
    check.close()


def test_non_sqlite_file_rejected_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "pool.sqlite"
    content = b"this is a text file, not a database\n" * 50
    path.write_bytes(content)

    with pytest.raises(PoolDatabaseError) as caught:
        Store(path)

    message = str(caught.value)
    assert str(path) in message
    assert "--db" in message
    assert "--vastai-pool-db" in message
    assert path.read_bytes() == content


def test_corrupt_database_rejected_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "pool.sqlite"
    setup = Store(path)
    run_id = start_run(setup)
    for index in range(50):
        add_idle(setup, run_id, label=f"pool-{index}", vast_id=index)
    setup.close()
    content = bytearray(path.read_bytes())
    page_size = int.from_bytes(content[16:18], "big")
    # Overwrite everything after the first page, keeping the header valid.
    content[page_size:] = b"\xa5" * (len(content) - page_size)
    path.write_bytes(bytes(content))

    with pytest.raises(PoolDatabaseError, match="corrupt"):
        Store(path)

    assert path.read_bytes() == bytes(content)


def test_lock_timeout_raises_pool_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "BUSY_TIMEOUT_SECONDS", 0.1)
    path = tmp_path / "pool.sqlite"
    opened = Store(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(PoolDatabaseError, match="locked"):
            start_run(opened)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        opened.close()
