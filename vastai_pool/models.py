"""Rows of the pool database, as SQLAlchemy 2.x mapped classes.

Only ``vastai_pool.store`` writes these rows; every state change of an
instance goes through ``store.transition``, which also appends an event.
Times are Unix epoch seconds (float) in UTC.
"""

from __future__ import annotations

import enum

from sqlalchemy import Boolean, Enum, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class InstanceState(enum.StrEnum):
    """Lifecycle of a rented instance, as the pool tracks it.

    ``renting`` is written before the create call, so a crash in between
    leaves a row that reconciliation can match by label.
    """

    RENTING = "renting"
    BOOTING = "booting"
    IDLE = "idle"
    BUSY = "busy"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    LOST = "lost"
    KEPT = "kept"


ALIVE_STATES = frozenset(
    {
        InstanceState.RENTING,
        InstanceState.BOOTING,
        InstanceState.IDLE,
        InstanceState.BUSY,
        InstanceState.DESTROYING,
        InstanceState.KEPT,
    }
)


class DestroyReason(enum.StrEnum):
    """Reason the pool destroyed an instance or stopped tracking it."""

    IDLE_TIMEOUT = "idle_timeout"
    RUN_ENDED = "run_ended"
    BOOT_FAILED = "boot_failed"
    RENT_FAILED = "rent_failed"
    EVICTED = "evicted"
    BUDGET = "budget"
    INTERRUPTED = "interrupted"
    GC = "gc"
    GONE = "gone"
    JOB_TIMEOUT = "job_timeout"


class LeaseOutcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"
    CANCELLED = "cancelled"


def _enum_column(enum_class: type[enum.StrEnum], length: int) -> Enum:
    # Stored as the plain value in a VARCHAR, without a CHECK constraint, so a
    # new member needs no migration; rows load as enum members.
    return Enum(
        enum_class,
        native_enum=False,
        create_constraint=False,
        length=length,
        values_callable=lambda members: [member.value for member in members],
    )


class Run(Base):
    """One Snakemake process (or one ``vastai-pool`` command) using the pool."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account: Mapped[str] = mapped_column(String(200))
    workdir: Mapped[str] = mapped_column(Text)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, default=None)
    budget_usd: Mapped[float | None] = mapped_column(Float, default=None)
    linger_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    # Seconds an idle instance of this run stays warm; None when not recorded.
    idle_timeout_seconds: Mapped[float | None] = mapped_column(Float, default=None)


class Instance(Base):
    """A rented (or about to be rented) Vast.ai instance."""

    __tablename__ = "instances"

    # Local key, so that a row exists before Vast.ai assigns its id.
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vast_id: Mapped[int | None] = mapped_column(Integer, default=None, index=True)
    label: Mapped[str] = mapped_column(String(120), unique=True)
    account: Mapped[str] = mapped_column(String(200), index=True)
    state: Mapped[InstanceState] = mapped_column(
        _enum_column(InstanceState, 16), index=True
    )
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), default=None)
    offer_id: Mapped[int | None] = mapped_column(Integer, default=None)
    machine_id: Mapped[int | None] = mapped_column(Integer, default=None)
    image: Mapped[str] = mapped_column(Text)
    extra_query: Mapped[str] = mapped_column(Text, default="")
    num_gpus: Mapped[int] = mapped_column(Integer, default=0)
    gpu_name: Mapped[str] = mapped_column(String(80), default="")
    cpu_cores_effective: Mapped[float] = mapped_column(Float, default=0.0)
    cpu_ram_mb: Mapped[float] = mapped_column(Float, default=0.0)
    disk_gb: Mapped[float] = mapped_column(Float, default=0.0)
    dph_total: Mapped[float] = mapped_column(Float, default=0.0)
    # The two parts of dph_total, in $/h: the rental price (``dph_base``, or
    # the bid), billed only while the instance runs, and the storage of its
    # allocated disk (``storage_cost`` $/GB/month x disk / 720), billed from
    # creation to destroy. None on rows written before they were recorded.
    dph_base: Mapped[float | None] = mapped_column(Float, default=None)
    storage_dph: Mapped[float | None] = mapped_column(Float, default=None)
    reliability: Mapped[float] = mapped_column(Float, default=0.0)
    datacenter: Mapped[bool] = mapped_column(Boolean, default=False)
    country: Mapped[str | None] = mapped_column(String(8), default=None)
    ssh_host: Mapped[str | None] = mapped_column(String(255), default=None)
    ssh_port: Mapped[int | None] = mapped_column(Integer, default=None)
    host_key: Mapped[str | None] = mapped_column(Text, default=None)
    rented_at: Mapped[float] = mapped_column(Float)
    # When the API first reported the instance running (the rental price
    # starts then); ready_at is later, after SSH and preparation.
    running_at: Mapped[float | None] = mapped_column(Float, default=None)
    ready_at: Mapped[float | None] = mapped_column(Float, default=None)
    last_busy_at: Mapped[float | None] = mapped_column(Float, default=None)
    idle_since: Mapped[float | None] = mapped_column(Float, default=None)
    destroyed_at: Mapped[float | None] = mapped_column(Float, default=None)
    destroy_reason: Mapped[DestroyReason | None] = mapped_column(
        _enum_column(DestroyReason, 32), default=None
    )
    keep: Mapped[bool] = mapped_column(Boolean, default=False)
    # When a lingering idle instance is to be destroyed (epoch seconds).
    linger_until: Mapped[float | None] = mapped_column(Float, default=None)
    # Source archives unpacked on the instance, as "<work dir>/<sha256>" words.
    sources: Mapped[str] = mapped_column(Text, default="")


class Lease(Base):
    """One job holding one instance, from placement to release."""

    __tablename__ = "leases"
    __table_args__ = (Index("ix_leases_open", "instance_pk", "ended_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.pk"))
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    rule: Mapped[str] = mapped_column(String(255))
    job_id: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    # True when the instance had run an earlier job, i.e. the job found it warm.
    warm: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, default=None)
    outcome: Mapped[LeaseOutcome | None] = mapped_column(
        _enum_column(LeaseOutcome, 16), default=None
    )
    exit_code: Mapped[int | None] = mapped_column(Integer, default=None)


class InstanceFile(Base):
    """A file the pool placed on an instance, so it is not uploaded twice."""

    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_instance_path", "instance_pk", "path", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.pk"))
    # Relative to the login's home on the instance, work directory included.
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))


class Event(Base):
    """Append-only history of what happened to an instance and why."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    instance_pk: Mapped[int | None] = mapped_column(
        ForeignKey("instances.pk"), default=None, index=True
    )
    run_id: Mapped[str | None] = mapped_column(String(32), default=None)
    # The new state for a state change, else a short tag of what happened.
    kind: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[InstanceState | None] = mapped_column(
        _enum_column(InstanceState, 16), default=None
    )
    reason: Mapped[DestroyReason | None] = mapped_column(
        _enum_column(DestroyReason, 32), default=None
    )
    detail: Mapped[str] = mapped_column(Text, default="")


class PoolMeta(Base):
    """Facts about the pool database itself, such as its ``pool_id``."""

    __tablename__ = "pool_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class FailedMachine(Base):
    """A Vast.ai machine that failed an instance of this pool, and why.

    Rentals skip machines with a recent row, in this run and in later runs
    on the same database (``store.MACHINE_MEMORY_SECONDS``).
    """

    __tablename__ = "failed_machines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account: Mapped[str] = mapped_column(String(64))
    machine_id: Mapped[int] = mapped_column(Integer)
    at: Mapped[float] = mapped_column(Float)
    run_id: Mapped[str | None] = mapped_column(String(32), default=None)
    instance_vast_id: Mapped[int | None] = mapped_column(Integer, default=None)
    # What failed, in the words of the pool's log (e.g. the boot's status_msg).
    detail: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (Index("ix_failed_machines_account_at", "account", "at"),)
