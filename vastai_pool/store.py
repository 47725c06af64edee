"""Reads and writes of the pool database; the only module that changes rows.

INTERFACE STUB, to be implemented. Every function takes an open ``Store``.
Times are epoch seconds from ``Store.clock`` (monkeypatched in tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vastai_pool.models import (
    DestroyReason,
    Instance,
    InstanceState,
    Lease,
    LeaseOutcome,
    Run,
)
from vastai_pool.requirements import Hardware, Requirements


def account_id(api_url: str, api_key: str) -> str:
    """Return the account key stored in rows: the API URL and a sha256 of the key.

    Two API keys, or one key against two API URLs, never share instances.
    The key itself is never stored.
    """
    raise NotImplementedError


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/snakemake-vastai/pool.sqlite`` (``~/.local/share`` default)."""
    raise NotImplementedError


class Store:
    """An open pool database: SQLite in WAL mode, upgraded by Alembic on open.

    A corrupt or unreadable file raises ``PoolDatabaseError`` naming the path
    and what to do; it is never deleted or overwritten.
    """

    clock: Callable[[], float]

    def __init__(self, path: Path) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


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


# Runs ---------------------------------------------------------------------


def start_run(
    store: Store,
    *,
    account: str,
    workdir: str,
    budget_usd: float | None,
    linger_seconds: float,
) -> str:
    """Insert a run row for this process (host, pid) and return its id."""
    raise NotImplementedError


def heartbeat(store: Store, run_id: str) -> None: ...


def end_run(store: Store, run_id: str) -> None: ...


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
    raise NotImplementedError


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
    ``destroyed_at``) and append an event, in one transaction."""
    raise NotImplementedError


def get_instance(store: Store, pk: int) -> InstanceRecord: ...


def list_instances(
    store: Store, *, account: str | None = None, include_destroyed: bool = False
) -> list[InstanceRecord]: ...


def mark_sources(store: Store, pk: int, checksum: str) -> None:
    """Record that a source archive is unpacked on the instance."""


def record_files(store: Store, pk: int, files: Iterable[tuple[str, int, str]]) -> None:
    """Upsert (path, size, sha256) rows of files now present on the instance."""


def files_on(store: Store, pk: int) -> dict[str, tuple[int, str]]:
    """Return {path: (size, sha256)} of what the instance holds."""
    raise NotImplementedError


def count_alive(store: Store, account: str) -> int: ...


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
    (instance, lease id). Return None when none matches."""
    raise NotImplementedError


def lease_new(
    store: Store, pk: int, *, run_id: str, rule: str, job_id: int, attempt: int
) -> int:
    """Insert a lease on a freshly booted instance (``warm`` false) and mark it busy."""
    raise NotImplementedError


def end_lease(
    store: Store,
    lease_id: int,
    outcome: LeaseOutcome,
    exit_code: int | None,
    *,
    instance_state: InstanceState,
) -> None:
    """End a lease and move its instance to ``instance_state`` (idle after a
    clean finish), in one transaction."""


def lease_heartbeat(store: Store, lease_id: int) -> None: ...


def run_leases(store: Store, run_id: str) -> list[Lease]: ...


def run_summary_counts(store: Store, run_id: str) -> dict[str, int]:
    """Return {"instances_rented", "jobs", "warm_jobs", "instances_alive"}."""
    raise NotImplementedError


__all__ = [
    "Instance",
    "Lease",
    "Run",
    "LeaseOutcome",
    "InstanceState",
    "DestroyReason",
]
