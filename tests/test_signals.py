"""SIGTERM and SIGINT in the middle of a real ``snakemake --executor vastai`` run.

Either signal destroys every instance of the run and leaves the pool
database consistent: no instance busy or alive, no lease open.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

# Two jobs run for minutes, a third waits in the pool for a free instance.
SNAKEFILE = textwrap.dedent(
    """
    localrules: all

    rule all:
        input: expand("done{i}.txt", i=[1, 2, 3])

    rule slow:
        output: "done{i}.txt"
        resources: gpu=1
        shell: "touch started{wildcards.i}.flag && sleep 300 && touch {output}"
    """
)


def start_snakemake(sandbox: Sandbox, workdir: Path, home: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(home / "data")
    env["XDG_CACHE_HOME"] = str(home / "cache")
    for name in ("VAST_API_KEY", "SNAKEMAKE_VASTAI_API_KEY", "VAST_URL"):
        env.pop(name, None)
    args = [
        "--executor",
        "vastai",
        "--vastai-api-url",
        sandbox.url,
        "--vastai-api-key",
        sandbox.api_key,
        "--vastai-pool-db",
        str(workdir / "pool.sqlite"),
        "--vastai-max-instances",
        "2",
        "--jobs",
        "3",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_started_job(
    sandbox: Sandbox, process: subprocess.Popen, timeout: float = 120.0
) -> None:
    """Wait until a job runs on an instance (its flag file exists there)."""
    deadline = time.monotonic() + timeout
    instances = sandbox.state_dir / "instances"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise AssertionError(f"snakemake ended before any job started:\n{output}")
        if any(instances.glob("*/root/vastai-pool/work/*/started*.flag")):
            return
        time.sleep(0.1)
    raise AssertionError("no job started on an instance in time")


@pytest.mark.parametrize(
    ("signum", "repeats"),
    [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGINT, 3)],
    ids=["term", "int", "int-thrice"],
)
def test_signal_destroys_run_instances(
    sandbox: Sandbox, tmp_path: Path, signum: signal.Signals, repeats: int
) -> None:
    workdir = tmp_path / "workflow"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(SNAKEFILE)
    process = start_snakemake(sandbox, workdir, tmp_path / "home")
    try:
        wait_for_started_job(sandbox, process)
        # An impatient user presses Ctrl-C again while the run shuts down.
        for _ in range(repeats):
            if process.poll() is None:
                process.send_signal(signum)
            time.sleep(0.3)
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode != 0, output
    ledger = sandbox.ledger()
    assert ledger["alive"] == [], output
    assert ledger["rented"] >= 1

    with sqlite3.connect(workdir / "pool.sqlite") as database:
        states = database.execute("SELECT DISTINCT state FROM instances").fetchall()
        open_leases = database.execute(
            "SELECT id FROM leases WHERE ended_at IS NULL"
        ).fetchall()
        outcomes = database.execute("SELECT outcome FROM leases").fetchall()
        runs = database.execute("SELECT ended_at FROM runs").fetchall()
    assert states == [("destroyed",)], output
    assert open_leases == []
    assert outcomes
    assert {outcome for (outcome,) in outcomes} <= {"cancelled", "lost"}
    assert all(ended_at is not None for (ended_at,) in runs)
    # The job still waiting for an instance was never placed.
    assert len(outcomes) <= 2
