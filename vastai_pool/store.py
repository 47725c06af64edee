"""Reads and writes of the pool database; the only module that changes rows.

Every function takes an open ``Store`` and runs in its own transaction;
writes begin ``IMMEDIATE``, so they hold SQLite's write lock from their
first statement. Times are epoch seconds from ``Store.clock``
(monkeypatched in tests).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.orm import Session

from vastai_pool import db
from vastai_pool.errors import PoolDatabaseError, PoolError
from vastai_pool.models import (
    ALIVE_STATES,
    DestroyReason,
    Event,
    FailedMachine,
    Instance,
    InstanceFile,
    InstanceState,
    Lease,
    LeaseOutcome,
    PoolMeta,
    Run,
)
from vastai_pool.requirements import Hardware, Requirements

logger = logging.getLogger(__name__)

# Labels of every pool's instances start with this. ``Store.label_prefix``
# adds the part that distinguishes one pool database from another.
LABEL_PREFIX = "vastai-pool-"

# A run whose heartbeat is older than this is over, even on another host: four
# missed beats of the 30 s heartbeat (``vastai_pool.reaper.HEARTBEAT_SECONDS``).
RUN_STALE_SECONDS = 120.0

# Seconds a machine that failed an instance is skipped by rentals. A failed
# image pull or a full disk on a host is seldom fixed within hours, and a
# day later the machine gets another chance.
MACHINE_MEMORY_SECONDS = 24 * 3600.0

_GONE_STATES = frozenset({InstanceState.DESTROYED, InstanceState.LOST})
# Columns that ``transition`` maintains itself and callers may not set.
_MANAGED_COLUMNS = frozenset(
    {"pk", "state", "ready_at", "idle_since", "last_busy_at", "destroyed_at"}
)


def account_id(api_url: str, api_key: str) -> str:
    """Return the account key stored in rows: the API URL and a sha256 of the key.

    Two API keys, or one key against two API URLs, never share instances.
    The key itself is never stored.
    """
    digest = hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:16]
    return f"{normalize_api_url(api_url)}#{digest}"


def normalize_api_url(api_url: str) -> str:
    """Return ``api_url`` with scheme and host in lower case and no trailing ``/``."""
    parts = urlsplit(api_url.strip())
    path = parts.path.rstrip("/")
    return urlunsplit(
        (parts.scheme.lower(), parts.netloc.lower(), path, parts.query, "")
    )


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/snakemake-vastai/pool.sqlite`` (``~/.local/share`` default)."""
    data_home = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec says to ignore a relative value.
    if not data_home or not Path(data_home).is_absolute():
        data_home = str(Path.home() / ".local" / "share")
    return Path(data_home) / "snakemake-vastai" / "pool.sqlite"


class Store:
    """An open pool database: SQLite in WAL mode, upgraded by Alembic on open.

    A corrupt or unreadable file raises ``PoolDatabaseError`` naming the path
    and what to do; it is never deleted or overwritten. Safe to share between
    threads: each call takes its own connection.
    """

    clock: Callable[[], float]

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()
        self.clock = time.time
        self.engine = db.open_engine(self.path)
        self.sessions = db.Sessions(self.engine, self.path)

    def close(self) -> None:
        self.engine.dispose()

    @functools.cached_property
    def label_prefix(self) -> str:
        """Start of the label of every instance this pool database rents.

        ``vastai-pool-<pool id>-``, with the random id the database got when
        it was created, so reconciliation never mistakes another pool file's
        instances on the same account for strays, and moving the file keeps
        its instances recognizable.
        """
        with self.sessions.read() as session:
            pool_id = session.get(PoolMeta, "pool_id")
            if pool_id is None:
                raise PoolDatabaseError(
                    f"pool database {self.path} has no pool id; it was not "
                    "created by vastai-pool. Move it aside or use another file."
                )
            return f"{LABEL_PREFIX}{pool_id.value}-"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class InstanceRecord:
    """A detached snapshot of an ``instances`` row, safe to pass between threads."""

    pk: int
    vast_id: int | None
    label: str
    account: str
    state: InstanceState
    run_id: str | None
    image: str
    extra_query: str
    hardware: Hardware
    ssh_host: str | None
    ssh_port: int | None
    host_key: str | None
    rented_at: float
    idle_since: float | None
    keep: bool
    linger_until: float | None
    sources: frozenset[str]
    ready_at: float | None = None
    last_busy_at: float | None = None
    destroyed_at: float | None = None
    destroy_reason: DestroyReason | None = None
    offer_id: int | None = None
    machine_id: int | None = None


@dataclass(frozen=True)
class RunRecord:
    """A detached snapshot of a ``runs`` row."""

    id: str
    account: str
    workdir: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    ended_at: float | None
    budget_usd: float | None
    linger_seconds: float
    idle_timeout_seconds: float | None


@dataclass(frozen=True)
class EventRecord:
    """A detached snapshot of an ``events`` row."""

    id: int
    at: float
    instance_pk: int | None
    run_id: str | None
    kind: str
    from_state: InstanceState | None
    reason: DestroyReason | None
    detail: str


def _instance_record(row: Instance) -> InstanceRecord:
    return InstanceRecord(
        pk=row.pk,
        vast_id=row.vast_id,
        label=row.label,
        account=row.account,
        state=InstanceState(row.state),
        run_id=row.run_id,
        image=row.image,
        extra_query=row.extra_query,
        hardware=_hardware(row),
        ssh_host=row.ssh_host,
        ssh_port=row.ssh_port,
        host_key=row.host_key,
        rented_at=row.rented_at,
        idle_since=row.idle_since,
        keep=row.keep,
        linger_until=row.linger_until,
        sources=frozenset(_split_sources(row.sources)),
        ready_at=row.ready_at,
        last_busy_at=row.last_busy_at,
        destroyed_at=row.destroyed_at,
        destroy_reason=DestroyReason(row.destroy_reason)
        if row.destroy_reason
        else None,
        offer_id=row.offer_id,
        machine_id=row.machine_id,
    )


def _hardware(row: Instance) -> Hardware:
    return Hardware(
        num_gpus=row.num_gpus,
        gpu_name=row.gpu_name,
        cpu_cores_effective=row.cpu_cores_effective,
        cpu_ram_mb=row.cpu_ram_mb,
        disk_gb=row.disk_gb,
        dph_total=row.dph_total,
        reliability=row.reliability,
        datacenter=row.datacenter,
        country=row.country,
    )


def _run_record(row: Run) -> RunRecord:
    return RunRecord(
        id=row.id,
        account=row.account,
        workdir=row.workdir,
        host=row.host,
        pid=row.pid,
        started_at=row.started_at,
        heartbeat_at=row.heartbeat_at,
        ended_at=row.ended_at,
        budget_usd=row.budget_usd,
        linger_seconds=row.linger_seconds,
        idle_timeout_seconds=row.idle_timeout_seconds,
    )


def _split_sources(sources: str) -> list[str]:
    return [checksum for checksum in sources.split() if checksum]


def _get_instance_row(session: Session, pk: int) -> Instance:
    row = session.get(Instance, pk)
    if row is None:
        raise PoolError(f"Instance row {pk} not found in the pool database.")
    return row


# Runs ---------------------------------------------------------------------


def start_run(
    store: Store,
    *,
    account: str,
    workdir: str,
    budget_usd: float | None,
    linger_seconds: float,
    idle_timeout: float | None = None,
) -> str:
    """Insert a run row for this process (host, pid) and return its id."""
    now = store.clock()
    run_id = uuid.uuid4().hex
    with store.sessions.write() as session:
        session.add(
            Run(
                id=run_id,
                account=account,
                workdir=workdir,
                host=socket.gethostname(),
                pid=os.getpid(),
                started_at=now,
                heartbeat_at=now,
                budget_usd=budget_usd,
                linger_seconds=linger_seconds,
                idle_timeout_seconds=idle_timeout,
            )
        )
    logger.info("Registered run %s in pool database %s", run_id, store.path)
    return run_id


def heartbeat(store: Store, run_id: str) -> None:
    with store.sessions.write() as session:
        _get_run_row(session, run_id).heartbeat_at = store.clock()


def end_run(store: Store, run_id: str) -> None:
    with store.sessions.write() as session:
        row = _get_run_row(session, run_id)
        if row.ended_at is None:
            row.ended_at = store.clock()


def get_run(store: Store, run_id: str) -> RunRecord:
    with store.sessions.read() as session:
        return _run_record(_get_run_row(session, run_id))


def list_runs(store: Store, *, account: str | None = None) -> list[RunRecord]:
    statement = select(Run).order_by(Run.started_at)
    if account is not None:
        statement = statement.where(Run.account == account)
    with store.sessions.read() as session:
        return [_run_record(row) for row in session.scalars(statement)]


def run_is_over(run: RunRecord, now: float) -> bool:
    """Return whether a run has ended: its ``ended_at`` is set, its process
    on this host is gone, or its heartbeat is older than ``RUN_STALE_SECONDS``."""
    if run.ended_at is not None:
        return True
    if now - run.heartbeat_at > RUN_STALE_SECONDS:
        return True
    return run.host == socket.gethostname() and not _pid_alive(run.pid)


def live_run_ids(store: Store) -> set[str]:
    """Return the ids of runs that are not over (see ``run_is_over``)."""
    now = store.clock()
    return {run.id for run in list_runs(store) if not run_is_over(run, now)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The pid exists but belongs to another user.
        return True
    return True


def _get_run_row(session: Session, run_id: str) -> Run:
    row = session.get(Run, run_id)
    if row is None:
        raise PoolError(f"Run {run_id} not found in the pool database.")
    return row


# Instances ----------------------------------------------------------------


def record_rental(
    store: Store,
    *,
    run_id: str,
    account: str,
    label: str,
    offer_id: int,
    machine_id: int | None,
    image: str,
    extra_query: str,
    hardware: Hardware,
    keep: bool,
) -> int:
    """Insert an instance in state ``renting`` before the create call; return pk."""
    now = store.clock()
    with store.sessions.write() as session:
        row = Instance(
            label=label,
            account=account,
            state=InstanceState.RENTING,
            run_id=run_id,
            offer_id=offer_id,
            machine_id=machine_id,
            image=image,
            extra_query=extra_query,
            num_gpus=hardware.num_gpus,
            gpu_name=hardware.gpu_name,
            cpu_cores_effective=hardware.cpu_cores_effective,
            cpu_ram_mb=hardware.cpu_ram_mb,
            disk_gb=hardware.disk_gb,
            dph_total=hardware.dph_total,
            reliability=hardware.reliability,
            datacenter=hardware.datacenter,
            country=hardware.country,
            rented_at=now,
            keep=keep,
            sources="",
        )
        session.add(row)
        session.flush()
        session.add(
            Event(
                at=now,
                instance_pk=row.pk,
                run_id=run_id,
                kind=InstanceState.RENTING.value,
                detail=f"renting offer {offer_id} as {label}",
            )
        )
        return row.pk


def transition(
    store: Store,
    pk: int,
    state: InstanceState,
    *,
    why: str,
    reason: DestroyReason | None = None,
    **fields: object,
) -> InstanceRecord:
    """Change an instance's state, set ``fields`` (e.g. ``vast_id``, ``ssh_host``),
    maintain the timestamps (``ready_at``, ``idle_since``, ``last_busy_at``,
    ``destroyed_at``) and append an event, in one transaction.

    ``reason`` is stored as ``destroy_reason``; without one an earlier reason
    is kept. Raises ``PoolError`` when leaving ``destroyed``, which is final.
    """
    with store.sessions.write() as session:
        row = _get_instance_row(session, pk)
        _apply_transition(session, row, state, store.clock(), why, reason, fields)
        return _instance_record(row)


def claim_for_destroy(
    store: Store,
    seen: InstanceRecord,
    *,
    why: str,
    reason: DestroyReason,
) -> InstanceRecord | None:
    """Move an instance to ``destroying`` if its state and owning run are
    still those of ``seen``, and return the new record.

    Return None when another process changed the row meanwhile, for example
    because a run leased the instance.
    """
    with store.sessions.write() as session:
        row = _get_instance_row(session, seen.pk)
        if row.state != seen.state or row.run_id != seen.run_id:
            return None
        _apply_transition(
            session, row, InstanceState.DESTROYING, store.clock(), why, reason, {}
        )
        return _instance_record(row)


def _apply_transition(
    session: Session,
    row: Instance,
    state: InstanceState,
    now: float,
    why: str,
    reason: DestroyReason | None,
    fields: dict[str, object],
) -> None:
    previous = InstanceState(row.state)
    if previous is InstanceState.DESTROYED and state is not InstanceState.DESTROYED:
        raise PoolError(
            f"Instance {row.label} (Vast.ai id {row.vast_id}) is already destroyed "
            f"and cannot become {state.value}."
        )
    for name, value in fields.items():
        if name in _MANAGED_COLUMNS or name not in Instance.__table__.columns:
            raise TypeError(f"transition() cannot set instance column {name!r}")
        setattr(row, name, value)

    if state is InstanceState.IDLE:
        if row.ready_at is None:
            row.ready_at = now
        if previous is not InstanceState.IDLE:
            row.idle_since = now
    else:
        row.idle_since = None
    if previous is InstanceState.BUSY and state is not InstanceState.BUSY:
        row.last_busy_at = now
    if state in _GONE_STATES and row.destroyed_at is None:
        row.destroyed_at = now
    if reason is not None:
        row.destroy_reason = reason
    row.state = state

    session.add(
        Event(
            at=now,
            instance_pk=row.pk,
            run_id=row.run_id,
            kind=state.value,
            from_state=previous,
            reason=reason,
            detail=why,
        )
    )
    logger.debug(
        "Instance %s (Vast.ai id %s): %s -> %s, %s",
        row.label,
        row.vast_id,
        previous.value,
        state.value,
        why,
    )


def mark_gone(store: Store, pk: int, *, why: str) -> InstanceRecord | None:
    """Record that Vast.ai no longer lists an instance, in one transaction.

    A ``destroying`` row becomes ``destroyed``, a row in any other alive
    state ``lost`` (reason ``gone``). Return None, changing nothing, when the
    row is already destroyed or lost.
    """
    with store.sessions.write() as session:
        row = _get_instance_row(session, pk)
        previous = InstanceState(row.state)
        if previous in _GONE_STATES:
            return None
        if previous is InstanceState.DESTROYING:
            _apply_transition(
                session, row, InstanceState.DESTROYED, store.clock(), why, None, {}
            )
        else:
            _apply_transition(
                session,
                row,
                InstanceState.LOST,
                store.clock(),
                why,
                DestroyReason.GONE,
                {},
            )
        return _instance_record(row)


def set_linger(
    store: Store, seen: InstanceRecord, until: float, *, why: str
) -> InstanceRecord | None:
    """Give an idle instance the linger deadline ``until`` (epoch seconds) if
    it is still idle and owned by the run of ``seen``; else return None."""
    with store.sessions.write() as session:
        row = _get_instance_row(session, seen.pk)
        if row.state != InstanceState.IDLE or row.run_id != seen.run_id:
            return None
        row.linger_until = until
        session.add(
            Event(
                at=store.clock(),
                instance_pk=row.pk,
                run_id=row.run_id,
                kind="linger",
                detail=why,
            )
        )
        return _instance_record(row)


def find_by_label(store: Store, label: str) -> InstanceRecord | None:
    """Return the instance row carrying ``label`` (alive or not), or None."""
    with store.sessions.read() as session:
        row = session.scalar(select(Instance).where(Instance.label == label))
        return _instance_record(row) if row is not None else None


def lingering_instances(
    store: Store, *, account: str | None = None
) -> list[InstanceRecord]:
    """Return the idle instances that carry a linger deadline, soonest first."""
    statement = (
        select(Instance)
        .where(
            Instance.state == InstanceState.IDLE,
            Instance.linger_until.is_not(None),
        )
        .order_by(Instance.linger_until, Instance.pk)
    )
    if account is not None:
        statement = statement.where(Instance.account == account)
    with store.sessions.read() as session:
        return [_instance_record(row) for row in session.scalars(statement)]


def get_instance(store: Store, pk: int) -> InstanceRecord:
    with store.sessions.read() as session:
        return _instance_record(_get_instance_row(session, pk))


def list_instances(
    store: Store, *, account: str | None = None, include_destroyed: bool = False
) -> list[InstanceRecord]:
    """Return instances by rental time; without ``include_destroyed`` only
    the alive ones (every state but ``destroyed`` and ``lost``)."""
    statement = select(Instance).order_by(Instance.rented_at, Instance.pk)
    if account is not None:
        statement = statement.where(Instance.account == account)
    if not include_destroyed:
        statement = statement.where(Instance.state.in_(sorted(ALIVE_STATES)))
    with store.sessions.read() as session:
        return [_instance_record(row) for row in session.scalars(statement)]


def job_counts(store: Store, pks: Iterable[int]) -> dict[int, int]:
    """Return {instance pk: number of leases it ever had} for ``pks``."""
    requested = list(pks)
    counts = dict.fromkeys(requested, 0)
    statement = (
        select(Lease.instance_pk, func.count(Lease.id))
        .where(Lease.instance_pk.in_(requested))
        .group_by(Lease.instance_pk)
    )
    with store.sessions.read() as session:
        for pk, count in session.execute(statement):
            counts[pk] = count
    return counts


def instance_events(store: Store, pk: int) -> list[EventRecord]:
    """Return the events of one instance, oldest first."""
    statement = select(Event).where(Event.instance_pk == pk).order_by(Event.id)
    with store.sessions.read() as session:
        return [
            EventRecord(
                id=row.id,
                at=row.at,
                instance_pk=row.instance_pk,
                run_id=row.run_id,
                kind=row.kind,
                from_state=InstanceState(row.from_state) if row.from_state else None,
                reason=DestroyReason(row.reason) if row.reason else None,
                detail=row.detail,
            )
            for row in session.scalars(statement)
        ]


def mark_sources(store: Store, pk: int, checksum: str) -> None:
    """Record that a source archive is unpacked on the instance."""
    with store.sessions.write() as session:
        row = _get_instance_row(session, pk)
        checksums = _split_sources(row.sources)
        if checksum not in checksums:
            row.sources = " ".join([*checksums, checksum])


def record_files(store: Store, pk: int, files: Iterable[tuple[str, int, str]]) -> None:
    """Upsert (path, size, sha256) rows of files now present on the instance."""
    values = [
        {"instance_pk": pk, "path": path, "size": size, "sha256": sha256}
        for path, size, sha256 in files
    ]
    if not values:
        return
    statement = insert(InstanceFile).values(values)
    statement = statement.on_conflict_do_update(
        index_elements=[InstanceFile.instance_pk, InstanceFile.path],
        set_={"size": statement.excluded.size, "sha256": statement.excluded.sha256},
    )
    with store.sessions.write() as session:
        session.execute(statement)


def files_on(store: Store, pk: int) -> dict[str, tuple[int, str]]:
    """Return {path: (size, sha256)} of what the instance holds."""
    with store.sessions.read() as session:
        return _files_on(session, pk)


def _files_on(session: Session, pk: int) -> dict[str, tuple[int, str]]:
    statement = select(InstanceFile).where(InstanceFile.instance_pk == pk)
    return {row.path: (row.size, row.sha256) for row in session.scalars(statement)}


def count_alive(store: Store, account: str) -> int:
    statement = select(func.count(Instance.pk)).where(
        Instance.account == account, Instance.state.in_(sorted(ALIVE_STATES))
    )
    with store.sessions.read() as session:
        return session.scalar(statement) or 0


# Leases -------------------------------------------------------------------


def lease_idle(
    store: Store,
    *,
    run_id: str,
    account: str,
    requirements: Requirements,
    rule: str,
    job_id: int,
    attempt: int,
    input_sizes: dict[str, tuple[int, str]],
) -> tuple[InstanceRecord, int] | None:
    """In one ``BEGIN IMMEDIATE`` transaction, pick an idle instance of the
    account that matches (hardware, image, identical extra query), preferring
    the one already holding most input bytes with the same sha256, then the
    cheapest; mark it busy, insert a lease (``warm`` true) and return
    (instance, lease id). Return None when none matches.

    The leasing run becomes the instance's owner, and a linger deadline set
    by an earlier run is cleared.
    """
    statement = select(Instance).where(
        Instance.account == account,
        Instance.state == InstanceState.IDLE,
        Instance.image == requirements.image,
        Instance.extra_query == requirements.extra_query,
    )
    with store.sessions.write() as session:
        candidates = [
            row
            for row in session.scalars(statement)
            if requirements.matches(_hardware(row))
        ]
        if not candidates:
            return None

        def preference(row: Instance) -> tuple[int, float, int]:
            present = _files_on(session, row.pk)
            overlap = sum(
                size
                for path, (size, sha256) in input_sizes.items()
                if present.get(path) == (size, sha256)
            )
            return (-overlap, row.dph_total, row.pk)

        chosen = min(candidates, key=preference)
        now = store.clock()
        chosen.run_id = run_id
        chosen.linger_until = None
        lease_id = _insert_lease(
            session, chosen, run_id, rule, job_id, attempt, warm=True, now=now
        )
        return _instance_record(chosen), lease_id


def lease_new(
    store: Store, pk: int, *, run_id: str, rule: str, job_id: int, attempt: int
) -> int:
    """Insert a lease on a freshly booted instance (``warm`` false) and mark it busy."""
    with store.sessions.write() as session:
        row = _get_instance_row(session, pk)
        return _insert_lease(
            session, row, run_id, rule, job_id, attempt, warm=False, now=store.clock()
        )


def _insert_lease(
    session: Session,
    row: Instance,
    run_id: str,
    rule: str,
    job_id: int,
    attempt: int,
    *,
    warm: bool,
    now: float,
) -> int:
    lease = Lease(
        instance_pk=row.pk,
        run_id=run_id,
        rule=rule,
        job_id=job_id,
        attempt=attempt,
        warm=warm,
        started_at=now,
        heartbeat_at=now,
    )
    session.add(lease)
    session.flush()
    why = f"leased to rule {rule} job {job_id} attempt {attempt} (lease {lease.id})"
    _apply_transition(session, row, InstanceState.BUSY, now, why, None, {})
    return lease.id


def end_lease(
    store: Store,
    lease_id: int,
    outcome: LeaseOutcome,
    exit_code: int | None,
    *,
    instance_state: InstanceState,
) -> None:
    """End a lease and move its instance to ``instance_state`` (idle after a
    clean finish), in one transaction.

    The instance changes state only while it is still busy: one that was
    destroyed or lost during the job keeps that state.
    """
    with store.sessions.write() as session:
        lease = session.get(Lease, lease_id)
        if lease is None:
            raise PoolError(f"Lease {lease_id} not found in the pool database.")
        if lease.ended_at is not None:
            return
        now = store.clock()
        lease.ended_at = now
        lease.outcome = outcome
        lease.exit_code = exit_code
        row = _get_instance_row(session, lease.instance_pk)
        if row.state != InstanceState.BUSY:
            return
        why = (
            f"lease {lease_id} of rule {lease.rule} job {lease.job_id} {outcome.value}"
        )
        if exit_code is not None:
            why += f" with exit code {exit_code}"
        _apply_transition(session, row, instance_state, now, why, None, {})


def end_open_leases(store: Store, run_id: str, outcome: LeaseOutcome) -> list[int]:
    """End every open lease of a run with ``outcome``; return their ids.

    The instances keep their state: the caller decides what becomes of them.
    """
    statement = select(Lease).where(Lease.run_id == run_id, Lease.ended_at.is_(None))
    with store.sessions.write() as session:
        now = store.clock()
        ended = []
        for lease in session.scalars(statement):
            lease.ended_at = now
            lease.outcome = outcome
            ended.append(lease.id)
            session.add(
                Event(
                    at=now,
                    instance_pk=lease.instance_pk,
                    run_id=run_id,
                    kind="lease_ended",
                    detail=f"lease {lease.id} of rule {lease.rule} job "
                    f"{lease.job_id} ended as {outcome.value}: its run is over",
                )
            )
        return ended


def all_leases(store: Store) -> list[Lease]:
    """Return every lease, oldest first, as detached rows."""
    with store.sessions.read() as session:
        return list(session.scalars(select(Lease).order_by(Lease.id)))


def lease_heartbeat(store: Store, lease_id: int) -> None:
    with store.sessions.write() as session:
        lease = session.get(Lease, lease_id)
        if lease is None:
            raise PoolError(f"Lease {lease_id} not found in the pool database.")
        lease.heartbeat_at = store.clock()


def run_leases(store: Store, run_id: str) -> list[Lease]:
    """Return the run's leases, oldest first, as detached rows."""
    statement = select(Lease).where(Lease.run_id == run_id).order_by(Lease.id)
    with store.sessions.read() as session:
        return list(session.scalars(statement))


def count_jobs(leases: Iterable[tuple[tuple[str, int, int], bool]]) -> tuple[int, int]:
    """Return (jobs, warm jobs) from ((rule, job id, attempt), warm) per lease.

    Leases come oldest first. A job placed again after its instance was lost
    before it started has several leases; it counts once, as warm when its
    last lease was.
    """
    last: dict[tuple[str, int, int], bool] = {}
    for key, warm in leases:
        last[key] = warm
    return len(last), sum(last.values())


def run_summary_counts(store: Store, run_id: str) -> dict[str, int]:
    """Return {"instances_rented", "jobs", "warm_jobs", "instances_alive"}."""
    rented = select(func.count(Event.id)).where(
        Event.run_id == run_id, Event.kind == InstanceState.RENTING.value
    )
    alive = select(func.count(Instance.pk)).where(
        Instance.run_id == run_id, Instance.state.in_(sorted(ALIVE_STATES))
    )
    jobs, warm_jobs = count_jobs(
        ((lease.rule, lease.job_id, lease.attempt), lease.warm)
        for lease in run_leases(store, run_id)
    )
    with store.sessions.read() as session:
        return {
            "instances_rented": session.scalar(rented) or 0,
            "jobs": jobs,
            "warm_jobs": warm_jobs,
            "instances_alive": session.scalar(alive) or 0,
        }


__all__ = [
    "DestroyReason",
    "EventRecord",
    "Instance",
    "InstanceRecord",
    "InstanceState",
    "Lease",
    "LeaseOutcome",
    "Run",
    "RunRecord",
    "Store",
]


# Failed machines ---------------------------------------------------------


def record_failed_machine(
    store: Store,
    *,
    account: str,
    machine_id: int,
    run_id: str | None,
    instance_vast_id: int | None,
    detail: str,
) -> None:
    """Remember that ``machine_id`` failed an instance, so rentals skip it."""
    with store.sessions.write() as session:
        session.add(
            FailedMachine(
                account=account,
                machine_id=machine_id,
                at=store.clock(),
                run_id=run_id,
                instance_vast_id=instance_vast_id,
                detail=detail[:2000],
            )
        )


@dataclass(frozen=True)
class FailedMachineRecord:
    """The latest failure of one avoided machine."""

    machine_id: int
    account: str
    at: float
    failures: int
    instance_vast_id: int | None
    detail: str


def avoided_machines(
    store: Store, account: str | None, *, within: float = MACHINE_MEMORY_SECONDS
) -> list[FailedMachineRecord]:
    """Return the machines that failed within the last ``within`` seconds,
    latest failure first; every account's when ``account`` is None."""
    since = store.clock() - within
    statement = select(FailedMachine).where(FailedMachine.at >= since)
    if account is not None:
        statement = statement.where(FailedMachine.account == account)
    latest: dict[tuple[str, int], FailedMachineRecord] = {}
    with store.sessions.read() as session:
        for row in session.scalars(statement.order_by(FailedMachine.at)):
            key = (row.account, row.machine_id)
            before = latest.get(key)
            latest[key] = FailedMachineRecord(
                machine_id=row.machine_id,
                account=row.account,
                at=row.at,
                failures=1 if before is None else before.failures + 1,
                instance_vast_id=row.instance_vast_id,
                detail=row.detail,
            )
    return sorted(latest.values(), key=lambda r: r.at, reverse=True)


def failed_machines(
    store: Store, account: str, *, within: float = MACHINE_MEMORY_SECONDS
) -> dict[int, str]:
    """Return {machine id: detail of its latest failure} for the last ``within`` s."""
    return {
        r.machine_id: r.detail for r in avoided_machines(store, account, within=within)
    }


def forget_failed_machines(
    store: Store,
    account: str | None,
    machine_ids: Iterable[int] | None = None,
    *,
    run_id: str | None = None,
) -> int:
    """Delete the failure rows of ``machine_ids`` (all when None), of one run
    when ``run_id`` is given; return how many."""
    statement = delete(FailedMachine)
    if account is not None:
        statement = statement.where(FailedMachine.account == account)
    if run_id is not None:
        statement = statement.where(FailedMachine.run_id == run_id)
    if machine_ids is not None:
        statement = statement.where(FailedMachine.machine_id.in_(list(machine_ids)))
    with store.sessions.write() as session:
        return session.execute(statement).rowcount or 0
