"""A real OpenSSH server on 127.0.0.1 for tests: ``SshdHost`` and fixtures.

The server runs as the current user from a private configuration, host key
and ``authorized_keys`` file under a temporary directory. It logs in the
current user, whose home directory is the real one (``/root`` when tests run
as root), so tests work under a unique directory there and remove it.
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from vastai_pool.ssh import Endpoint, ensure_keypair

SSHD = Path("/usr/sbin/sshd")
# sshd running as root needs its privilege-separation directory.
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT = 20.0

requires_sshd = pytest.mark.skipif(
    not SSHD.exists(),
    reason="OpenSSH server missing at /usr/sbin/sshd (apt-get install openssh-server)",
)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SshdHost:
    """Start ``sshd -D -e`` on 127.0.0.1 (a free port by default); stop it on exit.

    ``authorized_keys`` lines are accepted for the current user. ``host_key``
    is the server's public key as ``"<type> <base64>"``.
    """

    def __init__(
        self, work_dir: Path, authorized_keys: list[str], *, port: int = 0
    ) -> None:
        self.work_dir = Path(work_dir)
        self.authorized_keys = authorized_keys
        self.user = getpass.getuser()
        self.home = Path(pwd.getpwnam(self.user).pw_dir)
        # 0 picks a free port at start.
        self.requested_port = port
        self.port = port
        self.host_key = ""
        self.log_path = self.work_dir / "sshd.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(host="127.0.0.1", port=self.port, user=self.user)

    def __enter__(self) -> SshdHost:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if not SSHD.exists():
            raise RuntimeError(f"{SSHD} is missing: install openssh-server")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        host_key_path = self._write_host_key()
        keys_path = self.work_dir / "authorized_keys"
        keys_path.write_text("".join(f"{line}\n" for line in self.authorized_keys))

        # A port picked by free_port() can be taken before sshd binds it.
        for _ in range(1 if self.requested_port else 5):
            self.port = self.requested_port or free_port()
            config_path = self._write_config(host_key_path, keys_path)
            if self._launch(config_path):
                return
        raise RuntimeError(f"sshd did not start; its log:\n{self._log_tail()}")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def _write_host_key(self) -> Path:
        key = ed25519.Ed25519PrivateKey.generate()
        path = self.work_dir / "ssh_host_ed25519_key"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as key_file:
            key_file.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.OpenSSH,
                    serialization.NoEncryption(),
                )
            )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        self.host_key = public.decode()
        return path

    def _write_config(self, host_key_path: Path, keys_path: Path) -> Path:
        path = self.work_dir / "sshd_config"
        path.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {host_key_path}",
                    f"PidFile {self.work_dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {keys_path}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "StrictModes no",
                    "UsePAM no",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )
        return path

    def _launch(self, config_path: Path) -> bool:
        """Start sshd and wait for its banner; return False if it exited."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            if _has_banner(self.port):
                return True
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"sshd did not answer on port {self.port} within {START_TIMEOUT} s; "
            f"its log:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])


def _has_banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            return sock.recv(8).startswith(b"SSH-")
    except OSError:
        return False


@pytest.fixture(scope="session")
def pool_keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The pool's key pair (private key path, public key line) for tests."""
    return ensure_keypair(tmp_path_factory.mktemp("pool-keys"))


@pytest.fixture(scope="session")
def sshd_host(
    tmp_path_factory: pytest.TempPathFactory, pool_keypair: tuple[Path, str]
) -> Iterator[SshdHost]:
    """One OpenSSH server for the test session that accepts the pool key."""
    if not SSHD.exists():
        pytest.skip(
            f"OpenSSH server missing at {SSHD} (apt-get install openssh-server)"
        )
    with SshdHost(tmp_path_factory.mktemp("sshd"), [pool_keypair[1]]) as host:
        yield host


@pytest.fixture
def remote_dir(sshd_host: SshdHost) -> Iterator[str]:
    """A fresh directory name relative to the login's home, removed afterwards."""
    name = f"vastai-pool-test-{uuid.uuid4().hex[:12]}"
    yield name
    shutil.rmtree(sshd_host.home / name, ignore_errors=True)
