"""Running one job on a leased instance: ship, run, stream the log, fetch.

On the instance everything is relative to the login's home: the run's
working directory is ``vastai-pool/work/<sha of the local workdir>/`` and
each job gets ``vastai-pool/jobs/<run>-<jobid>-<attempt>/`` for its log,
exit code, pid and environment file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from vastai_pool import store as db
from vastai_pool.errors import SshError
from vastai_pool.models import LeaseOutcome
from vastai_pool.rental import JOBS_ROOT, SOURCES_ROOT, WORK_ROOT

if TYPE_CHECKING:
    from vastai_pool.pool import JobSpec, PoolConfig
    from vastai_pool.ssh import Connection
    from vastai_pool.store import InstanceRecord, Store

logger = logging.getLogger(__name__)

# Seconds between lease heartbeats while a job runs.
HEARTBEAT_INTERVAL = 30.0

_digest_lock = threading.Lock()
# (absolute path, size, mtime_ns) -> sha256, so a file is hashed once per run.
_digest_cache: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class JobResult:
    """The outcome of one job and what it means for its instance.

    ``instance_healthy`` is False when the instance's state is unknown (a
    killed job, a cancelled one, lost SSH) and it must not serve another job.
    """

    outcome: LeaseOutcome
    exit_code: int | None
    message: str
    instance_healthy: bool
    log_path: Path


def remote_work_dir(local_workdir: Path) -> str:
    """Return the run's working directory on an instance, relative to home."""
    digest = hashlib.sha256(str(local_workdir.resolve()).encode()).hexdigest()
    return f"{WORK_ROOT}/{digest[:16]}"


def remote_job_dir(run_id: str, spec: JobSpec) -> str:
    return f"{JOBS_ROOT}/{run_id}-{spec.job_id}-{spec.attempt}"


def local_log_path(config: PoolConfig, spec: JobSpec) -> Path:
    return config.logs_dir / f"{spec.rule}-{spec.job_id}-{spec.attempt}.log"


def file_digest(path: Path) -> tuple[int, str]:
    """Return (size, sha256) of a local file, cached by size and mtime."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _digest_lock:
        cached = _digest_cache.get(key)
    if cached is not None:
        return stat.st_size, cached
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            sha.update(chunk)
    digest = sha.hexdigest()
    with _digest_lock:
        _digest_cache[key] = digest
    return stat.st_size, digest


def _relative(workdir: Path, name: str) -> str | None:
    path = Path(name)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.resolve().relative_to(workdir.resolve()).as_posix()
    except ValueError:
        return None


def iter_local_files(
    workdir: Path, names: tuple[str, ...]
) -> Iterator[tuple[str, Path]]:
    """Yield (path relative to workdir, local file) for files and directory trees."""
    for name in names:
        relative = _relative(workdir, name)
        if relative is None:
            logger.warning(
                "%s is outside the working directory %s and is not shipped",
                name,
                workdir,
            )
            continue
        local = workdir / relative
        if local.is_dir():
            for root, _dirs, files in os.walk(local):
                for file_name in sorted(files):
                    full = Path(root) / file_name
                    yield full.relative_to(workdir).as_posix(), full
        elif local.is_file():
            yield relative, local


def local_digests(workdir: Path, names: tuple[str, ...]) -> dict[str, tuple[int, str]]:
    """Return {relative path: (size, sha256)} of the local files under ``names``."""
    return {rel: file_digest(local) for rel, local in iter_local_files(workdir, names)}


class JobRunner:
    """Runs one job on one leased instance and reports how it ended."""

    def __init__(
        self,
        *,
        config: PoolConfig,
        store: Store,
        run_id: str,
        record: InstanceRecord,
        connection: Connection,
        lease_id: int,
        spec: JobSpec,
        cancelled: threading.Event,
    ) -> None:
        self.config = config
        self.store = store
        self.run_id = run_id
        self.record = record
        self.connection = connection
        self.lease_id = lease_id
        self.spec = spec
        self.cancelled = cancelled
        self.work_dir = remote_work_dir(config.workdir)
        self.job_dir = remote_job_dir(run_id, spec)
        self.log_path = local_log_path(config, spec)
        self.started = False

    @property
    def name(self) -> str:
        return f"job {self.spec.job_id} (rule {self.spec.rule})"

    def run(self) -> JobResult:
        """Ship, run, stream and fetch; SSH failures end as a lost job."""
        try:
            self.ship_sources()
            self.ship_inputs()
            self.start()
            return self.wait_and_fetch()
        except SshError as exc:
            return JobResult(
                LeaseOutcome.LOST,
                None,
                f"{self.name} lost its instance {self.record.vast_id}: {exc}",
                instance_healthy=False,
                log_path=self.log_path,
            )

    # Shipping ---------------------------------------------------------------

    def ship_sources(self) -> None:
        """Unpack the workflow's source archive, once per instance per checksum."""
        spec = self.spec
        if spec.source_archive is None or spec.source_checksum is None:
            return
        # Each local working directory has its own directory on the
        # instance, so an archive counts as unpacked per work directory.
        unpacked = f"{self.work_dir}/{spec.source_checksum}"
        current = db.get_instance(self.store, self.record.pk)
        if unpacked in current.sources:
            return
        archive = f"{SOURCES_ROOT}/{spec.source_checksum}.tar.xz"
        self.connection.upload(spec.source_archive, archive)
        result = self.connection.run(
            f"mkdir -p {shlex.quote(self.work_dir)} && "
            f"tar -xJf {shlex.quote(archive)} -C {shlex.quote(self.work_dir)}",
            timeout=600,
        )
        if result.exit_code != 0:
            raise SshError(
                f"unpacking {archive} into {self.work_dir} on instance "
                f"{self.record.vast_id} failed: {result.stderr.strip()[-300:]}"
            )
        db.mark_sources(self.store, self.record.pk, unpacked)
        logger.info(
            "shipped sources %s to instance %d",
            spec.source_checksum[:12],
            self.record.vast_id,
        )

    def ship_inputs(self) -> None:
        """Upload the inputs the instance lacks with the same content."""
        # The files table keys paths relative to the login's home, work
        # directory included, so two local workflows never share an entry.
        present = db.files_on(self.store, self.record.pk)
        uploaded: list[tuple[str, int, str]] = []
        for relative, local in iter_local_files(self.config.workdir, self.spec.inputs):
            size, sha = file_digest(local)
            remote = f"{self.work_dir}/{relative}"
            if present.get(remote) == (size, sha):
                continue
            self.connection.upload(local, remote)
            uploaded.append((remote, size, sha))
        if uploaded:
            db.record_files(self.store, self.record.pk, uploaded)
            logger.info(
                "%s: uploaded %d input files (%d bytes) to instance %d",
                self.name,
                len(uploaded),
                sum(size for _, size, _ in uploaded),
                self.record.vast_id,
            )

    # Running ----------------------------------------------------------------

    def start(self) -> None:
        """Write the job's environment file (mode 0600) and start it detached."""
        job_dir = shlex.quote(self.job_dir)
        env_lines = "".join(
            f"export {name}={shlex.quote(value)}\n"
            for name, value in sorted(self.config.job_env.items())
        )
        # The values travel on stdin, never on a command line.
        result = self.connection.run(
            f"umask 077 && mkdir -p {job_dir} && cat > {job_dir}/env",
            stdin=env_lines.encode(),
        )
        if result.exit_code != 0:
            raise SshError(
                f"writing {self.job_dir}/env on instance {self.record.vast_id} "
                f"failed: {result.stderr.strip()}"
            )
        command = (
            f'cd "$HOME" && . ./{job_dir}/env && '
            f"mkdir -p {shlex.quote(self.work_dir)} && "
            f"cd {shlex.quote(self.work_dir)} && ( {self.spec.command} )"
        )
        self.connection.start_detached(command, job_dir=self.job_dir)
        self.started = True
        logger.info(
            "%s started on instance %d in %s",
            self.name,
            self.record.vast_id,
            self.job_dir,
        )

    def wait_and_fetch(self) -> JobResult:
        """Stream the log until the job exits, enforce its runtime, then fetch."""
        spec = self.spec
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        limit = spec.runtime_minutes * 60 if spec.runtime_minutes else None
        started = time.monotonic()
        last_heartbeat = started
        offset = 0
        with self.log_path.open("wb") as log:
            while True:
                offset = self._copy_log(log, offset)
                exit_code = self.connection.read_exit_code(self.job_dir)
                if exit_code is not None:
                    self._copy_log(log, offset)
                    break
                if self.cancelled.is_set():
                    self.connection.kill_detached(self.job_dir)
                    self._copy_log(log, offset)
                    self.fetch(self.spec.logs)
                    return JobResult(
                        LeaseOutcome.CANCELLED,
                        None,
                        f"{self.name} was cancelled",
                        instance_healthy=False,
                        log_path=self.log_path,
                    )
                now = time.monotonic()
                if limit is not None and now - started > limit:
                    return self._timed_out(log, offset)
                if now - last_heartbeat >= HEARTBEAT_INTERVAL:
                    db.lease_heartbeat(self.store, self.lease_id)
                    last_heartbeat = now
                time.sleep(self.config.poll_interval)

        if exit_code == 0:
            fetched = self.fetch(spec.outputs)
            self._record_outputs(fetched)
        self.fetch(spec.logs)
        if exit_code == 0:
            return JobResult(
                LeaseOutcome.SUCCEEDED, 0, "", True, log_path=self.log_path
            )
        return JobResult(
            LeaseOutcome.FAILED,
            exit_code,
            f"{self.name} exited with code {exit_code} on instance "
            f"{self.record.vast_id}; see its log {self.log_path}",
            instance_healthy=True,
            log_path=self.log_path,
        )

    def _copy_log(self, log: IO[bytes], offset: int) -> int:
        data = self.connection.read_from(f"{self.job_dir}/log", offset)
        if data:
            log.write(data)
            log.flush()
        return offset + len(data)

    def _timed_out(self, log: IO[bytes], offset: int) -> JobResult:
        minutes = self.spec.runtime_minutes
        self.connection.kill_detached(self.job_dir)
        self._copy_log(log, offset)
        self.fetch(self.spec.logs)
        unit = "minute" if minutes == 1 else "minutes"
        logger.debug(
            "%s exceeded its runtime limit of %g %s on instance %d; killed",
            self.name,
            minutes,
            unit,
            self.record.vast_id,
        )
        return JobResult(
            LeaseOutcome.FAILED,
            None,
            f"{self.name} exceeded its runtime limit of {minutes:g} {unit} "
            f"(resource 'runtime') and was killed; instance {self.record.vast_id} "
            "was destroyed because its state is unknown. Raise 'runtime' if the "
            "job needs longer.",
            instance_healthy=False,
            log_path=self.log_path,
        )

    # Fetching ---------------------------------------------------------------

    def fetch(self, names: tuple[str, ...]) -> list[str]:
        """Download the named files or trees that exist remotely; return them."""
        fetched = []
        for name in names:
            relative = _relative(self.config.workdir, name)
            if relative is None:
                logger.warning("%s is outside the working directory, not fetched", name)
                continue
            remote = f"{self.work_dir}/{relative}"
            if not self.connection.exists(remote):
                logger.debug("%s: %s is missing on the instance", self.name, relative)
                continue
            local = self.config.workdir / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            self.connection.download(remote, local)
            fetched.append(relative)
        return fetched

    def _record_outputs(self, fetched: list[str]) -> None:
        # Fetched outputs now exist on both sides with the same content, so a
        # downstream job on this instance needs no upload of them.
        rows = [
            (f"{self.work_dir}/{relative}", *file_digest(local))
            for relative, local in iter_local_files(self.config.workdir, tuple(fetched))
        ]
        if rows:
            db.record_files(self.store, self.record.pk, rows)

    def kill(self) -> None:
        """Kill the job if it was started; errors are logged, not raised."""
        if not self.started:
            return
        try:
            self.connection.kill_detached(self.job_dir)
        except SshError as exc:
            logger.warning("killing %s failed: %s", self.name, exc)
