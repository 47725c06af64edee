"""``--vastai-max-instances 1`` in a real Snakemake run with two GPU models.

The jobs of one model share the one instance. The jobs of the other model
wait until no waiting job can use that instance, evict it and share a second
rental.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

SNAKEFILE = textwrap.dedent(
    """
    localrules: all

    rule all:
        input:
            expand("a{i}.txt", i=[1, 2]),
            expand("b{i}.txt", i=[1, 2]),

    rule on_3090:
        output: "a{i}.txt"
        resources: gpu=1, gpu_model="RTX_3090"
        shell: "echo {wildcards.i} > {output}"

    rule on_4090:
        output: "b{i}.txt"
        resources: gpu=1, gpu_model="RTX_4090"
        shell: "echo {wildcards.i} > {output}"
    """
)


class LedgerSampler:
    """Samples the sandbox ledger on a thread and keeps the most alive seen."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.max_alive = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> LedgerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            alive = len(self.sandbox.ledger()["alive"])
            self.max_alive = max(self.max_alive, alive)
            self.samples += 1


def run_snakemake(args: list[str], cwd: Path, home: Path) -> None:
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(home / "data")
    env["XDG_CACHE_HOME"] = str(home / "cache")
    for name in ("VAST_API_KEY", "SNAKEMAKE_VASTAI_API_KEY", "VAST_URL"):
        env.pop(name, None)
    completed = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, (
        f"snakemake failed with exit code {completed.returncode}\n"
        f"--- stdout\n{completed.stdout}\n--- stderr\n{completed.stderr}"
    )


def test_two_models_share_one_instance_slot(sandbox: Sandbox, tmp_path: Path) -> None:
    workdir = tmp_path / "workflow"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(SNAKEFILE)
    pool_db = tmp_path / "pool.sqlite"

    with LedgerSampler(sandbox) as sampler:
        run_snakemake(
            [
                "--executor",
                "vastai",
                "--vastai-api-url",
                sandbox.url,
                "--vastai-api-key",
                sandbox.api_key,
                "--vastai-pool-db",
                str(pool_db),
                "--vastai-max-instances",
                "1",
                "--jobs",
                "4",
            ],
            cwd=workdir,
            home=tmp_path / "home",
        )

    for name in ("a1", "a2", "b1", "b2"):
        assert (workdir / f"{name}.txt").read_text() == f"{name[1]}\n"

    ledger = sandbox.ledger()
    assert ledger["alive"] == []
    assert ledger["rented"] == 2
    assert sampler.samples > 0
    assert sampler.max_alive <= 1

    with sqlite3.connect(pool_db) as database:
        rentals = database.execute(
            "SELECT pk, gpu_name, rented_at, destroyed_at, destroy_reason "
            "FROM instances WHERE vast_id IS NOT NULL ORDER BY rented_at"
        ).fetchall()
        evicted = database.execute(
            "SELECT DISTINCT instance_pk FROM events WHERE reason = 'evicted'"
        ).fetchall()
        leases = database.execute(
            "SELECT instance_pk, outcome FROM leases ORDER BY id"
        ).fetchall()

    # One model after the other: the first instance is gone before the second
    # is rented, and it went by eviction.
    (first, second) = rentals
    assert {first[1], second[1]} == {"RTX 3090", "RTX 4090"}
    assert first[3] is not None
    assert first[3] <= second[2]
    assert first[4] == "evicted"
    assert evicted == [(first[0],)]
    assert [outcome for _, outcome in leases] == ["succeeded"] * 4
    assert [pk for pk, _ in leases] == [first[0]] * 2 + [second[0]] * 2
