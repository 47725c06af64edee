"""End-to-end runs of the digits example: locally and on a sandbox pool."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"
MODEL_COUNT = 8
# Outputs of a run made in examples/digits itself, left out of copies.
EXAMPLE_OUTPUTS = shutil.ignore_patterns(
    ".snakemake", "data", "models", "results", "logs", "__pycache__"
)
# prepare, one train and one evaluate per model, report, and the target rule.
JOB_COUNT = 1 + 2 * MODEL_COUNT + 1 + 1


def run_snakemake(args: list[str], cwd: Path, home: Path) -> None:
    """Run Snakemake in a subprocess; fail the test with its output if it fails."""
    env = dict(os.environ)
    # Keep the pool database, SSH keys and caches out of the user's home.
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
        f"snakemake {' '.join(args)} failed with exit code {completed.returncode}\n"
        f"--- stdout\n{completed.stdout}\n--- stderr\n{completed.stderr}"
    )


def result_files(workdir: Path) -> dict[str, bytes]:
    """Return {relative path: content} of every file under ``results/``."""
    results = workdir / "results"
    return {
        str(path.relative_to(results)): path.read_bytes()
        for path in sorted(results.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def local_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Results of one local ``--cores 2`` run, shared by the tests below."""
    workdir = tmp_path_factory.mktemp("local")
    home = tmp_path_factory.mktemp("local-home")
    run_snakemake(
        ["-s", str(EXAMPLE / "Snakefile"), "-d", str(workdir), "--cores", "2"],
        cwd=workdir,
        home=home,
    )
    return result_files(workdir)


def test_local_run_writes_all_results(local_results: dict[str, bytes]) -> None:
    metric_files = [name for name in local_results if name.startswith("metrics/")]
    assert len(metric_files) == MODEL_COUNT
    assert "report.md" in local_results
    assert "summary.json" in local_results


def test_local_run_is_reproducible(
    local_results: dict[str, bytes], tmp_path: Path
) -> None:
    run_snakemake(
        ["-s", str(EXAMPLE / "Snakefile"), "-d", str(tmp_path / "run"), "--cores", "1"],
        cwd=tmp_path,
        home=tmp_path / "home",
    )
    assert result_files(tmp_path / "run") == local_results


def test_pool_run_matches_local_run(
    local_results: dict[str, bytes], sandbox: Sandbox, tmp_path: Path
) -> None:
    # Snakemake packs only sources below the working directory into the
    # archive that jobs unpack, so the pool run works in a copy.
    workdir = tmp_path / "digits"
    shutil.copytree(EXAMPLE, workdir, ignore=EXAMPLE_OUTPUTS)
    pool_db = tmp_path / "pool.sqlite"

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
            "--jobs",
            "2",
        ],
        cwd=workdir,
        home=tmp_path / "home",
    )

    assert result_files(workdir) == local_results

    ledger = sandbox.ledger()
    assert ledger["rented"] <= 2
    assert ledger["alive"] == []

    # Read the pool database directly, independently of the pool's code.
    with sqlite3.connect(pool_db) as database:
        (remote_jobs,) = database.execute("SELECT COUNT(*) FROM leases").fetchone()
        (warm_jobs,) = database.execute(
            "SELECT COUNT(*) FROM leases WHERE warm"
        ).fetchone()
    # Every rule but the local target rule runs on the pool.
    assert remote_jobs == JOB_COUNT - 1
    assert warm_jobs >= 8
