"""Processes started on a sandbox instance, and how they are all killed.

Every process of an instance carries ``VASTAI_SANDBOX_INSTANCE=<token>`` in
its environment. A command that detaches with ``setsid`` leaves the process
group it started in but keeps its environment. So ``kill_all`` kills the
tracked process groups first, then every process whose environment still
carries the token. It reads environments from ``/proc``, so it needs Linux.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

TOKEN_VARIABLE = "VASTAI_SANDBOX_INSTANCE"
# Rounds of /proc scanning in kill_all: a process that forks while it is
# being killed leaves a child that the next round finds.
MAX_KILL_ROUNDS = 20


class ProcessGroup:
    """Spawns and tracks every process that runs on one instance."""

    def __init__(self, token: str) -> None:
        self.token = token
        self._lock = threading.Lock()
        self._children: list[subprocess.Popen[bytes]] = []
        self._closed = False

    def spawn(
        self,
        argv: list[str],
        *,
        cwd: Path,
        env: Mapping[str, str],
        stdin: int | None = subprocess.PIPE,
        stdout: int | None = subprocess.PIPE,
        stderr: int | None = subprocess.PIPE,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new session (its own process group) and track it."""
        full_env = dict(env)
        full_env[TOKEN_VARIABLE] = self.token
        with self._lock:
            if self._closed:
                raise ProcessLookupError("instance is destroyed; no process may start")
            process = subprocess.Popen(
                argv,
                cwd=cwd,
                env=full_env,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
            self._children = [child for child in self._children if child.poll() is None]
            self._children.append(process)
        return process

    def kill_all(self, *, final: bool = False) -> int:
        """Kill every process of the instance; return how many were signalled.

        With ``final`` no new process may start afterwards (destroy).
        """
        with self._lock:
            self._closed = self._closed or final
            children = list(self._children)
            self._children = []
        killed = 0
        for child in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
                killed += 1
        for _ in range(MAX_KILL_ROUNDS):
            pids = find_tagged_pids(self.token)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        return killed


def find_tagged_pids(token: str) -> list[int]:
    """Return the live processes whose environment carries ``token``."""
    needle = f"{TOKEN_VARIABLE}={token}".encode() + b"\0"
    own_pid = os.getpid()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == own_pid:
            continue
        try:
            environ = Path("/proc", name, "environ").read_bytes()
        except OSError:
            continue
        # A zombie has an empty environment, so it is never matched again.
        if needle in environ:
            pids.append(int(name))
    return pids
