"""Helpers for the pool-lifecycle tests: Snakemake runs in a subprocess, and
instances rented through the official SDK, against a sandbox the test starts."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest
from vastai import VastAI

from vastai_pool import store as pool_store
from vastai_pool.models import InstanceState
from vastai_pool.requirements import Hardware

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

T = TypeVar("T")

IMAGE = "python:3.11-slim"
HARDWARE = Hardware(
    num_gpus=1,
    gpu_name="RTX 4090",
    cpu_cores_effective=8,
    cpu_ram_mb=32000,
    disk_gb=10,
    dph_total=0.4,
    reliability=0.99,
    datacenter=False,
    country=None,
)


def sdk(sandbox: Sandbox) -> VastAI:
    return VastAI(api_key=sandbox.api_key, server_url=sandbox.url)


def create(sandbox: Sandbox, label: str) -> int:
    """Rent the cheapest one-GPU offer through the official SDK."""
    client = sdk(sandbox)
    offer = client.search_offers("num_gpus=1", order="dph+")[0]
    reply = client.create_instance(offer["id"], image=IMAGE, disk=10, label=label)
    return int(reply["new_contract"])


def renting_row(store: pool_store.Store, run_id: str, account: str, label: str) -> int:
    return pool_store.record_rental(
        store,
        run_id=run_id,
        account=account,
        label=label,
        offer_id=1,
        machine_id=None,
        image=IMAGE,
        extra_query="",
        hardware=HARDWARE,
        keep=False,
    )


def booted(
    store: pool_store.Store, run_id: str, account: str, label: str, vast_id: int
) -> pool_store.InstanceRecord:
    pk = renting_row(store, run_id, account, label)
    pool_store.transition(
        store, pk, InstanceState.BOOTING, why="created", vast_id=vast_id
    )
    return pool_store.transition(store, pk, InstanceState.IDLE, why="booted")


def write_workflow(workdir: Path, *, jobs: int, command: str) -> None:
    """A Snakefile with ``jobs`` one-GPU jobs running ``command``, then
    writing their output, and a local target rule."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "Snakefile").write_text(
        textwrap.dedent(
            f"""
            localrules: all

            rule all:
                input: expand("out/{{i}}.txt", i=range({jobs}))

            rule work:
                output: "out/{{i}}.txt"
                resources: gpu=1, mem_mb=500, disk_mb=500
                shell: "{command}; echo {{wildcards.i}} > {{output}}"
            """
        )
    )


def snakemake_command(
    sandbox: Sandbox, pool_db: Path, *, jobs: int, extra: list[str] | None = None
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--executor",
        "vastai",
        "--vastai-api-url",
        sandbox.url,
        "--vastai-api-key",
        sandbox.api_key,
        "--vastai-pool-db",
        str(pool_db),
        "--jobs",
        str(jobs),
        *(extra or []),
    ]


def environment(home: Path) -> dict[str, str]:
    """The test's environment with caches and data under ``home`` and no
    Vast.ai credentials of the user."""
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(home / "data")
    env["XDG_CACHE_HOME"] = str(home / "cache")
    for name in ("VAST_API_KEY", "SNAKEMAKE_VASTAI_API_KEY", "VAST_URL"):
        env.pop(name, None)
    return env


def start(command: list[str], workdir: Path, home: Path) -> subprocess.Popen[str]:
    """Start a command in its own process group, output to files in ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    # The child gets its own copy of the descriptor.
    with open(home / "snakemake.log", "w") as log:
        return subprocess.Popen(
            command,
            cwd=workdir,
            env=environment(home),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


def finish(process: subprocess.Popen[str], home: Path, timeout: float = 300) -> str:
    """Wait for a started command; fail with its output unless it succeeded."""
    code = process.wait(timeout=timeout)
    output = (home / "snakemake.log").read_text()
    assert code == 0, f"exit code {code}\n{output}"
    return output


def run(command: list[str], workdir: Path, home: Path) -> str:
    return finish(start(command, workdir, home), home)


def wait_for(probe: Callable[[], T | None], *, what: str, timeout: float = 120) -> T:
    """Poll ``probe`` until it returns a truthy value, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def query(pool_db: Path, sql: str, *args: object) -> list[tuple]:
    """Rows of ``sql`` on the pool database, read with plain sqlite3."""
    if not pool_db.exists():
        return []
    connection = sqlite3.connect(pool_db, timeout=30)
    try:
        return connection.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        # The tables do not exist until the run's migration finished.
        return []
    finally:
        connection.close()
