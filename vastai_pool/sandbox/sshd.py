"""One SSH server per sandbox instance, built on paramiko's server API.

The server listens on 127.0.0.1 with its own ed25519 host key and accepts
the login ``root`` with a public key listed in the instance's
``~/.ssh/authorized_keys``. ``exec`` requests run through ``bash -c``
(``/bin/sh -c`` where bash is missing) in the instance's home directory.
Their stdin, stdout, stderr and exit status are wired to the channel. A
``shell`` request runs the shell reading commands from stdin, and the
``sftp`` subsystem serves the filesystem. Each connection may carry several
channels at once, and each command runs in a new process group, so a
command that backgrounds itself keeps running after its channel closes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paramiko.common import MSG_CHANNEL_REQUEST

from vastai_pool.sandbox.processes import ProcessGroup
from vastai_pool.sandbox.sftp import InstanceSftpServer, InstanceSftpSubsystem

logger = logging.getLogger(__name__)
# paramiko's server-side transports log here, apart from client-side logs.
TRANSPORT_LOGGER = f"{__name__}.transport"
logging.getLogger(TRANSPORT_LOGGER).setLevel(logging.CRITICAL)

LOGIN_USER = "root"
SHELL = shutil.which("bash") or "/bin/sh"
READ_CHUNK_BYTES = 32768
# Environment variables a client may set per session, as OpenSSH's
# default AcceptEnv allows.
ACCEPTED_ENV_PREFIXES = ("LANG", "LC_")


def generate_host_key() -> paramiko.PKey:
    """Generate a fresh ed25519 host key."""
    private = Ed25519PrivateKey.generate()
    text = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    return paramiko.Ed25519Key.from_private_key(io.StringIO(text))


def read_authorized_keys(path: Path) -> set[str]:
    """Return the base64 blobs of the public keys listed in ``path``."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return set()
    blobs = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not line.lstrip().startswith("#"):
            blobs.add(fields[1])
    return blobs


@dataclass
class HostConfig:
    """Callbacks and paths that an instance's SSH server gets from its instance."""

    instance_id: int
    home: Path
    processes: ProcessGroup
    # Returns the session environment (HOME, PATH, CONTAINER_ID, ...).
    session_env: Callable[[], Mapping[str, str]]
    # Returns False while the instance cannot take connections (not running).
    is_online: Callable[[], bool]
    # Fault hook point: returns False to drop a new connection.
    accept_connection: Callable[[int], bool]


class InstanceSshHost:
    """The SSH server of one instance, bound to 127.0.0.1 on a free port."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.host_key = generate_host_key()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._transports: list[paramiko.Transport] = []
        self._thread = threading.Thread(
            target=self._accept_loop,
            name=f"sandbox-sshd-{config.instance_id}",
            daemon=True,
        )

    @property
    def host_key_line(self) -> str:
        """The host key as ``"<type> <base64>"``, as known_hosts lists it."""
        return f"{self.host_key.get_name()} {self.host_key.get_base64()}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and close every open connection."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self.drop_connections()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def drop_connections(self) -> int:
        """Close every open connection (a fault hook uses this too)."""
        with self._lock:
            transports, self._transports = self._transports, []
        for transport in transports:
            transport.close()
        return len(transports)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                break
            instance_id = self.config.instance_id
            if not self.config.is_online() or not self.config.accept_connection(
                instance_id
            ):
                logger.debug("instance %d: dropped an SSH connection", instance_id)
                sock.close()
                continue
            threading.Thread(
                target=self._serve_connection,
                args=(sock,),
                name=f"sandbox-ssh-{instance_id}",
                daemon=True,
            ).start()

    def _serve_connection(self, sock: socket.socket) -> None:
        transport = SessionTransport(sock)
        transport.set_log_channel(TRANSPORT_LOGGER)
        transport.add_server_key(self.host_key)
        transport.set_subsystem_handler(
            "sftp", InstanceSftpSubsystem, InstanceSftpServer, home=self.config.home
        )
        with self._lock:
            if self._stop.is_set():
                transport.close()
                return
            self._transports = [t for t in self._transports if t.is_active()]
            self._transports.append(transport)
        try:
            transport.start_server(server=SessionServer(self.config))
        except (paramiko.SSHException, EOFError, OSError) as error:
            logger.debug(
                "instance %d: SSH negotiation failed: %s",
                self.config.instance_id,
                error,
            )
            transport.close()


class SessionServer(paramiko.ServerInterface):
    """Authentication and channel requests of one SSH connection."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self._channel_env: dict[int, dict[str, str]] = {}
        # Session threads whose channel request has no reply yet, by channel id.
        self._pending: dict[int, threading.Thread] = {}

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        authorized = read_authorized_keys(self.config.home / ".ssh" / "authorized_keys")
        if username == LOGIN_USER and key.get_base64() in authorized:
            return paramiko.AUTH_SUCCESSFUL
        logger.info(
            "instance %d: rejected SSH key %s for user %r",
            self.config.instance_id,
            key.fingerprint,
            username,
        )
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_env_request(
        self, channel: paramiko.Channel, name: bytes | str, value: bytes | str
    ) -> bool:
        key = name.decode() if isinstance(name, bytes) else name
        text = value.decode() if isinstance(value, bytes) else value
        if not key.startswith(ACCEPTED_ENV_PREFIXES):
            return False
        self._channel_env.setdefault(channel.get_id(), {})[key] = text
        return True

    def check_channel_pty_request(self, *args: object) -> bool:
        # No terminal is allocated; accepting keeps `ssh -t` clients working.
        return True

    def check_channel_window_change_request(self, *args: object) -> bool:
        return True

    def check_channel_exec_request(
        self, channel: paramiko.Channel, command: bytes | str
    ) -> bool:
        text = command.decode() if isinstance(command, bytes) else command
        return self._start(channel, [SHELL, "-c", text])

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        return self._start(channel, [SHELL])

    def _start(self, channel: paramiko.Channel, argv: list[str]) -> bool:
        env = dict(self.config.session_env())
        env.update(self._channel_env.pop(channel.get_id(), {}))
        try:
            process = self.config.processes.spawn(argv, cwd=self.config.home, env=env)
        except (OSError, ProcessLookupError) as error:
            logger.warning(
                "instance %d: could not start command %r: %s",
                self.config.instance_id,
                argv[-1],
                error,
            )
            return False
        self._pending[channel.get_id()] = threading.Thread(
            target=_run_session,
            args=(channel, process),
            name=f"sandbox-exec-{self.config.instance_id}",
            daemon=True,
        )
        return True

    def start_pending(self, channel: paramiko.Channel) -> None:
        """Start wiring the channel's command, now that its request has a reply."""
        session = self._pending.pop(channel.get_id(), None)
        if session is not None:
            session.start()


def _handle_request_then_start(
    channel: paramiko.Channel, message: paramiko.Message
) -> None:
    paramiko.Channel._handle_request(channel, message)
    server = channel.transport.server_object
    if isinstance(server, SessionServer):
        server.start_pending(channel)


class SessionTransport(paramiko.Transport):
    """A server transport that starts a command after replying to its request.

    paramiko sends the reply to an ``exec`` request only after the server
    callback returns. A command that ended and closed its channel before
    that reply made the client raise "Channel closed", so the command's
    I/O thread starts from this handler, after the reply is sent.
    """

    _channel_handler_table = {
        **paramiko.Transport._channel_handler_table,
        MSG_CHANNEL_REQUEST: _handle_request_then_start,
    }


def _run_session(channel: paramiko.Channel, process: subprocess.Popen[bytes]) -> None:
    """Wire a process to a channel until it exits, then send its exit status."""
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None

    threading.Thread(
        target=_pump_channel_to_stdin, args=(channel, process.stdin), daemon=True
    ).start()
    readers = [
        threading.Thread(
            target=_pump_output, args=(process.stdout, channel.sendall), daemon=True
        ),
        threading.Thread(
            target=_pump_output,
            args=(process.stderr, channel.sendall_stderr),
            daemon=True,
        ),
    ]
    for reader in readers:
        reader.start()

    return_code = process.wait()
    # Like sshd, the channel stays open while any process keeps the output
    # pipes open, e.g. a background job that did not redirect them.
    for reader in readers:
        reader.join()

    status = return_code if return_code >= 0 else 128 + signal.Signals(-return_code)
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        channel.send_exit_status(int(status))
        channel.shutdown_write()
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        channel.close()


def _pump_channel_to_stdin(channel: paramiko.Channel, stdin: IO[bytes]) -> None:
    try:
        while True:
            data = channel.recv(READ_CHUNK_BYTES)
            if not data:
                break
            stdin.write(data)
            stdin.flush()
    except (OSError, EOFError, ValueError):
        pass
    finally:
        with contextlib.suppress(OSError, ValueError):
            stdin.close()


def _pump_output(stream: IO[bytes], send: Callable[[bytes], None]) -> None:
    try:
        while True:
            data = os.read(stream.fileno(), READ_CHUNK_BYTES)
            if not data:
                break
            send(data)
    except (OSError, EOFError, paramiko.SSHException):
        # The client went away: closing the pipe lets the process see
        # EPIPE instead of blocking on a full pipe forever.
        pass
    finally:
        stream.close()
