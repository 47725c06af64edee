"""The pool manager: the one object the Snakemake plugin talks to.

INTERFACE STUB: the dataclasses are final; the ``Pool`` methods are to be
implemented by the lifecycle work. The plugin codes against exactly these
signatures.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from vastai_pool.requirements import Requirements


@dataclass(frozen=True)
class PoolConfig:
    """Settings of one run of the pool, resolved by the plugin or the CLI.

    ``api_key`` is never logged or stored; the database keeps only a hash.
    Durations are in seconds, money in US dollars.
    """

    api_url: str
    api_key: str
    db_path: Path
    workdir: Path
    # Local directory for remote job logs (``.snakemake/vastai/logs``).
    logs_dir: Path
    # Directory of the pool's SSH key pair (created with mode 0600).
    key_dir: Path
    idle_timeout: float = 300.0
    linger: float = 0.0
    max_instances: int | None = None
    budget: float | None = None
    keep_instances: bool = False
    boot_timeout: float = 1800.0
    # Seconds between status checks of booting instances and running jobs.
    poll_interval: float = 2.0
    # Environment variables passed to every job (never the API key).
    job_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobSpec:
    """One Snakemake job, in the pool's terms.

    Paths are relative to ``PoolConfig.workdir`` locally and to the run's
    working directory on the instance. ``inputs`` may name directories.
    ``outputs`` are fetched back after success (missing ones are skipped, so
    Snakemake reports them as missing), ``logs`` after success and failure.
    """

    rule: str
    job_id: int
    attempt: int
    requirements: Requirements
    command: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    logs: tuple[str, ...]
    # Local path of the workflow's source archive (tar.xz) and its sha256.
    source_archive: Path | None
    source_checksum: str | None
    # Minutes, from Snakemake's ``runtime`` resource; None for no limit.
    runtime_minutes: float | None = None


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class JobStatus:
    """What ``Pool.status`` reports about a submitted job.

    ``message`` explains a failure in words a user can act on, ``log_path``
    is the local copy of the remote log, ``instance_id`` the Vast.ai id that
    ran it.
    """

    state: JobState
    message: str = ""
    exit_code: int | None = None
    log_path: Path | None = None
    instance_id: int | None = None


@dataclass(frozen=True)
class RunSummary:
    """Totals of one run, printed at its end."""

    run_id: str
    instances_rented: int
    jobs: int
    warm_jobs: int
    instances_alive: int
    billed_usd: float


class Pool:
    """A pool of warm instances shared by the jobs of one run.

    ``open`` registers the run and starts the reaper; ``submit`` returns at
    once and the job proceeds on a worker thread (place, ship, run, fetch,
    release); ``status`` never blocks on the network; ``close`` destroys
    what is idle unless the run keeps or lingers it, and returns the summary.
    A job's lease ends and its instance becomes idle before ``status``
    reports it finished, so the next job finds the instance warm.
    """

    def __init__(self, config: PoolConfig) -> None:
        self.config = config

    def open(self) -> str:
        """Register the run in the database, start timers; return the run id."""
        raise NotImplementedError

    def check_market(self, requirements: Requirements) -> None:
        """Raise ``NoMatchingOffer`` (carrying the query) when no idle
        instance matches and no offer on the market does; rents nothing.
        Results are cached per requirements for the run."""
        raise NotImplementedError

    def submit(self, spec: JobSpec) -> str:
        """Queue a job; return a handle for ``status`` and ``cancel``."""
        raise NotImplementedError

    def status(self, handle: str) -> JobStatus:
        raise NotImplementedError

    def cancel(self, handles: list[str]) -> None:
        """Stop the given jobs and destroy the instances they were running on."""
        raise NotImplementedError

    def close(self, *, interrupted: bool = False) -> RunSummary:
        """End the run; with ``interrupted``, destroy everything not kept."""
        raise NotImplementedError
