"""A rented sandbox instance: lifecycle, billing, processes and API row.

Lifecycle, over ``boot_seconds`` from creation (or from a start or a reboot):
``actual_status`` is null for the first 20 %, ``created`` until 40 %, then
``loading`` with pull progress in ``status_msg``, then ``running``. The
SSH server accepts connections only while the instance is ``running``.
An ``args`` runtype has no SSH; it runs ``onstart`` plus ``args`` as its
entrypoint and turns ``exited`` when that ends.

Billing, per second: storage (``storage_total_cost`` $/h for the
instance's disk) from creation until destroy, and the rental
(``dph_base`` $/h, or the bid price) only while ``running``. Nothing is
billed while the host is offline.
"""

from __future__ import annotations

import enum
import logging
import os
import shlex
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vastai_pool.sandbox.catalog import SMI_NAMES
from vastai_pool.sandbox.faults import FaultHooks
from vastai_pool.sandbox.hosts import PARAMIKO, SshHost, create_host
from vastai_pool.sandbox.nvidia_smi import write_nvidia_smi
from vastai_pool.sandbox.processes import ProcessGroup
from vastai_pool.sandbox.sshd import SHELL, HostConfig

logger = logging.getLogger(__name__)

# Fractions of boot_seconds at which a booting instance changes status.
CREATED_AT_FRACTION = 0.2
LOADING_AT_FRACTION = 0.4


class Phase(enum.Enum):
    """Lifecycle phase of an instance, valued as its ``actual_status``."""

    PROVISIONING = None
    CREATED = "created"
    LOADING = "loading"
    RUNNING = "running"
    REBOOTING = "rebooting"
    STOPPED = "stopped"
    EXITED = "exited"


BOOTING_PHASES = frozenset({Phase.PROVISIONING, Phase.CREATED, Phase.LOADING})


@dataclass
class LaunchSpec:
    """Launch parameters of a create request, after validation."""

    image: str | None
    disk_gb: float
    label: str | None
    env: dict[str, str]
    onstart: str | None
    runtype: str
    args: list[str] | None
    bid_price: float | None
    template_hash_id: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    def env_vars(self) -> dict[str, str]:
        """Return the ``-e K=V`` variables; keys like ``-p 8080:8080`` are options."""
        return {
            key: value for key, value in self.env.items() if not key.startswith("-")
        }


class Instance:
    """One rented offer, with its directory, SSH server and bill."""

    def __init__(
        self,
        *,
        instance_id: int,
        offer: dict[str, Any],
        spec: LaunchSpec,
        root_dir: Path,
        boot_seconds: float,
        authorized_keys: list[str],
        faults: FaultHooks,
        now: float,
        hosts: str = PARAMIKO,
    ) -> None:
        self.id = instance_id
        self.offer = offer
        self.spec = spec
        self.label = spec.label
        self.boot_seconds = boot_seconds
        self.faults = faults
        self.created_at = now
        self.token = uuid.uuid4().hex
        self.root_dir = root_dir
        self.home = root_dir / "root"
        self.bin_dir = root_dir / "bin"
        self.log_path = root_dir / "container.log"

        self.phase = Phase.PROVISIONING
        self.intended_status = "running"
        self.status_msg: str | None = None
        self.boot_started_at = now
        self.running_since: float | None = None
        self._boot_fault_status: str | None = None
        self.destroyed = False
        self.billed_usd = 0.0
        self._billed_until = now

        self._entrypoint: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self.processes = ProcessGroup(self.token)
        self._prepare_directory(authorized_keys)

        # ``hosts`` names the SSH server backend (see ``hosts.HOST_BACKENDS``).
        self.ssh: SshHost = create_host(
            hosts,
            HostConfig(
                instance_id=instance_id,
                home=self.home,
                processes=self.processes,
                session_env=self.session_env,
                is_online=self.accepts_ssh,
                accept_connection=faults.accept_ssh,
            ),
            work_dir=root_dir / "sshd",
        )
        self.ssh.start()
        self._log(f"sandbox: instance {instance_id} created from offer {offer['id']}")

    @property
    def has_ssh(self) -> bool:
        return self.spec.runtype != "args"

    def _prepare_directory(self, authorized_keys: list[str]) -> None:
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(parents=True, exist_ok=True)
        ssh_dir.chmod(0o700)
        keys_file = ssh_dir / "authorized_keys"
        keys_file.write_text("".join(f"{key}\n" for key in authorized_keys))
        keys_file.chmod(0o600)
        write_nvidia_smi(
            self.bin_dir,
            smi_name=SMI_NAMES.get(self.offer["gpu_name"], self.offer["gpu_name"]),
            num_gpus=self.offer["num_gpus"],
            gpu_ram_mb=self.offer["gpu_ram"],
            driver_version=self.offer["driver_version"],
            cuda_version=self.offer["cuda_max_good"],
            seed=self.token,
        )

    # -- environment and keys

    def session_env(self) -> dict[str, str]:
        """Return the environment of commands run over SSH."""
        path_parts = [str(self.bin_dir), os.path.dirname(sys.executable)]
        path_parts.append(os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"))
        return {
            "HOME": str(self.home),
            "PWD": str(self.home),
            "USER": "root",
            "LOGNAME": "root",
            "SHELL": SHELL,
            "PATH": os.pathsep.join(path_parts),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "CONTAINER_ID": str(self.id),
            "VAST_CONTAINERLABEL": f"C.{self.id}",
            "PUBLIC_IPADDR": "127.0.0.1",
        }

    def authorized_keys(self) -> list[str]:
        path = self.home / ".ssh" / "authorized_keys"
        try:
            return [line for line in path.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def add_authorized_key(self, key: str) -> bool:
        """Append ``key`` to authorized_keys; return False if already present."""
        blob = key.split()[1]
        with self._lock:
            existing = self.authorized_keys()
            if any(
                len(line.split()) > 1 and line.split()[1] == blob for line in existing
            ):
                return False
            path = self.home / ".ssh" / "authorized_keys"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{line}\n" for line in [*existing, key]))
            path.chmod(0o600)
            return True

    # -- lifecycle

    def host_online(self) -> bool:
        return not self.destroyed and self.faults.host_online(self.id)

    def accepts_ssh(self) -> bool:
        with self._lock:
            self.advance(time.time())
            return self.has_ssh and self.phase is Phase.RUNNING and self.host_online()

    def advance(self, now: float) -> None:
        """Move the lifecycle and the bill forward to ``now``."""
        with self._lock:
            if self.destroyed:
                return
            self._advance_phase(now)
            self._accrue(now)

    def _advance_phase(self, now: float) -> None:
        if self.phase is Phase.RUNNING and self._entrypoint is not None:
            code = self._entrypoint.poll()
            if code is not None:
                self._accrue(now)
                self.phase = Phase.EXITED
                self.running_since = None
                self.status_msg = f"container exited with code {code}"
                return
        if self.phase not in BOOTING_PHASES and self.phase is not Phase.REBOOTING:
            return
        fault = self.faults.boot_fault(self.id)
        self._boot_fault_status = fault.actual_status if fault else None
        if fault is not None:
            self.status_msg = fault.status_msg
            return
        elapsed = now - self.boot_started_at
        done_at = self.boot_started_at + self.boot_seconds
        if elapsed >= self.boot_seconds:
            self._accrue(done_at)
            self._enter_running(done_at)
        elif self.phase is Phase.REBOOTING:
            self.status_msg = "rebooting"
        elif elapsed >= LOADING_AT_FRACTION * self.boot_seconds:
            self.phase = Phase.LOADING
            span = (1.0 - LOADING_AT_FRACTION) * self.boot_seconds
            progress = (elapsed - LOADING_AT_FRACTION * self.boot_seconds) / span
            image = self.spec.image or "template image"
            self.status_msg = f"Pulling {image}: {int(progress * 100)}% downloaded"
        elif (
            self.phase is Phase.PROVISIONING
            and elapsed >= CREATED_AT_FRACTION * self.boot_seconds
        ):
            self.phase = Phase.CREATED
            self.status_msg = "Container created, waiting for the image"

    def _enter_running(self, at: float) -> None:
        self.phase = Phase.RUNNING
        self.running_since = at
        image = (self.spec.image or "template").replace(":", "_")
        kind = "args" if not self.has_ssh else "ssh"
        self.status_msg = f"success, running {image}/{kind}"
        self._log(f"sandbox: container started ({kind})")
        try:
            self._start_entrypoint()
        except OSError as error:
            self._log(f"sandbox: could not start the entrypoint: {error}")
            logger.warning(
                "instance %d: entrypoint failed to start: %s", self.id, error
            )

    def _start_entrypoint(self) -> None:
        env = self.session_env()
        env.update(self.spec.env_vars())
        if self.has_ssh:
            if not self.spec.onstart:
                return
            argv = [SHELL, "-c", self.spec.onstart]
        else:
            argv = shlex.split(self.spec.onstart or "") + list(self.spec.args or [])
            if not argv:
                argv = [SHELL, "-c", "true"]
        with self.log_path.open("ab") as log:
            process = self.processes.spawn(
                argv,
                cwd=self.home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not self.has_ssh:
            self._entrypoint = process

    def set_state(self, state: str, now: float) -> None:
        """Stop (kill processes, keep disk) or start (boot again)."""
        with self._lock:
            self.advance(now)
            self.intended_status = state
            if state == "stopped":
                if self.phase is Phase.STOPPED:
                    return
                self.phase = Phase.STOPPED
                self.running_since = None
                self.status_msg = "stopped by the user"
                self._entrypoint = None
                self.ssh.drop_connections()
                self.processes.kill_all()
                self._log("sandbox: container stopped")
            elif self.phase in (Phase.STOPPED, Phase.EXITED):
                self.phase = Phase.LOADING
                self.boot_started_at = now
                self.status_msg = "starting"

    def reboot(self, now: float) -> bool:
        """Restart the container, keeping its GPU; False unless it is running."""
        with self._lock:
            self.advance(now)
            if self.phase is not Phase.RUNNING:
                return False
            self.ssh.drop_connections()
            self.processes.kill_all()
            self._entrypoint = None
            self.phase = Phase.REBOOTING
            self.running_since = None
            self.boot_started_at = now
            self.status_msg = "rebooting"
            self._log("sandbox: container rebooting")
            return True

    def destroy(self, now: float) -> None:
        """Settle the bill, kill every process and stop the SSH server."""
        with self._lock:
            if self.destroyed:
                return
            self.advance(now)
            self.destroyed = True
            self.running_since = None
        self.ssh.stop()
        killed = self.processes.kill_all(final=True)
        logger.debug("instance %d: destroyed, %d processes killed", self.id, killed)

    # -- billing

    @property
    def rental_per_hour(self) -> float:
        if self.spec.bid_price is not None:
            return self.spec.bid_price
        return float(self.offer["dph_base"])

    def _accrue(self, until: float) -> None:
        start = self._billed_until
        if until <= start:
            return
        self._billed_until = until
        if not self.faults.host_online(self.id):
            return
        seconds = until - start
        cost = self.offer["storage_total_cost"] / 3600.0 * seconds
        if self.running_since is not None:
            running_seconds = until - max(start, self.running_since)
            if running_seconds > 0:
                cost += self.rental_per_hour / 3600.0 * running_seconds
        self.billed_usd += cost

    # -- API row

    def actual_status(self) -> str | None:
        if not self.host_online():
            return "offline"
        if self._boot_fault_status is not None and self.phase in BOOTING_PHASES:
            return self._boot_fault_status
        return self.phase.value

    def row(self, now: float) -> dict[str, Any]:
        """Return the instance as the show and list endpoints send it."""
        with self._lock:
            self.advance(now)
            return self._row(now)

    def _row(self, now: float) -> dict[str, Any]:
        offer = self.offer
        running = self.phase is Phase.RUNNING and self.host_online()
        ssh_open = running and self.has_ssh
        dph_total = self.rental_per_hour + offer["storage_total_cost"]
        uptime = (
            (now - self.running_since) / 60.0
            if running and self.running_since
            else None
        )
        cur_state = "stopped" if self.phase is Phase.STOPPED else "running"
        return {
            "id": self.id,
            "machine_id": offer["machine_id"],
            "host_id": offer["host_id"],
            "bundle_id": offer["bundle_id"],
            "label": self.label,
            "actual_status": self.actual_status(),
            "intended_status": self.intended_status,
            "cur_state": cur_state,
            "next_state": cur_state,
            "status_msg": self.status_msg,
            "image_uuid": self.spec.image,
            "image_args": list(self.spec.args or []),
            "image_runtype": self.spec.runtype,
            "onstart": self.spec.onstart,
            "template_id": None,
            "template_hash_id": self.spec.template_hash_id,
            "template_name": None,
            "jupyter_token": None,
            "extra_env": [[key, value] for key, value in self.spec.env.items()],
            "start_date": self.created_at,
            "end_date": offer["end_date"],
            "duration": offer["end_date"] - now,
            "uptime_mins": uptime,
            "ssh_host": "127.0.0.1" if ssh_open else None,
            "ssh_port": self.ssh.port if ssh_open else None,
            "ssh_idx": "1",
            "public_ipaddr": "127.0.0.1" if running else None,
            "ports": self._ports() if ssh_open else None,
            "direct_port_start": self.ssh.port if ssh_open else None,
            "direct_port_end": self.ssh.port if ssh_open else None,
            "local_ipaddrs": "127.0.0.1",
            "machine_dir_ssh_port": None,
            "num_gpus": offer["num_gpus"],
            "gpu_name": offer["gpu_name"],
            "gpu_ram": offer["gpu_ram"],
            "gpu_totalram": offer["gpu_total_ram"],
            "gpu_frac": offer["gpu_frac"],
            "gpu_util": 0.0 if running else None,
            "gpu_temp": 35.0 if running else None,
            "cpu_name": offer["cpu_name"],
            "cpu_cores": offer["cpu_cores"],
            "cpu_cores_effective": offer["cpu_cores_effective"],
            "cpu_ram": offer["cpu_ram"],
            "cpu_util": 0.0 if running else None,
            "mem_usage": None,
            "mem_limit": None,
            "vmem_usage": None,
            "disk_space": self.spec.disk_gb,
            "disk_usage": None,
            "disk_util": None,
            "inet_up": offer["inet_up"],
            "inet_down": offer["inet_down"],
            "reliability2": offer["reliability2"],
            "geolocation": offer["geolocation"],
            "verification": offer["verification"],
            "static_ip": offer["static_ip"],
            "hosting_type": offer["hosting_type"],
            "cuda_max_good": offer["cuda_max_good"],
            "driver_version": offer["driver_version"],
            "is_bid": self.spec.bid_price is not None,
            "min_bid": offer["min_bid"],
            "dph_base": self.rental_per_hour,
            "storage_cost": offer["storage_cost"],
            "storage_total_cost": offer["storage_total_cost"],
            "dph_total": dph_total,
            "credit_balance": None,
            "credit_discount": None,
            "time_remaining": "",
            "volume_info": [],
            "instance": {
                "gpuCostPerHour": self.rental_per_hour if running else 0.0,
                "diskHour": offer["storage_total_cost"],
                "totalHour": dph_total if running else offer["storage_total_cost"],
                "discountTotalHour": 0.0,
                "discountedTotalPerHour": dph_total,
            },
        }

    def _ports(self) -> dict[str, list[dict[str, str]]]:
        return {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(self.ssh.port)}]}

    # -- container log

    def _log(self, line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        with self.log_path.open("a") as log:
            log.write(f"{stamp} {line}\n")

    def read_log(self, tail: int | None) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []
        return "".join(f"{line}\n" for line in lines)
