"""The detached ``vastai-pool reap`` process that ends lingering instances.

After a run with ``--vastai-linger`` exits, its idle instances stay warm
until their ``linger_until`` deadline, and nothing in the Snakemake process
is left to destroy them. So ``Pool.close`` calls ``spawn_reaper``, which
starts a detached process running ``reap_forever``, an APScheduler loop.
The loop destroys each lingering instance at its deadline unless a later
run adopted it. It also ends runs that died
(``inventory.recover_stale_runs``), reconciles the database with the API,
and exits when nothing lingers.

One reaper runs per pool file and account, guarded by an ``fcntl.flock``
on a lock file next to the database. The API key reaches the child through
its environment, never its command line.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from apscheduler.schedulers.background import BackgroundScheduler

from vastai_pool import inventory
from vastai_pool import store as pool_store
from vastai_pool.api import VastApi
from vastai_pool.credentials import PLUGIN_KEY_VARIABLE
from vastai_pool.errors import PoolError
from vastai_pool.models import DestroyReason, InstanceState
from vastai_pool.store import InstanceRecord, Store

logger = logging.getLogger(__name__)
# APScheduler logs every run of every job at INFO.
logging.getLogger("apscheduler").setLevel(logging.WARNING)

# Seconds between rereads of the database for new or adopted lingering
# instances. Deadlines themselves fire on their own date jobs.
SWEEP_SECONDS = 1.0
# Seconds between calls to the API that recover dead runs and reconcile.
RECONCILE_SECONDS = 60.0


def lock_path(db_path: Path, account: str) -> Path:
    """Return the reaper's lock file: next to the database, one per account."""
    digest = hashlib.sha256(account.encode("utf-8")).hexdigest()[:12]
    db_path = Path(db_path).expanduser()
    return db_path.with_name(f"{db_path.name}.reap-{digest}.lock")


def log_path(db_path: Path) -> Path:
    """Return the reaper's log file, next to the database."""
    db_path = Path(db_path).expanduser()
    return db_path.with_name(f"{db_path.name}.reap.log")


def spawn_reaper(db_path: Path, api_url: str, api_key: str) -> None:
    """Start a detached ``vastai-pool reap --foreground`` for the pool file.

    Returns at once. The child runs in its own session with stdin and stdout
    on /dev/null and logs to ``log_path(db_path)``. If a reaper already holds
    the lock, the child exits, because the running one picks the new
    deadlines up.
    """
    db_path = Path(db_path).expanduser().resolve()
    env = dict(os.environ)
    env[PLUGIN_KEY_VARIABLE] = api_key
    command = [
        sys.executable,
        "-m",
        "vastai_pool.cli",
        "reap",
        "--foreground",
        "--db",
        str(db_path),
        "--api-url",
        api_url,
    ]
    log = log_path(db_path)
    # Its stderr is discarded too: the child logs to ``log`` itself.
    subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        start_new_session=True,
        close_fds=True,
    )
    logger.info("started the linger reaper for %s (log: %s)", db_path, log)


@contextlib.contextmanager
def _held(path: Path) -> Iterator[IO[str] | None]:
    """Hold an exclusive flock on ``path`` without waiting, or yield None
    when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield handle
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def reaper_running(db_path: Path, account: str) -> bool:
    """Return whether a reaper holds the lock of this pool file and account."""
    path = lock_path(db_path, account)
    if not path.exists():
        return False
    with _held(path) as handle:
        return handle is None


class Reaper:
    """A loop that destroys the account's lingering instances at their deadlines.

    Runs on a ``BackgroundScheduler``: a sweep job rereads the database and
    keeps one date job per lingering instance, and an API job recovers dead
    runs and reconciles. ``done`` is set when nothing lingers any more.
    """

    def __init__(self, store: Store, api: VastApi, account: str) -> None:
        self.store = store
        self.api = api
        self.account = account
        self.done = threading.Event()
        self._scheduled: dict[int, float] = {}
        self._lock = threading.Lock()
        self._scheduler = BackgroundScheduler(daemon=True, timezone="UTC")

    def start(self) -> None:
        self._scheduler.add_job(
            self._sweep,
            "interval",
            seconds=SWEEP_SECONDS,
            id="sweep",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        self._scheduler.add_job(
            self._check_api,
            "interval",
            seconds=RECONCILE_SECONDS,
            id="reconcile",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.shutdown(wait=True)

    def lingering(self) -> list[InstanceRecord]:
        return pool_store.lingering_instances(self.store, account=self.account)

    def _sweep(self) -> None:
        try:
            records = self.lingering()
        except PoolError as exc:
            logger.warning("reading the pool database failed: %s", exc)
            return
        with self._lock:
            if not records:
                self.done.set()
                return
            for record in records:
                assert record.linger_until is not None
                if self._scheduled.get(record.pk) == record.linger_until:
                    continue
                self._scheduled[record.pk] = record.linger_until
                self._scheduler.add_job(
                    self._expire,
                    "date",
                    run_date=datetime.fromtimestamp(record.linger_until, tz=UTC),
                    args=[record.pk],
                    id=f"linger-{record.pk}",
                    replace_existing=True,
                    misfire_grace_time=None,
                )

    def _expire(self, pk: int) -> None:
        """Destroy instance ``pk`` if it still lingers past its deadline."""
        with self._lock:
            self._scheduled.pop(pk, None)
        try:
            record = pool_store.get_instance(self.store, pk)
            now = self.store.clock()
            if (
                record.state is not InstanceState.IDLE
                or record.linger_until is None
                or record.linger_until > now
            ):
                # Adopted by a run, or given a later deadline: the sweep
                # schedules it again if it still lingers.
                return
            claimed = pool_store.claim_for_destroy(
                self.store,
                record,
                why="linger deadline passed",
                reason=DestroyReason.IDLE_TIMEOUT,
            )
            if claimed is None:
                return
            action = inventory.destroy_claimed(
                self.store, self.api, claimed, "its linger deadline passed", by="reaper"
            )
            if action.error:
                # The row stays destroying; gc or the next reaper retries it.
                logger.error(
                    "destroying lingering instance %s failed: %s",
                    record.vast_id,
                    action.error,
                )
            else:
                logger.info(
                    "destroyed lingering instance %s (%s) at its deadline",
                    record.vast_id,
                    record.label,
                )
        except PoolError as exc:
            logger.warning("expiring instance row %d failed: %s", pk, exc)

    def _check_api(self) -> None:
        try:
            runs = inventory.recover_stale_runs(self.store, self.api, self.account)
            if runs:
                logger.info("recovered dead runs %s", ", ".join(runs))
            report = inventory.reconcile(self.store, self.api, self.account)
            if not report.ok:
                logger.warning("reconciling with the API failed: %s", report.problem)
        except PoolError as exc:
            logger.warning("recovery or reconciliation failed: %s", exc)


def reap_forever(db_path: Path, api_url: str, api_key: str) -> int:
    """Run the reaper until nothing lingers, and return 0.

    Returns 0 at once when another reaper runs for this pool file and account.
    """
    account = pool_store.account_id(api_url, api_key)
    db_path = Path(db_path).expanduser()
    with _held(lock_path(db_path, account)) as handle:
        if handle is None:
            logger.info("another reaper already runs for %s", db_path)
            return 0
        _run_until_done(db_path, api_url, api_key, account)
    # A run may have left new lingering instances after the last sweep,
    # while its own reaper found the lock still held: take over then.
    with Store(db_path) as store:
        if not pool_store.lingering_instances(store, account=account):
            return 0
    return reap_forever(db_path, api_url, api_key)


def _run_until_done(db_path: Path, api_url: str, api_key: str, account: str) -> None:
    with Store(db_path) as store:
        reaper = Reaper(store, VastApi(api_url, api_key), account)
        logger.info(
            "reaper %d watching %d lingering instances in %s",
            os.getpid(),
            len(reaper.lingering()),
            db_path,
        )
        reaper.start()
        try:
            reaper.done.wait()
        finally:
            reaper.stop()
        logger.info("nothing lingers in %s any more; reaper exiting", db_path)


def log_to_file(db_path: Path) -> None:
    """Send this process's log lines to ``log_path(db_path)``."""
    handler = logging.FileHandler(log_path(db_path), encoding="utf-8")
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
