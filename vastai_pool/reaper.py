"""The pool's timers, all registered in one function on APScheduler 3.x."""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from apscheduler.schedulers.background import BackgroundScheduler

logger = logging.getLogger(__name__)

# APScheduler 3.x logs every run of every job at INFO, which would flood a
# Snakemake log with a line every few seconds.
logging.getLogger("apscheduler").setLevel(logging.WARNING)

# Seconds between run heartbeats; a run whose heartbeat is much older than
# this is treated as crashed.
HEARTBEAT_SECONDS = 30.0
# Seconds between looks for crashed runs of the same pool database.
STALE_RUN_SECONDS = 60.0
# Seconds between comparisons of the database with the Vast.ai instance list;
# each is one paginated list call.
RECONCILE_SECONDS = 120.0


def idle_check_seconds(idle_timeout: float) -> float:
    """Return how often to look for idle instances past ``idle_timeout``."""
    return min(30.0, max(0.5, idle_timeout / 4))


def budget_check_seconds(poll_interval: float) -> float:
    """Return how often the budget timer runs for a pool polling every
    ``poll_interval`` seconds: between 1 and 5 seconds.

    A run can overspend by about this long of its instances' ``dph_total``.
    """
    return min(5.0, max(1.0, 2 * poll_interval))


@dataclass(frozen=True)
class Timers:
    """The callables the reaper runs; a None entry is not scheduled.

    Intervals are in seconds.
    """

    reap_idle: Callable[[], object]
    heartbeat: Callable[[], object]
    idle_timeout: float
    budget: Callable[[], object] | None = None
    budget_interval: float = 2.0
    recover_stale_runs: Callable[[], object] | None = None
    reconcile: Callable[[], object] | None = None


class _Guarded:
    """Runs one timer, logging a failure as one warning until it recovers.

    APScheduler would log every failed run with a traceback at ERROR; a timer
    that fails every few seconds while the API is down should not flood.
    """

    def __init__(self, name: str, function: Callable[[], object]) -> None:
        self.name = name
        self.function = function
        self._last_error: str | None = None
        self._lock = threading.Lock()

    def __call__(self) -> None:
        try:
            self.function()
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            with self._lock:
                repeated = message == self._last_error
                self._last_error = message
            if repeated:
                logger.debug("%s timer failed again: %s", self.name, message)
            else:
                logger.warning(
                    "%s timer failed, retrying at its next run: %s", self.name, message
                )
            return
        with self._lock:
            recovered = self._last_error is not None
            self._last_error = None
        if recovered:
            logger.info("%s timer succeeded again", self.name)


def start_timers(timers: Timers) -> BackgroundScheduler:
    """Start a daemon scheduler running every timer in ``timers``.

    Each timer is an interval trigger with jitter that runs one at a time
    (``max_instances=1``); runs missed while one was busy collapse into one
    (``coalesce``). An exception in a timer is logged and the timer keeps
    its schedule. The caller stops the scheduler with ``shutdown(wait=True)``.
    """
    scheduler = BackgroundScheduler(daemon=True, timezone="UTC")
    now = datetime.datetime.now(datetime.UTC)

    def add(
        name: str,
        function: Callable[[], object],
        seconds: float,
        *,
        jitter: float,
        first: datetime.datetime | None = None,
    ) -> None:
        # APScheduler 3.x reads an explicit ``next_run_time=None`` as paused.
        start = {} if first is None else {"next_run_time": first}
        scheduler.add_job(
            _Guarded(name, function),
            "interval",
            seconds=seconds,
            jitter=jitter,
            id=name,
            max_instances=1,
            coalesce=True,
            **start,
        )

    idle = idle_check_seconds(timers.idle_timeout)
    add("reap-idle", timers.reap_idle, idle, jitter=idle / 5)
    add(
        "run-heartbeat",
        timers.heartbeat,
        HEARTBEAT_SECONDS,
        jitter=HEARTBEAT_SECONDS / 10,
    )
    if timers.budget is not None:
        # No jitter: the interval bounds how far the run can overspend.
        add("budget", timers.budget, timers.budget_interval, jitter=0)
    if timers.recover_stale_runs is not None:
        # The first look runs at once, so a new run cleans up after a crash.
        add(
            "recover-stale-runs",
            timers.recover_stale_runs,
            STALE_RUN_SECONDS,
            jitter=STALE_RUN_SECONDS / 10,
            first=now,
        )
    if timers.reconcile is not None:
        add(
            "reconcile",
            timers.reconcile,
            RECONCILE_SECONDS,
            jitter=RECONCILE_SECONDS / 10,
            first=now + datetime.timedelta(seconds=RECONCILE_SECONDS / 4),
        )
    scheduler.start()
    return scheduler


def start_reaper(
    *,
    reap_idle: Callable[[], None],
    heartbeat: Callable[[], None],
    idle_timeout: float,
) -> BackgroundScheduler:
    """Start only the idle reaper and the run heartbeat (see ``start_timers``)."""
    return start_timers(
        Timers(reap_idle=reap_idle, heartbeat=heartbeat, idle_timeout=idle_timeout)
    )
