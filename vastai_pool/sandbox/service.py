"""The ``Sandbox``: a local Vast.ai marketplace with an HTTP API and SSH hosts."""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from vastai_pool.sandbox.fault_script import (
    SFTP_DURING,
    FaultedMarket,
    FaultScriptError,
    ScriptedFaults,
    load_script,
)
from vastai_pool.sandbox.faults import FaultHooks
from vastai_pool.sandbox.hosts import OPENSSH, resolve_hosts
from vastai_pool.sandbox.http_api import SandboxHttpServer
from vastai_pool.sandbox.sftp import set_transfer_hook

logger = logging.getLogger(__name__)

# Interval of the background thread that moves instance lifecycles forward.
TICK_SECONDS = 0.1


class Sandbox:
    """A Vast.ai REST API emulator on 127.0.0.1 whose instances are SSH hosts.

    The official ``vastai`` SDK and CLI talk to it through their server URL
    setting (``server_url=sandbox.url`` or ``--url``). Instances boot over
    ``boot_seconds``; their home directories live under ``state_dir``
    (a temporary directory, removed on ``stop``, when none is given).
    ``faults`` is a fault script (a dict, a list of rules or a JSON file
    path, see ``fault_script``) or a ``FaultHooks`` to install. ``hosts``
    picks the instances' SSH server: ``"paramiko"`` (in-process) or
    ``"openssh"`` (the system's sshd, one per instance with its home
    mounted over ``/root``; needs root); None reads ``$VASTAI_SANDBOX_HOSTS``
    and defaults to paramiko. An invalid or unusable choice raises
    ``HostBackendError``.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        port: int = 0,
        boot_seconds: float = 1.0,
        state_dir: Path | None = None,
        faults: FaultHooks | str | Path | dict[str, Any] | list[Any] | None = None,
        hosts: str | None = None,
    ) -> None:
        if boot_seconds < 0:
            raise ValueError(f"boot_seconds must be >= 0, got {boot_seconds}")
        self.api_key = api_key or f"sandbox-{secrets.token_hex(16)}"
        self._port = port
        self._owns_state_dir = state_dir is None
        if state_dir is None:
            state_dir = Path(tempfile.mkdtemp(prefix="vastai-sandbox-"))
        self.state_dir = Path(state_dir)
        try:
            self.hosts = resolve_hosts(hosts, state_dir=self.state_dir)
        except ValueError:
            if self._owns_state_dir:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            raise
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.market = FaultedMarket(
            state_dir=self.state_dir, boot_seconds=boot_seconds, hosts=self.hosts
        )
        self._server: SandboxHttpServer | None = None
        self._thread: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._ticking = threading.Event()
        self._stop_lock = threading.Lock()
        self.url = ""
        if faults is not None:
            self.load_faults(faults)

    def load_faults(
        self, script: FaultHooks | str | Path | dict[str, Any] | list[Any]
    ) -> FaultHooks:
        """Install a fault script (dict, list or JSON file path) or hooks; return it.

        Raises ``FaultScriptError`` naming the rule and value of a bad script.
        """
        hooks = script if isinstance(script, FaultHooks) else load_script(script)
        self.faults = hooks
        return hooks

    @property
    def faults(self) -> FaultHooks:
        """The fault hooks in effect; assign a ``FaultHooks`` subclass to change."""
        return self.market.faults

    @faults.setter
    def faults(self, hooks: FaultHooks) -> None:
        if self.hosts == OPENSSH and isinstance(hooks, ScriptedFaults):
            _reject_sftp_drops(hooks)
        # Instances keep the hooks they were created with.
        self.market.faults = hooks
        if isinstance(hooks, ScriptedFaults):
            hooks.bind(self.market)
            set_transfer_hook(self.state_dir, hooks.sftp_transfer)
        else:
            set_transfer_hook(self.state_dir, None)

    def start(self) -> Sandbox:
        """Start serving HTTP on 127.0.0.1 and return self."""
        if self._server is not None:
            return self
        self._server = SandboxHttpServer(
            ("127.0.0.1", self._port), self.market, self.api_key
        )
        port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self.market.base_url = self.url
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"sandbox-http-{port}",
            daemon=True,
        )
        self._thread.start()
        self._ticker = threading.Thread(
            target=self._tick, name=f"sandbox-tick-{port}", daemon=True
        )
        self._ticker.start()
        logger.info("sandbox: serving the Vast.ai API at %s", self.url)
        return self

    def stop(self) -> None:
        """Destroy every instance, then stop HTTP; safe to call twice."""
        with self._stop_lock:
            self._ticking.set()
            if self._ticker is not None:
                self._ticker.join(timeout=5)
                self._ticker = None
            self.market.destroy_all()
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None
                logger.info("sandbox: stopped %s", self.url)
            if self._thread is not None:
                self._thread.join(timeout=5)
                self._thread = None
            set_transfer_hook(self.state_dir, None)
            if self._owns_state_dir and self.state_dir.exists():
                shutil.rmtree(self.state_dir, ignore_errors=True)

    def _tick(self) -> None:
        while not self._ticking.wait(TICK_SECONDS):
            try:
                self.market.advance_all()
                hooks = self.market.faults
                if isinstance(hooks, ScriptedFaults):
                    hooks.advance(time.time())
            except Exception:
                logger.exception("sandbox: advancing the instances failed")

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def ledger(self) -> dict[str, Any]:
        """Return ``{"rented", "destroyed", "alive": [ids], "billed_usd"}``.

        With a fault script installed it also has ``faults``: {kind: count}.
        """
        return self.market.ledger()

    def instance_dir(self, instance_id: int) -> Path:
        """Return the home directory of an instance (alive or destroyed)."""
        return self.state_dir / "instances" / str(instance_id) / "root"

    def catalog(self) -> list[dict[str, Any]]:
        """Return every offer of the catalog, before storage pricing."""
        return self.market.catalog()


def _reject_sftp_drops(hooks: ScriptedFaults) -> None:
    # The hook of `"during": "sftp"` runs inside paramiko's SFTP server, at
    # a file read or write; OpenSSH's sftp-server has no such hook point.
    for rule in hooks.rules:
        if rule.kind == "ssh_drop" and rule.during == SFTP_DURING:
            raise FaultScriptError(
                f'fault rule {rule.index}: ssh_drop with "during": "sftp" needs the '
                "paramiko host backend; the openssh backend cannot drop a "
                "connection in the middle of a transfer. Remove the rule, drop "
                'its "during" (to drop after "after_seconds"), or use '
                "hosts='paramiko'."
            )
