"""The pool's timers, all registered in one function on APScheduler 3.x."""

from __future__ import annotations

import logging
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler

# APScheduler 3.x logs every run of every job at INFO, which would flood a
# Snakemake log with a line every few seconds.
logging.getLogger("apscheduler").setLevel(logging.WARNING)

# Seconds between run heartbeats; ``vastai-pool gc`` treats a run whose
# heartbeat is much older than this as crashed.
HEARTBEAT_SECONDS = 30.0


def idle_check_seconds(idle_timeout: float) -> float:
    """Return how often to look for idle instances past ``idle_timeout``."""
    return min(30.0, max(0.5, idle_timeout / 4))


def start_reaper(
    *,
    reap_idle: Callable[[], None],
    heartbeat: Callable[[], None],
    idle_timeout: float,
) -> BackgroundScheduler:
    """Start a daemon scheduler running the idle reaper and the run heartbeat.

    Each timer runs one at a time (``max_instances=1``); runs missed while
    one was busy collapse into one (``coalesce``). The caller stops it with
    ``shutdown(wait=True)``.
    """
    scheduler = BackgroundScheduler(daemon=True, timezone="UTC")
    interval = idle_check_seconds(idle_timeout)
    scheduler.add_job(
        reap_idle,
        "interval",
        seconds=interval,
        jitter=interval / 5,
        id="reap-idle",
        max_instances=1,
        coalesce=True,
    )
    scheduler.add_job(
        heartbeat,
        "interval",
        seconds=HEARTBEAT_SECONDS,
        jitter=HEARTBEAT_SECONDS / 10,
        id="run-heartbeat",
        max_instances=1,
        coalesce=True,
    )
    scheduler.start()
    return scheduler
