"""One OpenSSH ``sshd`` per sandbox instance, as on a Vast.ai host.

Each sshd runs in a private mount namespace (``unshare --mount``) where
the instance's home directory is bind-mounted over ``/root``, so the login
``root`` gets ``HOME=/root`` and sees the instance's files there, not the
host's; only the sandbox Python's directories under the real ``/root``
are mounted back, read-only. Mounting needs root. The generated
``sshd_config``, the host key, the pid file and the log live in a work
directory outside the home.

sshd listens on 127.0.0.1 only while the instance accepts SSH. A watcher
thread starts it when the instance runs and stops it, cutting every
connection, when the instance stops, reboots, is destroyed, its host goes
offline or the ``accept_ssh`` fault hook returns False. Sessions get the
instance's environment through ``SetEnv``, including the token that
``processes.find_tagged_pids`` looks for, so ``ProcessGroup.kill_all``
also finds processes that sessions started or detached.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vastai_pool.sandbox.processes import TOKEN_VARIABLE
from vastai_pool.sandbox.sshd import HostConfig

logger = logging.getLogger(__name__)

SSHD = Path("/usr/sbin/sshd")
# Debian/Ubuntu, then Fedora/RHEL paths of OpenSSH's sftp-server.
SFTP_SERVERS = (
    Path("/usr/lib/openssh/sftp-server"),
    Path("/usr/libexec/openssh/sftp-server"),
    Path("/usr/lib/ssh/sftp-server"),
)
# sshd running as root exits at start without its privilege-separation
# directory.
PRIVSEP_DIR = Path("/run/sshd")
LOGIN_HOME = "/root"
WATCH_SECONDS = 0.05
START_TIMEOUT_SECONDS = 10.0
STOP_TIMEOUT_SECONDS = 5.0
# Attempts at a new port when the chosen one was taken before sshd bound it.
PORT_ATTEMPTS = 5
MAX_KILL_ROUNDS = 20
# Runs as `sh -c SCRIPT HOME SSHD CONFIG STASH PATH...` inside the new mount
# namespace. Each PATH (under /root) is bind-mounted read-only onto a
# directory of STASH before the home covers /root, then moved back to its
# own place. `exec` keeps the pid, so the Popen pid is sshd's listener.
NAMESPACE_SCRIPT = f"""set -e
home=$0 sshd=$1 config=$2 stash=$3
shift 3
i=0
for path in "$@"; do
  mkdir -p "$stash/$i"
  mount --bind "$path" "$stash/$i"
  mount -o remount,bind,ro "$stash/$i"
  i=$((i + 1))
done
mount --bind "$home" {LOGIN_HOME}
i=0
for path in "$@"; do
  mkdir -p "$path"
  mount --move "$stash/$i" "$path"
  i=$((i + 1))
done
exec "$sshd" -D -e -f "$config"
"""
SSHD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def openssh_unavailable_reason() -> str | None:
    """Return why this machine cannot run the backend, or None if it can."""
    if os.geteuid() != 0:
        return (
            "it needs root, to bind-mount each instance's home over /root in a "
            "private mount namespace"
        )
    if not SSHD.exists():
        return f"{SSHD} is missing (install openssh-server)"
    for tool in ("unshare", "mount"):
        if shutil.which(tool, path=SSHD_ENV["PATH"]) is None:
            return f"{tool} is not on PATH (install util-linux)"
    # Root without CAP_SYS_ADMIN (a container, a reduced bounding set) may
    # not create mount namespaces; every sshd would then fail to start.
    unshare = shutil.which("unshare", path=SSHD_ENV["PATH"])
    try:
        probe = subprocess.run(
            [str(unshare), "--mount", "--propagation", "private", "true"],
            env=SSHD_ENV,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare --mount could not run: {exc}"
    if probe.returncode != 0:
        return (
            "this process may not create a mount namespace (unshare --mount: "
            f"{probe.stderr.strip() or 'exit code ' + str(probe.returncode)}); "
            "it needs root with CAP_SYS_ADMIN"
        )
    return None


def python_paths_under_login_home() -> list[Path]:
    """Return the sandbox Python's directories that lie under the real /root.

    Sessions need them to run that Python (and the snakemake installed in
    it), so they are mounted read-only at the same place over the
    instance's home, where they show up as directories.
    """
    candidates = []
    for path in (sys.prefix, sys.base_prefix, os.path.dirname(sys.executable)):
        candidates += [Path(os.path.abspath(path)), Path(path).resolve()]
    inside = sorted(
        {path for path in candidates if path.is_relative_to(LOGIN_HOME)},
        key=lambda path: len(path.parts),
    )
    outermost: list[Path] = []
    for path in inside:
        if path != Path(LOGIN_HOME) and not any(
            path.is_relative_to(parent) for parent in outermost
        ):
            outermost.append(path)
    return outermost


class OpenSshHost:
    """The sshd of one instance, on 127.0.0.1.

    The port stays the same across restarts unless another process took it
    while sshd was stopped; the API then reports the new one.
    """

    def __init__(self, config: HostConfig, work_dir: Path) -> None:
        self.config = config
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.work_dir.chmod(0o700)
        self.config_path = self.work_dir / "sshd_config"
        self.key_path = self.work_dir / "ssh_host_ed25519_key"
        self.pid_path = self.work_dir / "sshd.pid"
        self.log_path = self.work_dir / "sshd.log"
        # One key for the instance's lifetime, so a client that pinned it at
        # first contact still matches after a stop and start.
        self._host_key_line = _write_host_key(self.key_path)
        self._port = _free_port()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._namespace: str | None = None
        # Incremented whenever sshd stops, so a watcher decision taken
        # before a stop is not applied after it.
        self._epoch = 0
        self._start_failed = False
        self._closed = threading.Event()
        self._thread = threading.Thread(
            target=self._watch,
            name=f"sandbox-openssh-{config.instance_id}",
            daemon=True,
        )

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1.

        Reading it starts sshd first if the instance accepts SSH, so the API
        never reports a port that nobody listens on yet.
        """
        if not self._is_running():
            self.sync()
        return self._port

    @property
    def host_key_line(self) -> str:
        """The host key as ``"<type> <base64>"``, as known_hosts lists it."""
        return self._host_key_line

    def start(self) -> None:
        """Start the watcher that runs sshd while the instance accepts SSH."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sshd for good and cut every connection (instance destroyed)."""
        self._closed.set()
        with self._lock:
            self._stop_sshd()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=STOP_TIMEOUT_SECONDS)

    def drop_connections(self) -> int:
        """Kill the sshd processes of every open connection; return how many.

        sshd stops too when the instance no longer accepts SSH. Processes
        that sessions started keep running, as with the paramiko backend.
        """
        with self._lock:
            dropped = self._kill_connections()
        self.sync()
        return dropped

    def sync(self) -> None:
        """Start or stop sshd to match whether the instance accepts SSH now."""
        with self._lock:
            epoch = self._epoch
        online = self.config.is_online()
        should_run = online and self.config.accept_connection(self.config.instance_id)
        stopped = False
        with self._lock:
            if self._closed.is_set() or epoch != self._epoch:
                return
            running = self._is_running()
            if should_run and not running and not self._start_failed:
                self._start_sshd()
            elif not should_run:
                self._start_failed = False
                if running:
                    self._stop_sshd()
                    stopped = True
        if stopped and not online:
            # A host that went offline (or an instance that stopped) loses
            # every process, detached jobs included.
            killed = self.config.processes.kill_all()
            logger.debug(
                "instance %d: sshd stopped, %d session processes killed",
                self.config.instance_id,
                killed,
            )

    # -- sshd process

    def _is_running(self) -> bool:
        process = self._process
        return process is not None and process.poll() is None

    def _watch(self) -> None:
        while not self._closed.wait(WATCH_SECONDS):
            try:
                self.sync()
            except Exception:
                logger.exception(
                    "instance %d: syncing sshd with the instance failed",
                    self.config.instance_id,
                )

    def _start_sshd(self) -> None:
        """Launch sshd and wait until it listens; called with the lock held."""
        if self._process is not None:
            logger.warning(
                "instance %d: sshd exited with %s; restarting it",
                self.config.instance_id,
                self._process.returncode,
            )
            self._process = None
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        for _ in range(PORT_ATTEMPTS):
            self._write_config()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.log_path.open("ab") as log:
                process = subprocess.Popen(
                    [
                        "unshare",
                        "--mount",
                        "--propagation",
                        "private",
                        "/bin/sh",
                        "-c",
                        NAMESPACE_SCRIPT,
                        str(self.config.home),
                        str(SSHD),
                        str(self.config_path),
                        str(self.work_dir / "mnt"),
                        *map(str, python_paths_under_login_home()),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=SSHD_ENV,
                    start_new_session=True,
                )
            try:
                listening = self._await_listening(process, offset)
            except BaseException:
                _kill_and_wait(process)
                raise
            if listening:
                return
            if "Address already in use" not in self._log_since(offset):
                break
            self._port = _free_port()
        self._start_failed = True
        logger.error(
            "instance %d: sshd failed to start on port %d; its log %s ends with:\n%s",
            self.config.instance_id,
            self._port,
            self.log_path,
            self._log_since(max(0, self.log_path.stat().st_size - 2000)),
        )

    def _await_listening(self, process: subprocess.Popen[bytes], offset: int) -> bool:
        banner = f"Server listening on 127.0.0.1 port {self._port}."
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            if banner in self._log_since(offset):
                namespace = _mount_namespace(process.pid)
                if namespace is None or namespace == _mount_namespace(os.getpid()):
                    # Never adopt our own namespace: _namespace_sshd_pids
                    # would then match every sshd on the machine.
                    _kill_and_wait(process)
                    return False
                self._process = process
                self._namespace = namespace
                logger.debug(
                    "instance %d: sshd %d listening on 127.0.0.1:%d",
                    self.config.instance_id,
                    process.pid,
                    self._port,
                )
                return True
            time.sleep(0.01)
        _kill_and_wait(process)
        return False

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _stop_sshd(self) -> None:
        """Kill the listener and every connection; called with the lock held."""
        self._epoch += 1
        process, self._process = self._process, None
        if process is not None:
            # The listener goes first, so no new connection arrives while
            # the connections are being killed.
            _kill_and_wait(process)
        self._kill_connections()
        self._namespace = None
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()
        if process is not None:
            logger.debug("instance %d: sshd stopped", self.config.instance_id)

    def _kill_connections(self) -> int:
        """SIGKILL every sshd in the namespace but the listener.

        Returns how many connections were cut, counted as the listener's
        children (one monitor process per connection), or every sshd
        process killed when the listener is already gone.
        """
        process = self._process
        listener = process.pid if process is not None and self._is_running() else None
        monitors = 0
        for _ in range(MAX_KILL_ROUNDS):
            pids = [pid for pid in self._namespace_sshd_pids() if pid != listener]
            if not pids:
                break
            for pid in pids:
                parent = _parent_pid(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    if listener is None or parent == listener:
                        monitors += 1
        return monitors

    def _namespace_sshd_pids(self) -> list[int]:
        """Return the live sshd processes in this host's mount namespace."""
        namespace = self._namespace
        if namespace is None:
            return []
        pids = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            if _mount_namespace(int(name)) != namespace:
                continue
            try:
                executable = os.readlink(f"/proc/{name}/exe")
            except OSError:
                continue
            if executable == str(SSHD):
                pids.append(int(name))
        return pids

    # -- files

    def _write_config(self) -> None:
        env = dict(self.config.session_env())
        env.update({"HOME": LOGIN_HOME, "PWD": LOGIN_HOME})
        env[TOKEN_VARIABLE] = self.config.processes.token
        lines = [
            f"Port {self._port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.key_path}",
            f"PidFile {self.pid_path}",
            # The file that attach-key requests append to, read on every
            # login, so keys attached later work without a restart.
            f"AuthorizedKeysFile {self.config.home / '.ssh' / 'authorized_keys'}",
            "AllowUsers root",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            # Instance homes sit under temporary directories, which are
            # world-writable, so sshd's ownership checks would reject them.
            "StrictModes no",
            "UsePAM no",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "AcceptEnv LANG LC_*",
            f"SetEnv {' '.join(_setenv_word(k, v) for k, v in sorted(env.items()))}",
            f"Subsystem sftp {_sftp_server()}",
            "LogLevel INFO",
            "",
        ]
        self.config_path.write_text("\n".join(lines))


def _setenv_word(name: str, value: str) -> str:
    text = f"{name}={value}"
    if any(char in text for char in '"\\\n'):
        raise ValueError(
            f"session variable {name} cannot be passed to sshd's SetEnv: its "
            f"value {value!r} contains a quote, backslash or newline"
        )
    return f'"{text}"'


def _sftp_server() -> str:
    for path in SFTP_SERVERS:
        if path.exists():
            return str(path)
    return "internal-sftp"


def _write_host_key(path: Path) -> str:
    """Write a new ed25519 host key (0600) and its .pub; return the public line."""
    private = Ed25519PrivateKey.generate()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as key_file:
        key_file.write(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.with_name(f"{path.name}.pub").write_bytes(public + b"\n")
    return public.decode()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may contain spaces; fields follow it.
    return int(stat.rsplit(")", 1)[1].split()[1])


def _kill_and_wait(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
