"""The pool manager: the one object the Snakemake plugin talks to.

The dataclasses are the plugin's interface. ``Pool`` places each job on a
warm instance or a new rental, runs it through ``vastai_pool.remote`` and
keeps the database in step.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import signal
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from vastai_pool import inventory, reap
from vastai_pool import store as db
from vastai_pool.api import Offer, VastApi, VastStatus
from vastai_pool.budget import BudgetSpent, BudgetView, Hold, assess
from vastai_pool.costs import run_costs
from vastai_pool.errors import NoMatchingOffer, PoolError, SshError
from vastai_pool.models import DestroyReason, InstanceState, LeaseOutcome
from vastai_pool.reaper import Timers, budget_check_seconds, start_timers
from vastai_pool.remote import (
    JobResult,
    JobRunner,
    local_digests,
    local_log_path,
    remote_work_dir,
)
from vastai_pool.rental import (
    MarketBusy,
    OfferClaims,
    RentalCancelled,
    RentalContext,
    destroy,
    rent,
    satisfies,
)
from vastai_pool.requirements import Requirements
from vastai_pool.ssh import Connection, Endpoint, ensure_keypair
from vastai_pool.status_board import StatusBoard

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from vastai_pool.store import InstanceRecord, Store

logger = logging.getLogger(__name__)


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
    # Pip requirements (``name==version``) each new instance gets besides
    # Snakemake, e.g. the storage plugins the workflow uses.
    packages: tuple[str, ...] = ()


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
    """Status of a submitted job, as ``Pool.status`` returns it.

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


# States of this run's instances that count against ``max_instances`` once a
# rental has left the in-flight counter.
_COUNTED_STATES = frozenset(
    {InstanceState.IDLE, InstanceState.BUSY, InstanceState.DESTROYING}
)
# API states of an instance whose host, not the job, failed.
_HOST_DOWN_STATES = frozenset({VastStatus.OFFLINE.value, VastStatus.UNKNOWN.value})
# Seconds a job waits, at most, when every matching offer is being rented
# by other jobs of the run, before it searches again.
_MARKET_BUSY_WAIT = 30.0
# Placements of one job when its instance is lost before the job starts.
_PLACEMENTS = 3
# Seconds ``cancel`` waits for a cancelled job's worker to clean up.
_CANCEL_WAIT = 120.0
# The budget timer stops running jobs once the spend plus this many timer
# intervals of billing reaches the budget: one interval for the timer's own
# lateness, one for destroying the instances.
_BUDGET_LOOKAHEAD_INTERVALS = 2.0


class _Cancelled(Exception):
    """A job was cancelled while it waited for an instance."""


@dataclass
class _Job:
    handle: str
    spec: JobSpec
    status: JobStatus
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future[None] | None = None
    runner: JobRunner | None = None
    # Replaces the job's failure message when the pool itself stopped the job
    # (budget spent, SIGTERM).
    stop_message: str | None = None


class Pool:
    """A pool of warm instances shared by the jobs of one run.

    ``open`` registers the run and starts the timers. ``submit`` returns at
    once, and the job proceeds on a worker thread (place, ship, run, fetch,
    release). ``status`` never blocks on the network. ``close`` destroys
    what is idle unless the run keeps or lingers it, and returns the summary.
    A job's lease ends and its instance becomes idle before ``status``
    reports it finished, so the next job finds the instance warm.
    """

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.run_id = ""
        self.account = ""
        self._api: VastApi | None = None
        self._status_board: StatusBoard | None = None
        # Undoes the SIGINT shield that ``cancel`` or ``close`` installed.
        self._restore_sigint: Callable[[], None] | None = None
        self._store: Store | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._jobs: dict[str, _Job] = {}
        self._jobs_lock = threading.Lock()
        # Guards leasing, the in-flight rental count, eviction and reaping, so
        # that this process never destroys an instance it is about to lease.
        self._placement = threading.Condition()
        self._renting = 0
        self._connections: dict[int, Connection] = {}
        self._failed_machines: set[int] = set()
        # Guards ``_failed_machines`` against the rentals of the run's jobs.
        self._machine_lock = threading.Lock()
        self._claims = OfferClaims()
        self._image_failures: dict[str, set[int]] = {}
        # API state of each instance when its SSH connection last dropped.
        self._host_states: dict[int, str] = {}
        self._market: dict[Requirements, NoMatchingOffer | None] = {}
        self._labels = itertools.count(1)
        self._summary: RunSummary | None = None
        self._closing = False
        self._run_started_at = 0.0
        # Budget state, guarded by ``_placement``: each placed job's hold, and
        # the message jobs fail with once the budget is spent.
        self._holds: dict[str, Hold] = {}
        self._budget_stop: str | None = None
        self._budget_interval = budget_check_seconds(config.poll_interval)
        # Requirements of the jobs waiting for room under max-instances.
        self._waiting: dict[str, Requirements] = {}
        self._previous_sigterm: object = None
        self._sigterm_installed = False

    # Lifecycle --------------------------------------------------------------

    @property
    def api(self) -> VastApi:
        if self._api is None:
            raise PoolError("the pool is not open; call Pool.open() first")
        return self._api

    @property
    def store(self) -> Store:
        if self._store is None:
            raise PoolError("the pool is not open; call Pool.open() first")
        return self._store

    def open(self) -> str:
        """Register the run in the database, start timers; return the run id."""
        config = self.config
        self._api = VastApi(config.api_url, config.api_key)
        self._status_board = StatusBoard(self._api, config.poll_interval)
        self._store = db.Store(config.db_path)
        self.account = db.account_id(config.api_url, config.api_key)
        self.run_id = db.start_run(
            self._store,
            account=self.account,
            workdir=str(config.workdir),
            budget_usd=config.budget,
            linger_seconds=config.linger,
            idle_timeout=config.idle_timeout,
        )
        # Jobs waiting for a free instance hold a thread, so size generously.
        workers = max(32, 4 * (config.max_instances or 0))
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="vastai-pool-job"
        )
        self._run_started_at = db.get_run(self._store, self.run_id).started_at
        remembered = db.failed_machines(self._store, self.account)
        if remembered:
            self._failed_machines.update(remembered)
            logger.info(
                "avoiding %d machine(s) that failed in the last %.0f h: %s",
                len(remembered),
                db.MACHINE_MEMORY_SECONDS / 3600,
                ", ".join(str(m) for m in sorted(remembered)),
            )
        self._scheduler = start_timers(self._timers())
        self._install_sigterm_handler()
        logger.info("pool run %s opened on %s", self.run_id, config.api_url)
        return self.run_id

    def _timers(self) -> Timers:
        # Crash recovery and reconciliation live in ``inventory``; a build
        # without them still runs the pool's own timers.
        recover = getattr(inventory, "recover_stale_runs", None)
        reconcile = getattr(inventory, "reconcile", None)
        return Timers(
            reap_idle=self._reap_idle,
            heartbeat=self._heartbeat,
            idle_timeout=self.config.idle_timeout,
            budget=self._check_budget if self.config.budget is not None else None,
            budget_interval=self._budget_interval,
            recover_stale_runs=(
                None
                if recover is None
                else lambda: recover(self.store, self.api, self.account)
            ),
            reconcile=(
                None
                if reconcile is None
                else lambda: reconcile(self.store, self.api, self.account)
            ),
        )

    def check_market(self, requirements: Requirements) -> None:
        """Raise ``NoMatchingOffer`` (carrying the query) when no idle
        instance matches and no offer on the market does; rents nothing.
        Results are cached per requirements for the run."""
        if requirements in self._market:
            cached = self._market[requirements]
            if cached is not None:
                raise cached
            return
        for record in db.list_instances(self.store, account=self.account):
            usable = record.state == InstanceState.IDLE or (
                record.run_id == self.run_id
                and record.state in (InstanceState.BUSY, InstanceState.BOOTING)
            )
            if usable and satisfies(record, requirements):
                return
        query = requirements.offer_query()
        offers = self.api.search_offers(
            query, order=requirements.order, disk_gb=requirements.disk_gb, limit=8
        )
        if offers:
            self._market[requirements] = None
            return
        error = NoMatchingOffer(
            f"no Vast.ai offer matches {query!r} and no idle instance of the "
            "pool does. Relax the job's resources (gpu_model, gpu, mem_mb, "
            "disk_mb) or --vastai-search-query, --vastai-max-price, "
            "--vastai-reliability, --vastai-geolocation.",
            query=query,
        )
        self._market[requirements] = error
        raise error

    def submit(self, spec: JobSpec) -> str:
        """Queue a job; return a handle for ``status`` and ``cancel``."""
        if self._executor is None:
            raise PoolError("the pool is not open; call Pool.open() first")
        if self._closing:
            raise PoolError(
                f"the pool of run {self.run_id} is closing, so job {spec.job_id} "
                f"(rule {spec.rule}) was not submitted"
            )
        # Snakemake installs its own SIGTERM handler after building the
        # executor, so the pool's handler is put back in front of it here.
        self._install_sigterm_handler()
        handle = f"{spec.rule}-{spec.job_id}-{spec.attempt}-{uuid.uuid4().hex[:8]}"
        job = _Job(handle, spec, JobStatus(JobState.QUEUED))
        with self._jobs_lock:
            self._jobs[handle] = job
        try:
            job.future = self._executor.submit(self._run_job, job)
        except RuntimeError as exc:
            with self._jobs_lock:
                del self._jobs[handle]
            raise PoolError(
                f"job {spec.job_id} (rule {spec.rule}) was not submitted: {exc}"
            ) from exc
        return handle

    def status(self, handle: str) -> JobStatus:
        """Return the job's last known status, from memory only."""
        with self._jobs_lock:
            job = self._jobs.get(handle)
        if job is None:
            raise KeyError(f"unknown job handle {handle!r}")
        return job.status

    def cancel(self, handles: list[str]) -> None:
        """Stop the given jobs and destroy the instances they were running on.

        From here until ``close`` has finished, SIGINT only logs a warning: a
        repeated Ctrl-C would otherwise interrupt the destroys and leave
        instances billing.
        """
        if self._restore_sigint is None:
            self._restore_sigint = self._shield_sigint()
        with self._jobs_lock:
            jobs = [self._jobs[h] for h in handles if h in self._jobs]
        for job in jobs:
            job.cancelled.set()
        with self._placement:
            self._placement.notify_all()
        futures = [job.future for job in jobs if job.future is not None]
        if futures:
            wait_futures(futures, timeout=_CANCEL_WAIT)

    def close(self, *, interrupted: bool = False) -> RunSummary:
        """End the run; with ``interrupted``, destroy everything not kept."""
        if self._summary is not None:
            return self._summary
        if self._store is None:
            raise PoolError("the pool was never opened, so there is no run to close")
        self._closing = True
        if self._restore_sigint is None:
            self._restore_sigint = self._shield_sigint()
        try:
            if self._scheduler is not None:
                self._scheduler.shutdown(wait=True)
            if interrupted:
                self.cancel(list(self._jobs))
            if self._executor is not None:
                self._executor.shutdown(wait=True)

            self._release_instances(interrupted=interrupted)
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()

            db.end_run(self.store, self.run_id)
            summary = self._run_summary()
            self._summary = summary
            self._hand_lingering_to_reaper()
            self.store.close()
        finally:
            self._restore_sigint()
            self._restore_sigint = None
            self._restore_sigterm_handler()
        logger.info(
            "pool run %s ended: %d jobs (%d on warm instances), %d instances "
            "rented, %d alive, about $%.4f billed",
            summary.run_id,
            summary.jobs,
            summary.warm_jobs,
            summary.instances_rented,
            summary.instances_alive,
            summary.billed_usd,
        )
        return summary

    def _hand_lingering_to_reaper(self) -> None:
        """Start ``vastai-pool reap`` when idle instances outlive the run.

        This process is about to exit, so a detached reaper destroys each
        lingering instance at its deadline unless a later run adopts it.
        """
        if not db.lingering_instances(self.store, account=self.account):
            return
        try:
            reap.spawn_reaper(
                self.config.db_path, self.config.api_url, self.config.api_key
            )
        except OSError as exc:
            logger.error(
                "Could not start the reaper for lingering instances (%s); run "
                "`vastai-pool reap --db %s` or `vastai-pool gc --db %s` to "
                "destroy them.",
                exc,
                self.config.db_path,
                self.config.db_path,
            )
            return
        logger.info(
            "Lingering instances are left to a detached `vastai-pool reap`; its "
            "log is %s",
            reap.log_path(Path(self.config.db_path).expanduser().resolve()),
        )

    def _release_instances(self, *, interrupted: bool) -> None:
        config = self.config
        now = self.store.clock()
        reason = DestroyReason.INTERRUPTED if interrupted else DestroyReason.RUN_ENDED
        with self._placement:
            for record in db.list_instances(self.store, account=self.account):
                if record.run_id != self.run_id or record.state == InstanceState.KEPT:
                    continue
                if config.keep_instances or record.keep:
                    if record.state == InstanceState.IDLE:
                        db.transition(
                            self.store,
                            record.pk,
                            InstanceState.KEPT,
                            why="run ended with keep-instances set",
                            keep=True,
                        )
                        logger.info("kept instance %s alive", record.vast_id)
                        continue
                if (
                    config.linger > 0
                    and not interrupted
                    and record.state == InstanceState.IDLE
                ):
                    db.transition(
                        self.store,
                        record.pk,
                        InstanceState.IDLE,
                        why=f"run ended, lingering for {config.linger:g} s",
                        linger_until=now + config.linger,
                    )
                    logger.info(
                        "instance %s lingers for %g s for the next run",
                        record.vast_id,
                        config.linger,
                    )
                    continue
                self._destroy_claimed(record, reason=reason, why="run ended")

    def _run_summary(self) -> RunSummary:
        counts = db.run_summary_counts(self.store, self.run_id)
        # The same accounting as the end-of-run table and `vastai-pool report`:
        # an instance adopted from another run counts from its adoption on.
        costs = run_costs(self.store, self.run_id)
        return RunSummary(
            run_id=self.run_id,
            instances_rented=costs.instances_rented,
            jobs=counts["jobs"],
            warm_jobs=counts["warm_jobs"],
            instances_alive=counts["instances_alive"],
            billed_usd=costs.total_usd,
        )

    # Timers -----------------------------------------------------------------
    # They run through ``reaper.start_timers``, which logs their errors.

    def _heartbeat(self) -> None:
        db.heartbeat(self.store, self.run_id)

    def _reap_idle(self) -> None:
        """Destroy this run's instances idle past the timeout, and lingering
        instances of any run whose linger deadline passed."""
        now = self.store.clock()
        with self._placement:
            for record in db.list_instances(self.store, account=self.account):
                if record.state != InstanceState.IDLE:
                    continue
                if record.linger_until is not None:
                    if record.linger_until < now:
                        self._destroy_claimed(
                            record,
                            reason=DestroyReason.IDLE_TIMEOUT,
                            why="linger time after its run is over",
                        )
                    continue
                idle_for = now - (record.idle_since or now)
                if record.run_id == self.run_id and idle_for > self.config.idle_timeout:
                    self._destroy_claimed(
                        record,
                        reason=DestroyReason.IDLE_TIMEOUT,
                        why=f"idle for {idle_for:.0f} s, over the idle "
                        f"timeout of {self.config.idle_timeout:g} s",
                    )

    # Budget -----------------------------------------------------------------

    def _budget_view(self) -> BudgetView | None:
        """Return the run's spend and commitments; call with ``_placement`` held."""
        if self.config.budget is None:
            return None
        records = db.list_instances(
            self.store, account=self.account, include_destroyed=True
        )
        return assess(
            records,
            self._holds,
            run_id=self.run_id,
            budget=self.config.budget,
            run_started_at=self._run_started_at,
            now=self.store.clock(),
            interval=self._budget_interval,
        )

    def _admit(self, job: _Job, offer: Offer) -> None:
        """Allow renting ``offer`` for ``job`` within the budget and hold its cost.

        A rental commits the offer's ``dph_total`` for the job's runtime, or
        for one budget timer interval when the job has none. The first refused
        rental ends renting for the run.
        """
        runtime = job.spec.runtime_minutes
        hold = Hold(offer.hardware.dph_total, runtime * 60 if runtime else None)
        with self._placement:
            if self._budget_stop is not None:
                raise BudgetSpent(self._budget_stop)
            view = self._budget_view()
            if view is not None:
                cost = hold.dph_total * hold.horizon(0.0, self._budget_interval) / 3600
                if view.projected + cost > view.budget:
                    self._exhaust_budget(
                        view.message(
                            f"${cost:.6f} for renting offer {offer.id} at "
                            f"${hold.dph_total:.3f}/h",
                            more=cost,
                        )
                    )
                    raise BudgetSpent(self._budget_stop or view.message())
            self._holds[job.handle] = hold

    def _hold_instance(self, job: _Job, record: InstanceRecord) -> None:
        """Start the budget hold of a job that got its instance."""
        runtime = job.spec.runtime_minutes
        with self._placement:
            self._holds[job.handle] = Hold(
                record.hardware.dph_total,
                runtime * 60 if runtime else None,
                started_at=self.store.clock(),
                pk=record.pk,
            )

    def _exhaust_budget(self, message: str) -> None:
        """Stop renting for the run and destroy its idle instances; call with
        ``_placement`` held. Running jobs go on."""
        if self._budget_stop is None:
            self._budget_stop = message
            logger.warning("no more rentals in run %s: %s", self.run_id, message)
            self._placement.notify_all()
        self._destroy_idle_of_run(DestroyReason.BUDGET, "the run's budget is spent")

    def _destroy_idle_of_run(self, reason: DestroyReason, why: str) -> None:
        for record in self._alive_of_run():
            if record.state == InstanceState.IDLE:
                self._destroy_claimed(record, reason=reason, why=why)

    def _check_budget(self) -> None:
        """Budget timer: stop renting once the spend plus what running jobs
        commit reaches the budget, and stop the running jobs once the spend
        itself is about to reach it.

        Stopping running jobs keeps the bill within the budget plus about
        one timer interval of the run's instances, also for jobs without a
        ``runtime`` resource, whose commitment is only one interval.
        """
        with self._placement:
            view = self._budget_view()
            if view is None:
                return
            lookahead = _BUDGET_LOOKAHEAD_INTERVALS * self._budget_interval
            upcoming = view.rate * lookahead / 3600
            imminent = view.spent + upcoming >= view.budget
            if imminent and view.rate > 0:
                # The running instances alone would pass the budget before
                # the check after next, so the message counts that billing.
                message = view.message(
                    f"${upcoming:.6f} billed by the running instances in the "
                    f"next {lookahead:g} s",
                    more=max(0.0, upcoming - view.committed),
                )
                self._exhaust_budget(message)
                self._stop_jobs_for_budget(message)
            elif view.projected >= view.budget:
                self._exhaust_budget(view.message())

    def _stop_jobs_for_budget(self, message: str) -> None:
        """Fail the running jobs and destroy every instance of the run that
        bills; call with ``_placement`` held."""
        logger.warning(
            "stopping the running jobs of run %s and destroying their instances: %s",
            self.run_id,
            message,
        )
        with self._jobs_lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.status.state in (JobState.QUEUED, JobState.RUNNING):
                job.stop_message = (
                    f"job {job.spec.job_id} (rule {job.spec.rule}) was stopped: "
                    f"{message}"
                )
                job.cancelled.set()
        for record in self._alive_of_run():
            # A row in ``renting`` has no Vast.ai id yet; its job's worker
            # destroys the instance once the create call returns.
            if record.state in (
                InstanceState.IDLE,
                InstanceState.BUSY,
                InstanceState.BOOTING,
            ):
                self._destroy_claimed(
                    record, reason=DestroyReason.BUDGET, why="the run's budget is spent"
                )

    # Signals ----------------------------------------------------------------

    def _install_sigterm_handler(self) -> None:
        """Put ``_on_sigterm`` in front of the current SIGTERM handler.

        Python runs signal handlers in the main thread only and lets only the
        main thread install them, so from other threads this does nothing.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGTERM)
        if getattr(current, "__self__", None) is self:
            return
        self._previous_sigterm = current
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm_installed = True

    def _restore_sigterm_handler(self) -> None:
        if not self._sigterm_installed:
            return
        if threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGTERM)
        if getattr(current, "__self__", None) is self:
            previous = self._previous_sigterm
            signal.signal(
                signal.SIGTERM, previous if previous is not None else signal.SIG_DFL
            )
        self._sigterm_installed = False

    def _shield_sigint(self) -> Callable[[], None]:
        """Make SIGINT log a warning instead of interrupting ``close``, so a
        second Ctrl-C does not leave instances billing; return the undo."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def warn(signum: int, frame: FrameType | None) -> None:
            logger.warning(
                "the pool is destroying the instances of run %s; wait for it, or "
                "kill the process and run 'vastai-pool gc'",
                self.run_id,
            )

        signal.signal(signal.SIGINT, warn)

        def restore() -> None:
            signal.signal(
                signal.SIGINT, previous if previous is not None else signal.SIG_DFL
            )

        return restore

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        """Cancel every job of the run, then pass the signal on.

        Snakemake 9.27 handles SIGTERM by waiting for the running jobs to
        finish without cancelling them, while their instances bill. The cancel runs
        on its own thread because the handler interrupts the main thread,
        which may hold the pool's locks.
        """
        logger.warning(
            "received SIGTERM: cancelling the jobs of run %s and destroying "
            "their instances",
            self.run_id,
        )
        with self._jobs_lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.stop_message is None:
                job.stop_message = (
                    f"job {job.spec.job_id} (rule {job.spec.rule}) was cancelled "
                    "because the run received SIGTERM"
                )
        threading.Thread(
            target=self.cancel,
            args=([job.handle for job in jobs],),
            name="vastai-pool-sigterm",
            daemon=True,
        ).start()
        previous = self._previous_sigterm
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            # Without a handler of its own the program would have ended here;
            # unwinding lets its ``finally`` blocks close the pool.
            raise SystemExit(128 + signum)

    # Placement --------------------------------------------------------------

    def _rental_context(self, job: _Job) -> RentalContext:
        return RentalContext(
            api=self.api,
            store=self.store,
            run_id=self.run_id,
            account=self.account,
            key_dir=self.config.key_dir,
            work_dir=remote_work_dir(self.config.workdir),
            boot_timeout=self.config.boot_timeout,
            poll_interval=self.config.poll_interval,
            keep=self.config.keep_instances,
            next_label=self._next_label,
            admit=lambda offer: self._admit(job, offer),
            should_stop=job.cancelled.is_set,
            status_board=self._status_board,
            packages=self.config.packages,
            machine_failed=self._remember_machine,
            machine_lock=self._machine_lock,
            claims=self._claims,
            image_failures=self._image_failures,
            image_cleared=self._clear_machines,
        )

    def _clear_machines(self, machine_ids: list[int]) -> None:
        """Stop avoiding machines that were blamed for a wrong image."""
        removed = db.forget_failed_machines(
            self.store, self.account, machine_ids, run_id=self.run_id
        )
        logger.debug("forgot %d failures of machines %s", removed, machine_ids)

    def _remember_machine(self, machine_id: int, vast_id: int | None, why: str) -> None:
        """Avoid a machine for the rest of this run and, through the
        database, in later runs."""
        with self._machine_lock:
            self._failed_machines.add(machine_id)
        db.record_failed_machine(
            self.store,
            account=self.account,
            machine_id=machine_id,
            run_id=self.run_id,
            instance_vast_id=vast_id,
            detail=why,
        )

    def _next_label(self) -> str:
        return f"{self.store.label_prefix}{self.run_id[:8]}-{next(self._labels)}"

    def _alive_of_run(self) -> list[InstanceRecord]:
        return [
            r
            for r in db.list_instances(self.store, account=self.account)
            if r.run_id == self.run_id
        ]

    def _has_room(self) -> bool:
        if self.config.max_instances is None:
            return True
        # Rentals in flight are in renting or booting and counted in memory.
        settled = [r for r in self._alive_of_run() if r.state in _COUNTED_STATES]
        return len(settled) + self._renting < self.config.max_instances

    def _evict_for(self, requirements: Requirements) -> bool:
        """Destroy one idle instance of this run that can serve neither this
        job nor any other job waiting for room; call with ``_placement`` held."""
        wanted = [requirements, *self._waiting.values()]
        for record in self._alive_of_run():
            if record.state == InstanceState.IDLE and not any(
                satisfies(record, other) for other in wanted
            ):
                if self._destroy_claimed(
                    record,
                    reason=DestroyReason.EVICTED,
                    why="evicted to make room under max-instances",
                ):
                    return True
        return False

    def _place(self, job: _Job) -> tuple[InstanceRecord, int, Connection, bool]:
        """Lease a warm instance or rent one; return (record, lease, ssh, warm)."""
        try:
            return self._place_once_room(job)
        finally:
            with self._placement:
                self._waiting.pop(job.handle, None)

    def _place_once_room(
        self, job: _Job
    ) -> tuple[InstanceRecord, int, Connection, bool]:
        spec = job.spec
        requirements = spec.requirements
        # Keyed like the files table: by path on the instance, work dir included.
        work_dir = remote_work_dir(self.config.workdir)
        input_sizes = {
            f"{work_dir}/{relative}": digest
            for relative, digest in local_digests(
                self.config.workdir, spec.inputs
            ).items()
        }
        while True:
            if job.cancelled.is_set():
                raise _Cancelled
            with self._placement:
                if self._budget_stop is not None:
                    raise BudgetSpent(
                        f"job {spec.job_id} (rule {spec.rule}) was not placed: "
                        f"{self._budget_stop}"
                    )
                leased = db.lease_idle(
                    self.store,
                    run_id=self.run_id,
                    account=self.account,
                    requirements=requirements,
                    rule=spec.rule,
                    job_id=spec.job_id,
                    attempt=spec.attempt,
                    input_sizes=input_sizes,
                )
                if leased is None:
                    if not (self._has_room() or self._evict_for(requirements)):
                        self._waiting[job.handle] = requirements
                        self._placement.wait(timeout=self.config.poll_interval)
                        continue
                    self._waiting.pop(job.handle, None)
                    self._renting += 1
            if leased is not None:
                record, lease_id = leased
                self._hold_instance(job, record)
                try:
                    connection = self._connection_for(record)
                except SshError as exc:
                    explanation = self._explain_loss(record, str(exc))
                    why = (
                        f"warm instance {record.vast_id} cannot be reached "
                        f"({explanation}), so job {spec.job_id} "
                        f"(rule {spec.rule}) is placed elsewhere: {exc}"
                    )
                    logger.warning("%s", why)
                    self._lose(record, lease_id, why)
                    continue
                logger.info(
                    "job %s (rule %s) reuses warm instance %d",
                    spec.job_id,
                    spec.rule,
                    record.vast_id,
                )
                return record, lease_id, connection, True
            busy = False
            try:
                try:
                    rental = rent(
                        self._rental_context(job),
                        requirements,
                        failed_machines=self._failed_machines,
                    )
                except BudgetSpent as exc:
                    raise BudgetSpent(
                        f"job {spec.job_id} (rule {spec.rule}) was not placed: {exc}"
                    ) from exc
                except RentalCancelled as exc:
                    raise _Cancelled from exc
                except MarketBusy:
                    # The job waits for one of the instances being rented
                    # (or any that turns idle) instead of failing.
                    busy = True
                else:
                    try:
                        lease_id = db.lease_new(
                            self.store,
                            rental.record.pk,
                            run_id=self.run_id,
                            rule=spec.rule,
                            job_id=spec.job_id,
                            attempt=spec.attempt,
                        )
                    except BaseException:
                        rental.connection.close()
                        destroy(
                            self.api,
                            self.store,
                            db.get_instance(self.store, rental.record.pk),
                            reason=DestroyReason.BOOT_FAILED,
                            why="leasing the new instance failed",
                        )
                        raise
            finally:
                with self._placement:
                    self._renting -= 1
                    self._placement.notify_all()
            if busy:
                # Woken when a rental ends or an instance turns idle; the
                # timeout only bounds how stale the next search can be, so
                # waiting jobs do not search the market every poll.
                with self._placement:
                    self._placement.wait(timeout=_MARKET_BUSY_WAIT)
                continue
            self._track(rental.record.pk, rental.connection)
            record = db.get_instance(self.store, rental.record.pk)
            self._hold_instance(job, record)
            logger.info(
                "job %s (rule %s) runs on new instance %d",
                spec.job_id,
                spec.rule,
                record.vast_id,
            )
            return record, lease_id, rental.connection, False

    def _connection_for(self, record: InstanceRecord) -> Connection:
        connection = self._connections.get(record.pk)
        if connection is not None:
            # Returns at once on a live transport, reconnects a dropped one.
            connection.connect(attempts=3, delay=1.0)
            return connection
        if record.ssh_host is None or record.ssh_port is None:
            raise SshError(f"instance {record.vast_id} has no SSH endpoint recorded")
        private_key, _ = ensure_keypair(self.config.key_dir)
        connection = Connection(
            Endpoint(record.ssh_host, record.ssh_port),
            private_key,
            host_key=record.host_key,
        )
        connection.connect(attempts=3, delay=1.0)
        self._track(record.pk, connection)
        return connection

    def _track(self, pk: int, connection: Connection) -> None:
        """Keep an instance's connection, and note the host's API state
        whenever the connection drops."""
        connection.drop_observer = lambda: self._observe_host(pk)
        self._connections[pk] = connection

    def _observe_host(self, pk: int) -> str | None:
        """Note the API's state of an instance whose connection dropped;
        return why reconnecting is pointless, or None to reconnect."""
        record = db.get_instance(self.store, pk)
        if record.vast_id is None:
            return None
        remote = self.api.show_instance(record.vast_id)
        state = "gone" if remote is None else remote.status.value
        with self._jobs_lock:
            # The state at the first drop is kept, because an offline host
            # is often removed from the list soon after.
            if self._host_states.get(pk) in (None, VastStatus.RUNNING.value):
                self._host_states[pk] = state
        if state == "gone":
            return "Vast.ai no longer lists the instance"
        if state in _HOST_DOWN_STATES:
            return f"Vast.ai reports its host {state}"
        return None

    # Running ----------------------------------------------------------------

    def _set_status(self, job: _Job, **changes: object) -> None:
        with self._jobs_lock:
            job.status = dataclasses.replace(job.status, **changes)  # type: ignore[arg-type]

    def _run_job(self, job: _Job) -> None:
        try:
            self._place_and_run(job)
        finally:
            with self._placement:
                self._holds.pop(job.handle, None)

    def _place_and_run(self, job: _Job) -> None:
        # A job whose instance is lost before the job starts (while its
        # sources or inputs are shipped) is placed again, up to this often,
        # instead of spending one of Snakemake's retries.
        for placement in range(1, _PLACEMENTS + 1):
            if self._place_and_run_once(job, last=placement == _PLACEMENTS):
                return

    def _place_and_run_once(self, job: _Job, *, last: bool) -> bool:
        """Place and run the job; return False to have it placed again."""
        spec = job.spec
        try:
            record, lease_id, connection, _warm = self._place(job)
        except _Cancelled:
            self._set_status(
                job,
                state=JobState.FAILED,
                message=job.stop_message
                or f"job {spec.job_id} (rule {spec.rule}) was cancelled before it "
                "got an instance",
            )
            return True
        except PoolError as exc:
            message = job.stop_message or str(exc)
            # Snakemake prints the message in its error report of the job.
            logger.debug("job %s (rule %s) failed: %s", spec.job_id, spec.rule, message)
            self._set_status(job, state=JobState.FAILED, message=message)
            return True
        except Exception as exc:
            logger.exception("placing job %s (rule %s) failed", spec.job_id, spec.rule)
            self._set_status(
                job,
                state=JobState.FAILED,
                message=f"placing job {spec.job_id} failed: "
                f"{type(exc).__name__}: {exc}",
            )
            return True

        if job.cancelled.is_set():
            cancelled = JobResult(
                LeaseOutcome.CANCELLED,
                None,
                f"job {spec.job_id} was cancelled before it started",
                instance_healthy=False,
                log_path=local_log_path(self.config, spec),
            )
            self._finish(job, record, lease_id, cancelled)
            return True
        self._set_status(
            job,
            state=JobState.RUNNING,
            instance_id=record.vast_id,
            log_path=local_log_path(self.config, spec),
        )
        runner = JobRunner(
            config=self.config,
            store=self.store,
            run_id=self.run_id,
            record=record,
            connection=connection,
            lease_id=lease_id,
            spec=spec,
            cancelled=job.cancelled,
        )
        job.runner = runner
        try:
            result = runner.run()
        except Exception as exc:
            logger.exception("job %s (rule %s) crashed", spec.job_id, spec.rule)
            runner.kill()
            result = JobResult(
                LeaseOutcome.FAILED,
                None,
                f"job {spec.job_id} failed on instance {record.vast_id}: "
                f"{type(exc).__name__}: {exc}",
                instance_healthy=False,
                log_path=runner.log_path,
            )
        if (
            result.outcome == LeaseOutcome.LOST
            and not runner.started
            and not last
            and not job.cancelled.is_set()
        ):
            why = (
                f"instance {record.vast_id} was lost before job {spec.job_id} "
                f"(rule {spec.rule}) started "
                f"({self._explain_loss(record, result.message)}), so "
                f"the job is placed again: {result.message}"
            )
            logger.warning("%s", why)
            self._lose(record, lease_id, why)
            job.runner = None
            return False
        self._finish(job, record, lease_id, result)
        return True

    def _finish(
        self, job: _Job, record: InstanceRecord, lease_id: int, result: JobResult
    ) -> None:
        """End the lease (idle or destroyed), then publish the job's result."""
        spec = job.spec
        if job.cancelled.is_set() and result.outcome == LeaseOutcome.SUCCEEDED:
            result = dataclasses.replace(result, instance_healthy=False)
        if result.instance_healthy:
            db.end_lease(
                self.store,
                lease_id,
                result.outcome,
                result.exit_code,
                instance_state=InstanceState.IDLE,
            )
        elif result.outcome == LeaseOutcome.LOST:
            explanation = self._explain_loss(record, result.message)
            result = dataclasses.replace(
                result,
                message=f"{result.message}; {explanation}. The instance was "
                "destroyed; with --retries, Snakemake runs the job again on "
                "another instance",
            )
            self._lose(record, lease_id, result.message)
        else:
            db.end_lease(
                self.store,
                lease_id,
                result.outcome,
                result.exit_code,
                instance_state=InstanceState.DESTROYING,
            )
            if job.cancelled.is_set() or result.outcome == LeaseOutcome.CANCELLED:
                reason = DestroyReason.INTERRUPTED
                why = result.message or "its job was cancelled"
            else:
                reason = DestroyReason.JOB_TIMEOUT
                why = result.message or "its job's state is unknown"
            self._destroy(record, reason=reason, why=why)
        with self._placement:
            self._placement.notify_all()
        succeeded = result.outcome == LeaseOutcome.SUCCEEDED
        if not succeeded and job.stop_message is not None:
            result = dataclasses.replace(result, message=job.stop_message)
        if not succeeded:
            # Snakemake prints the message in its error report of the job.
            logger.debug("%s", result.message)
        self._set_status(
            job,
            state=JobState.SUCCEEDED if succeeded else JobState.FAILED,
            message=result.message,
            exit_code=result.exit_code,
            log_path=result.log_path,
            instance_id=record.vast_id,
        )
        logger.debug("job %s (rule %s) finished", spec.job_id, spec.rule)

    # Destroying -------------------------------------------------------------

    def _lose(self, record: InstanceRecord, lease_id: int, why: str) -> None:
        """End a lease whose host is unreachable and destroy what is left of it.

        The caller has explained the loss (``_explain_loss``) in ``why``.
        """
        db.end_lease(
            self.store,
            lease_id,
            LeaseOutcome.LOST,
            None,
            instance_state=InstanceState.DESTROYING,
        )
        self._destroy(
            record,
            reason=DestroyReason.GONE,
            why=why,
            state_on_failure=InstanceState.LOST,
        )

    def _explain_loss(self, record: InstanceRecord, error: str = "") -> str:
        """Describe the API's view of an unreachable instance, for a message.

        The API state is left out when ``error`` (the SSH error) already
        contains it. When the host is offline or unknown (not destroyed from
        outside), its machine is avoided from now on, in this run and later
        ones.
        """
        with self._jobs_lock:
            state = self._host_states.get(record.pk)
        if state in (None, VastStatus.RUNNING.value) and record.vast_id is not None:
            try:
                remote = self.api.show_instance(record.vast_id)
            except PoolError as exc:
                return f"its state is unknown because the API did not answer: {exc}"
            state = "gone" if remote is None else remote.status.value
        if state == "gone":
            shown = "Vast.ai no longer lists the instance"
            consequence = "it was destroyed outside the pool or its host was removed"
        elif state in _HOST_DOWN_STATES and record.machine_id is not None:
            self._remember_machine(
                record.machine_id, record.vast_id, f"host {state}, instance lost"
            )
            shown = f"Vast.ai reports its host {state}"
            consequence = f"machine {record.machine_id} is avoided from now on"
        else:
            return f"Vast.ai lists it as {state} but SSH does not answer"
        return consequence if shown in error else f"{shown}; {consequence}"

    def _destroy(
        self,
        record: InstanceRecord,
        *,
        reason: DestroyReason,
        why: str,
        state_on_failure: InstanceState = InstanceState.DESTROYING,
    ) -> None:
        connection = self._connections.pop(record.pk, None)
        if connection is not None:
            connection.close()
        destroy(
            self.api,
            self.store,
            db.get_instance(self.store, record.pk),
            reason=reason,
            why=why,
            state_on_failure=state_on_failure,
        )

    def _destroy_claimed(
        self, record: InstanceRecord, *, reason: DestroyReason, why: str
    ) -> bool:
        """Destroy an instance unless another process changed it meanwhile."""
        claimed = db.claim_for_destroy(self.store, record, why=why, reason=reason)
        if claimed is None:
            return False
        self._destroy(claimed, reason=reason, why=why)
        return True
