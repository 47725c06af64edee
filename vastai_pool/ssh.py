"""SSH to instances through paramiko: commands, detached jobs, atomic transfers.

Everything on an instance is addressed relative to the login's home directory,
which is ``/root`` on Vast.ai and the instance directory in the sandbox. The
same code runs on both, because OpenSSH and the sandbox's SFTP server resolve
relative paths against the home directory, and commands start there.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import posixpath
import shlex
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from vastai_pool.errors import ConfigError, HostKeyMismatch, SshError

logger = logging.getLogger(__name__)

# paramiko logs every connection and authentication at INFO, which floods the
# log of a run that opens one connection per instance, so only its warnings
# and errors pass.
logging.getLogger("paramiko").setLevel(logging.WARNING)


def _drop_channel_rejections(record: logging.LogRecord) -> bool:
    # Connection retries a rejected channel open and raises SshError if it
    # keeps failing, so paramiko's ERROR line for each rejection is noise.
    return "channel" not in str(record.msg) or "open FAILED" not in str(record.msg)


logging.getLogger("paramiko.transport").addFilter(_drop_channel_rejections)
# paramiko's transport thread logs a traceback at ERROR for every connection
# attempt that fails mid-handshake ("Error reading SSH protocol banner");
# Connection retries those and raises SshError when it gives up.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)

T = TypeVar("T")
Progress = Callable[[int, int], None]

KEY_NAME = "id_ed25519"
KEY_COMMENT = "vastai-pool"

# OpenSSH's sshd accepts at most MaxSessions (default 10, sshd_config(5))
# open channels per connection and rejects the next one, so the connection
# keeps a margin below that.
MAX_CHANNELS = 8
# Seconds between keepalive packets, so that NAT and the Vast.ai SSH proxy do
# not drop a connection that sits idle while a job runs.
KEEPALIVE_INTERVAL = 15
# Seconds to keep retrying a channel open that the server rejected.
CHANNEL_OPEN_PATIENCE = 10.0
# Seconds an SFTP request may wait for its reply before the transfer fails.
SFTP_TIMEOUT = 120.0
# SFTP read requests of 32 KiB kept in flight per download. paramiko 3.x
# prefetches a whole file at once when unbounded; this bounds the memory.
PREFETCH_REQUESTS = 64
# Upper bound of the total length of paths quoted into one sha256sum call,
# well below Linux's 128 KiB limit of one argument string.
SHA256_ARGUMENT_BYTES = 64 * 1024

# A dropped connection is opened again up to this many times, the pauses
# between the attempts doubling from RECONNECT_DELAY seconds. A host that
# accepts connections again within about 15 s keeps its job; otherwise the
# job is lost.
RECONNECT_ATTEMPTS = 5
RECONNECT_DELAY = 1.0
# Attempts of one idempotent operation (a transfer, a read) over dropped
# connections before it fails.
OPERATION_ATTEMPTS = 3

_TRANSPORT_ERRORS = (OSError, EOFError, paramiko.SSHException)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str = "root"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


class Connection:
    """One SSH connection to one instance, shared by all of its jobs.

    Thread-safe: several threads may run commands and transfers at once
    (each gets its own channel). Idempotent methods (transfers, reads)
    reconnect with backoff when the transport has dropped and start again;
    they raise ``SshError`` with the endpoint and the command or
    path when they fail. ``host_key`` pins the key (``"<type> <base64>"``)
    seen at first contact; a different key raises ``HostKeyMismatch``.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        private_key_path: Path,
        *,
        host_key: str | None = None,
        connect_timeout: float = 20.0,
    ) -> None:
        self._endpoint = endpoint
        self._private_key_path = Path(private_key_path)
        self._host_key = _normalize_host_key(host_key) if host_key else None
        self._connect_timeout = connect_timeout
        self._private_key: paramiko.PKey | None = None
        self._transport: paramiko.Transport | None = None
        # Guards _transport and _host_key: one thread at a time (re)connects.
        self._lock = threading.Lock()
        self._channel_slots = threading.BoundedSemaphore(MAX_CHANNELS)
        # Set once the server rejects posix-rename@openssh.com.
        self._plain_rename = False
        # Called (without arguments, errors ignored) when an established
        # connection is found dropped, before reconnecting, so the pool can
        # ask the API about the host while its state is fresh. A returned
        # text (such as "Vast.ai reports its host offline") stops the
        # reconnecting: the call raises SshError with it instead.
        self.drop_observer: Callable[[], str | None] | None = None

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    @property
    def host_key(self) -> str | None:
        """The pinned host key, set by the first successful ``connect``."""
        return self._host_key

    # -- connecting --------------------------------------------------------

    def connect(self, *, attempts: int = 1, delay: float = 2.0) -> str:
        """Open the connection (retrying ``attempts`` times); return the host key.

        Refused connections, timeouts, broken banners and rejected keys are
        retried, because an instance's sshd often starts, and receives the
        attached key, a few seconds after the API reports ``running``. A host
        key mismatch is never retried.
        """
        with self._lock:
            if self._transport is None or not self._transport.is_active():
                self._transport = self._open_transport(attempts, delay)
            assert self._host_key is not None
            return self._host_key

    def close(self) -> None:
        """Close the transport; a later call on this object opens a new one."""
        with self._lock:
            transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()

    def _open_transport(
        self, attempts: int, delay: float, *, growth: float = 1.0
    ) -> paramiko.Transport:
        last_error: BaseException | None = None
        for attempt in range(1, max(attempts, 1) + 1):
            try:
                return self._handshake()
            except HostKeyMismatch:
                raise
            except _TRANSPORT_ERRORS as exc:
                last_error = exc
                logger.debug(
                    "SSH connection to %s failed (attempt %d of %d): %s",
                    self._endpoint,
                    attempt,
                    attempts,
                    _describe_error(exc),
                )
            if attempt < attempts:
                time.sleep(delay)
                delay *= growth

        hint = "check that the instance is running and its SSH port is reachable"
        if isinstance(last_error, paramiko.AuthenticationException):
            hint = (
                f"the server rejected the key {self._private_key_path}; check that "
                "its public key was attached to the instance"
            )
        raise SshError(
            f"Could not connect to {self._endpoint} after {attempts} attempt(s): "
            f"{_describe_error(last_error)}; {hint}"
        ) from last_error

    def _handshake(self) -> paramiko.Transport:
        timeout = self._connect_timeout
        sock = socket.create_connection(
            (self._endpoint.host, self._endpoint.port), timeout=timeout
        )
        transport = paramiko.Transport(sock)
        try:
            transport.banner_timeout = timeout
            transport.handshake_timeout = timeout
            transport.auth_timeout = timeout
            if self._host_key is not None:
                _prefer_host_key_type(transport, self._host_key.split()[0])
            transport.start_client(timeout=timeout)
            self._check_host_key(transport.get_remote_server_key())
            transport.auth_publickey(self._endpoint.user, self._load_private_key())
            if not transport.is_authenticated():
                raise paramiko.AuthenticationException("public key not accepted")
            transport.set_keepalive(KEEPALIVE_INTERVAL)
        except BaseException:
            transport.close()
            raise

        if self._host_key is None:
            self._host_key = _host_key_line(transport.get_remote_server_key())
            logger.info(
                "Pinned host key %s of %s at first contact",
                _fingerprint(self._host_key),
                self._endpoint,
            )
        return transport

    def _check_host_key(self, key: paramiko.PKey) -> None:
        if self._host_key is None:
            return
        seen = _host_key_line(key)
        if seen == self._host_key:
            return
        where = f"{self._endpoint.host}:{self._endpoint.port}"
        raise HostKeyMismatch(
            f"Host key mismatch for {where}: expected {_fingerprint(self._host_key)}, "
            f"got {_fingerprint(seen)}. The host at this address is not the "
            "instance the pool rented, or someone is intercepting the connection. "
            "If the instance was replaced on purpose, destroy its pool entry "
            "(`vastai-pool gc`) so that the new key is pinned; otherwise do not "
            "use this host."
        )

    def _load_private_key(self) -> paramiko.PKey:
        if self._private_key is None:
            try:
                self._private_key = paramiko.PKey.from_path(self._private_key_path)
            except (OSError, paramiko.SSHException, ValueError) as exc:
                raise ConfigError(
                    f"Cannot read the SSH private key {self._private_key_path}: "
                    f"{exc}; delete it to let the pool create a new key pair"
                ) from exc
        return self._private_key

    def _active_transport(self) -> paramiko.Transport:
        with self._lock:
            if self._transport is None or not self._transport.is_active():
                if self._transport is not None:
                    logger.warning(
                        "SSH connection to %s dropped; reconnecting", self._endpoint
                    )
                    gone = self._notify_drop()
                    if gone:
                        raise SshError(
                            f"SSH connection to {self._endpoint} dropped and "
                            f"{gone}, so it was not reopened"
                        )
                if self._host_key is None:
                    # Never connected: ``connect`` sets its own attempts.
                    self._transport = self._open_transport(1, 0.0)
                else:
                    self._transport = self._open_transport(
                        RECONNECT_ATTEMPTS, RECONNECT_DELAY, growth=2.0
                    )
            return self._transport

    def _notify_drop(self) -> str | None:
        observer = self.drop_observer
        if observer is None:
            return None
        try:
            return observer()
        except Exception:
            logger.debug(
                "the drop observer of %s failed", self._endpoint, exc_info=True
            )
            return None

    def _discard(self, transport: paramiko.Transport) -> None:
        """Close ``transport`` unless another thread already replaced it."""
        with self._lock:
            if self._transport is transport:
                self._transport = None
        transport.close()

    def _call(self, action: str, operation: Callable[[paramiko.Transport], T]) -> T:
        """Run an idempotent ``operation``, again on a new transport after a drop.

        Up to ``OPERATION_ATTEMPTS`` attempts; each reconnect backs off as
        ``_active_transport`` does. An error on a live transport is raised at
        once, because sending the operation again would fail the same way.
        """
        for attempt in range(1, OPERATION_ATTEMPTS + 1):
            transport = self._active_transport()
            try:
                return operation(transport)
            except _TRANSPORT_ERRORS as exc:
                # An SFTP reply that does not come within SFTP_TIMEOUT means a
                # dead peer that paramiko has not noticed, so it counts as a drop.
                if transport.is_active() and not isinstance(exc, TimeoutError):
                    raise SshError(
                        f"{action} on {self._endpoint} failed: {_describe_error(exc)}"
                    ) from exc
                if attempt == OPERATION_ATTEMPTS:
                    raise SshError(
                        f"{action} on {self._endpoint} failed after reconnecting "
                        f"{attempt - 1} times: {_describe_error(exc)}"
                    ) from exc
                logger.warning(
                    "SSH connection to %s dropped during %s (%s); reconnecting",
                    self._endpoint,
                    action,
                    _describe_error(exc),
                )
                gone = self._notify_drop()
                self._discard(transport)
                if gone:
                    raise SshError(
                        f"{action} on {self._endpoint} failed: the connection "
                        f"dropped and {gone}, so it was not reopened"
                    ) from exc
        raise AssertionError("unreachable")

    @contextmanager
    def _session(self, action: str) -> Iterator[paramiko.Channel]:
        """Open a session channel, reconnecting once if the transport dropped."""
        with self._channel_slots:
            transport = self._active_transport()
            try:
                channel = self._open_channel(transport)
            except _TRANSPORT_ERRORS as exc:
                if transport.is_active():
                    raise SshError(
                        f"Could not open a channel for {action} on {self._endpoint}: "
                        f"{_describe_error(exc)}"
                    ) from exc
                self._discard(transport)
                try:
                    channel = self._open_channel(self._active_transport())
                except _TRANSPORT_ERRORS as exc2:
                    raise SshError(
                        f"Could not open a channel for {action} on "
                        f"{self._endpoint}: {_describe_error(exc2)}"
                    ) from exc2
            try:
                yield channel
            finally:
                channel.close()

    def _open_channel(
        self, transport: paramiko.Transport, *, subsystem: str | None = None
    ) -> paramiko.Channel:
        # sshd frees a session slot a moment after paramiko's close() returns,
        # so a burst of short commands can briefly exceed MaxSessions, and the
        # rejected open is retried. paramiko 3.x stores the rejection where a
        # concurrent open can take it, so any SSHException counts as one.
        delay = 0.02
        deadline = time.monotonic() + CHANNEL_OPEN_PATIENCE
        while True:
            try:
                channel = transport.open_session(timeout=self._connect_timeout)
                if subsystem is not None:
                    try:
                        channel.invoke_subsystem(subsystem)
                    except BaseException:
                        channel.close()
                        raise
                return channel
            except paramiko.SSHException as exc:
                if not transport.is_active() or time.monotonic() > deadline:
                    raise
                logger.debug(
                    "%s rejected a channel (%s); retrying in %.2f s",
                    self._endpoint,
                    exc,
                    delay,
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    @contextmanager
    def _sftp(self, transport: paramiko.Transport) -> Iterator[paramiko.SFTPClient]:
        # One SFTP client per operation: paramiko's SFTPClient matches replies
        # to requests on one channel and is not documented as thread-safe, and
        # a channel of its own costs one round trip, small next to a transfer.
        with self._channel_slots:
            sftp = paramiko.SFTPClient(self._open_channel(transport, subsystem="sftp"))
            try:
                sftp.get_channel().settimeout(SFTP_TIMEOUT)
                yield sftp
            finally:
                sftp.close()

    # -- commands ----------------------------------------------------------

    def run(
        self, command: str, *, timeout: float | None = None, stdin: bytes | None = None
    ) -> CommandResult:
        """Run a shell command in the login's home directory and wait for it.

        ``timeout`` is in seconds (None waits forever). On timeout the channel
        is closed and ``SshError`` is raised, but the remote process is not
        killed. A command killed by a signal has exit code -1 on OpenSSH (the
        sandbox reports 128 + the signal number). A command is never sent
        twice: if the connection drops while it runs, the ``SshError`` states
        that its outcome is unknown. Pass secrets through ``stdin``, because
        error messages quote the start of the command.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._session(f"command {_shorten(command)}") as channel:
            try:
                channel.exec_command(command)
                return self._exchange(channel, command, deadline, stdin)
            except _TRANSPORT_ERRORS as exc:
                raise SshError(
                    f"Command {_shorten(command)} on {self._endpoint} failed: "
                    f"{_describe_error(exc)}"
                ) from exc

    def _exchange(
        self,
        channel: paramiko.Channel,
        command: str,
        deadline: float | None,
        stdin: bytes | None,
    ) -> CommandResult:
        stdout: list[bytes] = []
        stderr: list[bytes] = []
        # One thread per stream, because a remote process that fills one pipe
        # stops reading its stdin and writing the other stream.
        threads = [
            threading.Thread(target=_drain, args=(channel.recv, stdout), daemon=True),
            threading.Thread(
                target=_drain, args=(channel.recv_stderr, stderr), daemon=True
            ),
        ]
        if stdin:
            threads.append(
                threading.Thread(target=_feed, args=(channel, stdin), daemon=True)
            )
        else:
            channel.shutdown_write()
        for thread in threads:
            thread.start()

        for thread in threads:
            thread.join(_remaining(deadline))
        finished = not any(thread.is_alive() for thread in threads)
        if finished:
            finished = channel.status_event.wait(_remaining(deadline))
        if not finished:
            channel.close()
            raise SshError(
                f"Command {_shorten(command)} on {self._endpoint} timed out; "
                "the remote process may still run"
            )
        # paramiko keeps -1 when no exit-status arrived: the command was
        # killed by a signal, or the connection dropped.
        exit_code = channel.recv_exit_status()
        if exit_code == -1 and not channel.get_transport().is_active():
            raise SshError(
                f"The connection to {self._endpoint} dropped while command "
                f"{_shorten(command)} ran; its outcome is unknown"
            )
        return CommandResult(
            exit_code=exit_code,
            stdout=b"".join(stdout).decode(errors="replace"),
            stderr=b"".join(stderr).decode(errors="replace"),
        )

    def _check(
        self,
        action: str,
        command: str,
        *,
        stdin: bytes | None = None,
        timeout: float | None = SFTP_TIMEOUT,
    ) -> str:
        """Run one of this module's own scripts; return stdout, raise on failure."""
        result = self.run(command, stdin=stdin, timeout=timeout)
        if result.exit_code != 0:
            output = result.stderr.strip() or result.stdout.strip()
            raise SshError(
                f"{action} on {self._endpoint} failed with exit code "
                f"{result.exit_code}: {output}"
            )
        return result.stdout

    # -- detached jobs -----------------------------------------------------

    def start_detached(self, command: str, *, job_dir: str) -> None:
        """Start ``command`` so that it outlives the SSH channel.

        Its combined output goes to ``<job_dir>/log``. When it ends, its exit
        code goes to ``<job_dir>/exit`` (written to a temporary name, then
        renamed). Its process-group id goes to ``<job_dir>/pid``.

        The command is written to ``<job_dir>/cmd.sh`` and run by ``sh`` in the
        home directory, in a new session with stdin from /dev/null. An
        ``exit`` and ``pid`` left by an earlier command in ``job_dir`` are
        removed first; the log is appended to. The instance needs ``setsid``
        (util-linux or busybox).
        """
        self._check(
            f"Start of a detached command in {job_dir}",
            _start_script(job_dir),
            stdin=command.encode(),
        )
        logger.debug("Started a detached command in %s on %s", job_dir, self._endpoint)

    def read_exit_code(self, job_dir: str) -> int | None:
        """Return the exit code of a detached command, or None while it runs."""
        data = self._read_file(posixpath.join(job_dir, "exit"))
        if data is None:
            return None
        try:
            return int(data.strip())
        except ValueError:
            raise SshError(
                f"Invalid exit file {posixpath.join(job_dir, 'exit')} on "
                f"{self._endpoint}: {data[:40]!r}"
            ) from None

    def read_from(self, path: str, offset: int) -> bytes:
        """Return the bytes of a remote file from ``offset`` on (b"" if absent)."""

        def operation(transport: paramiko.Transport) -> bytes:
            with self._sftp(transport) as sftp:
                try:
                    with sftp.open(path, "rb") as remote_file:
                        remote_file.seek(offset)
                        return remote_file.read()
                except FileNotFoundError:
                    return b""

        return self._call(f"read of {path}", operation)

    def kill_detached(self, job_dir: str, *, grace: float = 5.0) -> None:
        """Kill the process group of a detached command, if it still runs.

        Sends SIGTERM to the group, then SIGKILL to whatever is left after
        ``grace`` seconds. A command that ends on SIGTERM gets the exit code
        143; one killed by SIGKILL leaves no exit file. Nothing is sent once
        the exit file exists, so a reused process-group id is never hit.
        """
        self._check(
            f"Kill of the detached command in {job_dir}",
            _kill_script(job_dir, grace),
            timeout=grace + SFTP_TIMEOUT,
        )

    # -- files -------------------------------------------------------------

    def upload(
        self, local: Path, remote: str, *, progress: Progress | None = None
    ) -> None:
        """Copy a local file or directory tree to ``remote``.

        Each file is written under a temporary name and renamed into place;
        parent directories are created; modes are kept. A tree's contents go
        into ``remote``. Its subdirectories get their local modes, and so does
        ``remote`` unless it existed before (so uploading into ``.`` leaves the
        home directory's mode alone). ``progress(sent, total)`` is called
        during each file. Symbolic links are followed.
        """
        local = Path(local)
        if not local.exists():
            raise SshError(f"Cannot upload {local}: no such local file or directory")
        if local.is_file() and posixpath.basename(remote) in ("", ".", ".."):
            raise SshError(f"Cannot upload {local} to {remote!r}: name the file")
        # Temporary names that a failed attempt could not remove (the
        # connection was gone); the retry removes them first.
        leftovers: list[str] = []
        target_existed: list[bool] = []

        def operation(transport: paramiko.Transport) -> None:
            with self._sftp(transport) as sftp:
                for name in list(leftovers):
                    with suppress(FileNotFoundError):
                        sftp.remove(name)
                    leftovers.remove(name)
                if local.is_dir():
                    if not target_existed:
                        target_existed.append(_remote_exists(sftp, remote))
                    self._upload_tree(sftp, local, remote, leftovers, progress)
                    if not target_existed[0]:
                        sftp.chmod(remote, stat.S_IMODE(local.stat().st_mode))
                else:
                    _makedirs(sftp, posixpath.dirname(remote))
                    self._upload_file(sftp, local, remote, leftovers, progress)

        self._call(f"upload of {local} to {remote}", operation)

    def _upload_tree(
        self,
        sftp: paramiko.SFTPClient,
        local: Path,
        remote: str,
        leftovers: list[str],
        progress: Progress | None,
    ) -> None:
        _makedirs(sftp, remote)
        for entry in sorted(local.iterdir()):
            target = posixpath.join(remote, entry.name)
            if entry.is_dir():
                self._upload_subtree(sftp, entry, target, leftovers, progress)
            elif entry.is_file():
                self._upload_file(sftp, entry, target, leftovers, progress)
            else:
                logger.warning("Skipping %s in upload: not a regular file", entry)

    def _upload_subtree(
        self,
        sftp: paramiko.SFTPClient,
        local: Path,
        remote: str,
        leftovers: list[str],
        progress: Progress | None,
    ) -> None:
        self._upload_tree(sftp, local, remote, leftovers, progress)
        sftp.chmod(remote, stat.S_IMODE(local.stat().st_mode))

    def _upload_file(
        self,
        sftp: paramiko.SFTPClient,
        local: Path,
        remote: str,
        leftovers: list[str],
        progress: Progress | None,
    ) -> None:
        temporary = _temporary_name(remote)
        try:
            sftp.put(str(local), temporary, callback=progress, confirm=True)
            sftp.chmod(temporary, stat.S_IMODE(local.stat().st_mode))
            self._rename(sftp, temporary, remote)
        except BaseException:
            try:
                sftp.remove(temporary)
            except FileNotFoundError:
                pass
            except _TRANSPORT_ERRORS:
                leftovers.append(temporary)
            raise

    def _rename(self, sftp: paramiko.SFTPClient, source: str, target: str) -> None:
        if not self._plain_rename:
            try:
                sftp.posix_rename(source, target)
                return
            except OSError as exc:
                if not _is_unsupported(exc):
                    raise
                logger.info(
                    "%s does not support posix-rename; replacing files by remove "
                    "and rename",
                    self._endpoint,
                )
                self._plain_rename = True
        # Without posix-rename the target is briefly absent, but it is never
        # present with partial contents.
        with suppress(FileNotFoundError):
            sftp.remove(target)
        sftp.rename(source, target)

    def download(
        self, remote: str, local: Path, *, progress: Progress | None = None
    ) -> None:
        """Copy a remote file or directory tree to ``local``, atomically per file.

        Modes are kept, modification times are not (a downloaded file is as
        new as the download). As in ``upload``, the mode of a target
        directory that existed before is left alone. ``progress(received,
        total)`` is called during each file. Symbolic links to files are
        followed, those to directories are skipped.
        """
        local = Path(local)
        target_existed = local.is_dir()

        def operation(transport: paramiko.Transport) -> None:
            with self._sftp(transport) as sftp:
                try:
                    attributes = sftp.stat(remote)
                except FileNotFoundError:
                    raise SshError(
                        f"Cannot download {remote} from {self._endpoint}: not found"
                    ) from None
                if stat.S_ISDIR(attributes.st_mode or 0):
                    _download_tree(sftp, remote, local, progress)
                    if not target_existed:
                        os.chmod(local, stat.S_IMODE(attributes.st_mode or 0o755))
                else:
                    _download_file(sftp, remote, local, attributes, progress)

        self._call(f"download of {remote} to {local}", operation)

    def exists(self, remote: str) -> bool:
        """Return whether ``remote`` exists (following symbolic links)."""

        def operation(transport: paramiko.Transport) -> bool:
            with self._sftp(transport) as sftp:
                return _remote_exists(sftp, remote)

        return self._call(f"stat of {remote}", operation)

    def sha256(self, remote_paths: list[str]) -> dict[str, str]:
        """Return the sha256 of each remote regular file that exists.

        Runs one ``sha256sum`` per 64 KiB of quoted paths. Missing files,
        directories and unreadable files are left out of the result.
        """
        digests: dict[str, str] = {}
        for batch in _batches(remote_paths, SHA256_ARGUMENT_BYTES):
            arguments = " ".join(shlex.quote(path) for path in batch)
            command = f"sha256sum -- {arguments} 2>/dev/null; [ $? -le 1 ]"
            # No timeout, because hashing large inputs can take minutes.
            output = self._check(
                f"sha256sum of {len(batch)} files", command, timeout=None
            )
            digests.update(_parse_sha256sum(output, set(batch)))
        return digests

    def _read_file(self, path: str) -> bytes | None:
        def operation(transport: paramiko.Transport) -> bytes | None:
            with self._sftp(transport) as sftp:
                try:
                    with sftp.open(path, "rb") as remote_file:
                        return remote_file.read()
                except FileNotFoundError:
                    return None

        return self._call(f"read of {path}", operation)


# -- transfers ---------------------------------------------------------------


def _makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
    path = posixpath.normpath(path) if path else ""
    if path in ("", ".", "/"):
        return
    current = "/" if path.startswith("/") else ""
    for part in path.strip("/").split("/"):
        current = posixpath.join(current, part) if current else part
        try:
            attributes = sftp.stat(current)
        except FileNotFoundError:
            try:
                sftp.mkdir(current)
                continue
            except OSError:
                # Another thread may have created it in between.
                attributes = sftp.stat(current)
        if not stat.S_ISDIR(attributes.st_mode or 0):
            raise NotADirectoryError(f"{current} exists and is not a directory")


def _remote_exists(sftp: paramiko.SFTPClient, path: str) -> bool:
    try:
        sftp.stat(path)
    except FileNotFoundError:
        return False
    return True


def _download_tree(
    sftp: paramiko.SFTPClient, remote: str, local: Path, progress: Progress | None
) -> None:
    local.mkdir(parents=True, exist_ok=True)
    for entry in sorted(sftp.listdir_attr(remote), key=lambda e: e.filename):
        source = posixpath.join(remote, entry.filename)
        target = local / entry.filename
        mode = entry.st_mode or 0
        if stat.S_ISLNK(mode):
            entry = sftp.stat(source)
            mode = entry.st_mode or 0
            if stat.S_ISDIR(mode):
                logger.warning("Skipping %s in download: link to a directory", source)
                continue
        if stat.S_ISDIR(mode):
            _download_tree(sftp, source, target, progress)
            os.chmod(target, stat.S_IMODE(mode))
        elif stat.S_ISREG(mode):
            _download_file(sftp, source, target, entry, progress)
        else:
            logger.warning("Skipping %s in download: not a regular file", source)


def _download_file(
    sftp: paramiko.SFTPClient,
    remote: str,
    local: Path,
    attributes: paramiko.SFTPAttributes,
    progress: Progress | None,
) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(
        dir=local.parent, prefix=f".{local.name}.", suffix=".part"
    )
    try:
        with os.fdopen(descriptor, "wb") as local_file:
            size = sftp.getfo(
                remote,
                local_file,
                callback=progress,
                prefetch=True,
                max_concurrent_prefetch_requests=PREFETCH_REQUESTS,
            )
        if attributes.st_size is not None and size < attributes.st_size:
            raise SshError(
                f"Download of {remote} stopped after {size} of "
                f"{attributes.st_size} bytes"
            )
        os.chmod(temporary, stat.S_IMODE(attributes.st_mode or 0o644))
        os.replace(temporary, local)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _temporary_name(path: str) -> str:
    directory, name = posixpath.split(path)
    return posixpath.join(directory, f".{name}.{uuid.uuid4().hex[:12]}.part")


def _is_unsupported(exc: OSError) -> bool:
    # paramiko turns SSH_FX_OP_UNSUPPORTED into an IOError with this text.
    return "unsupported" in str(exc).lower()


# -- remote scripts ----------------------------------------------------------


def _start_script(job_dir: str) -> str:
    directory = shlex.quote(job_dir)
    # The runner traps SIGTERM (instead of ignoring it, which children would
    # inherit) so that it still records the exit code of a command that
    # kill_detached ended. `$!` is the process-group id because a background
    # job of a non-interactive sh is no group leader, so setsid execs in place.
    runner = (
        "trap : TERM; "
        'sh "$1/cmd.sh"; '
        'echo $? > "$1/exit.tmp" && mv -f "$1/exit.tmp" "$1/exit"'
    )
    return "\n".join(
        [
            "set -e",
            f"d={directory}",
            'mkdir -p -- "$d"',
            'rm -f -- "$d/exit" "$d/exit.tmp" "$d/pid"',
            'cat > "$d/cmd.sh"',
            "command -v setsid > /dev/null || "
            "{ echo 'setsid not found on the instance' >&2; exit 127; }",
            f'setsid sh -c {shlex.quote(runner)} sh "$d" '
            '< /dev/null >> "$d/log" 2>&1 &',
            'echo $! > "$d/pid.tmp"',
            'mv -f "$d/pid.tmp" "$d/pid"',
        ]
    )


# Zombies count as members for `kill -0`, and a container whose PID 1 reaps
# orphans late (or never) keeps them, so `alive` queries ps for live members and
# falls back to `kill -0` without awk or where ps lacks -o pgid (busybox).
_KILL_SCRIPT = """\
d={directory}
[ -e "$d/exit" ] && exit 0
pg=$(cat "$d/pid" 2>/dev/null) || exit 0
case "$pg" in ""|*[!0-9]*) echo "invalid pid file: $pg" >&2; exit 2;; esac
# Never signal group 0 or 1: `kill -- -1` would hit every process.
[ "$pg" -gt 1 ] || {{ echo "invalid pid file: $pg" >&2; exit 2; }}
alive() {{
  if command -v awk > /dev/null && out=$(ps -e -o pgid= -o stat= 2>/dev/null); then
    printf '%s\\n' "$out" |
      awk -v g="$pg" '$1 == g && $2 !~ /^Z/ {{ f = 1 }} END {{ exit !f }}'
  else
    kill -0 -- "-$pg" 2>/dev/null
  fi
}}
wait_gone() {{
  i=0
  while [ "$i" -lt "$1" ] && alive; do sleep 0.1; i=$((i + 1)); done
}}
kill -TERM -- "-$pg" 2>/dev/null || exit 0
wait_gone {polls}
alive || exit 0
kill -KILL -- "-$pg" 2>/dev/null || exit 0
wait_gone 20
"""


def _kill_script(job_dir: str, grace: float) -> str:
    polls = max(int(grace * 10), 1)
    return _KILL_SCRIPT.format(directory=shlex.quote(job_dir), polls=polls)


def _batches(paths: list[str], limit: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for path in dict.fromkeys(paths):
        length = len(shlex.quote(path)) + 1
        if batch and size + length > limit:
            yield batch
            batch, size = [], 0
        batch.append(path)
        size += length
    if batch:
        yield batch


def _parse_sha256sum(output: str, requested: set[str]) -> dict[str, str]:
    digests: dict[str, str] = {}
    for line in output.splitlines():
        # GNU sha256sum starts a line with a backslash when it escaped a
        # backslash or newline in the file name.
        escaped = line.startswith("\\")
        if escaped:
            line = line[1:]
        digest, separator, name = line.partition("  ")
        if not separator:
            digest, separator, name = line.partition(" *")
        if escaped:
            name = name.replace("\\\\", "\0").replace("\\n", "\n").replace("\0", "\\")
        if name in requested and len(digest) == 64:
            digests[name] = digest
    return digests


# -- command streams ---------------------------------------------------------


def _drain(receive: Callable[[int], bytes], chunks: list[bytes]) -> None:
    with suppress(*_TRANSPORT_ERRORS):
        while data := receive(65536):
            chunks.append(data)


def _feed(channel: paramiko.Channel, data: bytes) -> None:
    with suppress(*_TRANSPORT_ERRORS):
        channel.sendall(data)
        channel.shutdown_write()


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(deadline - time.monotonic(), 0.0)


def _shorten(command: str, limit: int = 80) -> str:
    first_line = command.strip().splitlines()[0] if command.strip() else ""
    if len(first_line) > limit or first_line != command.strip():
        first_line = first_line[:limit] + "..."
    return repr(first_line)


def _describe_error(exc: BaseException | None) -> str:
    if exc is None:
        return "no attempt made"
    if not str(exc):
        return type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


# -- host keys ---------------------------------------------------------------


def _host_key_line(key: paramiko.PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


def _normalize_host_key(line: str) -> str:
    """Return ``"<type> <base64>"`` from a key line, dropping any comment."""
    parts = line.split()
    if len(parts) < 2:
        raise ConfigError(
            f"Invalid pinned host key {line!r}: expected '<type> <base64>', as in "
            "an OpenSSH known_hosts line"
        )
    return f"{parts[0]} {parts[1]}"


def _fingerprint(key_line: str) -> str:
    """Return the key type and OpenSSH's SHA256 fingerprint of a key line."""
    key_type, blob = key_line.split()[:2]
    try:
        digest = hashlib.sha256(base64.b64decode(blob)).digest()
    except ValueError:
        return f"{key_type} (undecodable key)"
    return f"{key_type} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


def _prefer_host_key_type(transport: paramiko.Transport, key_type: str) -> None:
    # A server with several host keys shows the one of the first algorithm
    # both sides support, so ask for the pinned one first. RSA keys sign
    # with the SHA-2 algorithms (OpenSSH 8.8 disabled ssh-rsa signatures).
    wanted = [key_type]
    if key_type == "ssh-rsa":
        wanted = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]
    options = transport.get_security_options()
    available = list(options.key_types)
    first = [name for name in wanted if name in available]
    options.key_types = first + [name for name in available if name not in first]


# -- key pair ----------------------------------------------------------------


def ensure_keypair(key_dir: Path) -> tuple[Path, str]:
    """Create (once) the pool's ed25519 key pair in ``key_dir``.

    Returns the private key's path (mode 0600) and the public key in
    OpenSSH format, as ``attach_ssh`` and ``authorized_keys`` take it.
    Safe against another process creating the pair at the same time.
    """
    key_dir = Path(key_dir)
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path = key_dir / KEY_NAME
    if not private_path.exists():
        _create_private_key(private_path)

    private_key = _load_ed25519(private_path)
    mode = stat.S_IMODE(private_path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "SSH private key %s had mode %o; setting 0600", private_path, mode
        )
        os.chmod(private_path, 0o600)

    public_bytes = private_key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_line = f"{public_bytes.decode()} {KEY_COMMENT}"
    public_path = key_dir / f"{KEY_NAME}.pub"
    if not public_path.exists() or public_path.read_text().strip() != public_line:
        _write_atomically(public_path, f"{public_line}\n".encode(), 0o644)
    return private_path, public_line


def _create_private_key(path: Path) -> None:
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    # Created with mode 0600 from the first byte (the umask can only remove
    # bits), and linked into place so that a key another process created in
    # the meantime is kept instead of overwritten.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as key_file:
            key_file.write(pem)
            key_file.flush()
            os.fsync(key_file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return
        except OSError:
            # Some filesystems, several FUSE mounts among them, have no hard links.
            if path.exists():
                return
            os.replace(temporary, path)
        logger.info("Created the pool's SSH key pair in %s", path.parent)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(temporary)


def _load_ed25519(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"Cannot read the SSH private key {path}: {exc}; move it away to let "
            "the pool create a new key pair"
        ) from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(
            f"SSH private key {path} is not an ed25519 key; move it away to let "
            "the pool create a new key pair"
        )
    return key


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as output:
            output.write(data)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
