"""SSH to instances through paramiko: commands, detached jobs, atomic transfers.

INTERFACE STUB, to be implemented. Everything on an instance is addressed
relative to the login's home directory (``/root`` on Vast.ai, the instance
directory in the sandbox), so the same code runs on both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str = "root"


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


class Connection:
    """One SSH connection to one instance, shared by all of its jobs.

    Thread-safe: several threads may run commands and transfers at once
    (each gets its own channel). Methods reconnect once when the transport
    has dropped, and raise ``SshError`` with the endpoint and the command or
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
        raise NotImplementedError

    @property
    def host_key(self) -> str | None:
        """The pinned host key, set by the first successful ``connect``."""
        raise NotImplementedError

    def connect(self, *, attempts: int = 1, delay: float = 2.0) -> str:
        """Open the connection (retrying ``attempts`` times); return the host key."""
        raise NotImplementedError

    def run(
        self, command: str, *, timeout: float | None = None, stdin: bytes | None = None
    ) -> CommandResult:
        """Run a shell command in the login's home directory and wait for it."""
        raise NotImplementedError

    def start_detached(self, command: str, *, job_dir: str) -> None:
        """Start ``command`` so that it outlives the SSH channel.

        Its combined output goes to ``<job_dir>/log`` and, when it ends, its
        exit code to ``<job_dir>/exit`` (written to a temporary name, then
        renamed); its process-group id goes to ``<job_dir>/pid``.
        """
        raise NotImplementedError

    def read_exit_code(self, job_dir: str) -> int | None:
        """Return the exit code of a detached command, or None while it runs."""
        raise NotImplementedError

    def read_from(self, path: str, offset: int) -> bytes:
        """Return the bytes of a remote file from ``offset`` on (b"" if absent)."""
        raise NotImplementedError

    def kill_detached(self, job_dir: str) -> None:
        """Kill the process group of a detached command, if it still runs."""
        raise NotImplementedError

    def upload(self, local: Path, remote: str) -> None:
        """Copy a local file or directory tree to ``remote``.

        Each file is written under a temporary name and renamed into place;
        parent directories are created; modes are kept.
        """
        raise NotImplementedError

    def download(self, remote: str, local: Path) -> None:
        """Copy a remote file or directory tree to ``local``, atomically per file."""
        raise NotImplementedError

    def exists(self, remote: str) -> bool:
        raise NotImplementedError

    def sha256(self, remote_paths: list[str]) -> dict[str, str]:
        """Return the sha256 of each remote regular file that exists."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def ensure_keypair(key_dir: Path) -> tuple[Path, str]:
    """Create (once) the pool's ed25519 key pair in ``key_dir``.

    Returns the private key's path (mode 0600) and the public key in
    OpenSSH format, as ``attach_ssh`` and ``authorized_keys`` take it.
    """
    raise NotImplementedError
