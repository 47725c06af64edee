"""Helpers shared by the sandbox tests: polling, SSH keys and sessions."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import paramiko
import pytest
import vastai
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

T = TypeVar("T")
DEADLINE_SECONDS = 30.0
IMAGE = "pytorch/pytorch:latest"


def wait_for(
    probe: Callable[[], T | None], *, what: str, timeout: float = DEADLINE_SECONDS
) -> T:
    """Poll ``probe`` until it returns a truthy value, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class KeyPair:
    """An ed25519 key pair: the paramiko key, its file and its public line."""

    def __init__(self, directory: Path, name: str) -> None:
        private = Ed25519PrivateKey.generate()
        self.path = directory / name
        self.path.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
        self.path.chmod(0o600)
        self.pkey = paramiko.Ed25519Key.from_private_key_file(str(self.path))
        self.public = f"{self.pkey.get_name()} {self.pkey.get_base64()} {name}"


def cheapest_offer(client: vastai.VastAI, query: str = "num_gpus=1") -> dict[str, Any]:
    offers = client.search_offers(query, order="dph+")
    assert offers, f"no offer for {query!r}"
    return offers[0]


def wait_running(client: vastai.VastAI, instance_id: int) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        row = client.show_instance(instance_id)
        if row and row["actual_status"] == "running":
            return row
        return None

    return wait_for(probe, what=f"instance {instance_id} to run")


def connect(row: dict[str, Any], key: KeyPair) -> paramiko.SSHClient:
    ssh = paramiko.SSHClient()
    ssh.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    ssh.connect(
        row["ssh_host"],
        port=row["ssh_port"],
        username="root",
        pkey=key.pkey,
        allow_agent=False,
        look_for_keys=False,
        timeout=10,
    )
    return ssh


def run(ssh: paramiko.SSHClient, command: str) -> tuple[int, str, str]:
    _, stdout, stderr = ssh.exec_command(command, timeout=30)
    out = stdout.read().decode()
    err = stderr.read().decode()
    return stdout.channel.recv_exit_status(), out, err


def process_alive(pid: int) -> bool:
    """Return True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
