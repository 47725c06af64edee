"""Time the digits example on an embedded sandbox pool and as a local run.

Each repetition works in a fresh copy of examples/digits, so every pool run
rents its instances anew. Prints the machine, each wall time, the pool's
counts read from its database, and the medians as a Markdown table row.

Usage: python benchmarks/demo_walltime.py [--repeat N] [--jobs N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine
from pool_summary import find_pool_db, summarize_latest_run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"
# Outputs of a run made in examples/digits itself, left out of copies.
EXAMPLE_OUTPUTS = shutil.ignore_patterns(
    ".snakemake", "data", "models", "results", "logs", "__pycache__"
)


def timed_snakemake(args: list[str], workdir: Path) -> float:
    """Run Snakemake in ``workdir`` and return its wall time in seconds."""
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise SystemExit(
            f"snakemake {' '.join(args)} failed in {workdir} "
            f"with exit code {completed.returncode}; its output is above."
        )
    return elapsed


def fresh_copy(scratch: Path, name: str) -> Path:
    workdir = scratch / name
    shutil.copytree(EXAMPLE, workdir, ignore=EXAMPLE_OUTPUTS)
    return workdir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each kind")
    parser.add_argument(
        "--jobs", type=int, default=2, help="--jobs for the pool, --cores locally"
    )
    args = parser.parse_args(argv)

    print(f"machine: {describe_machine()}")
    pool_times: list[float] = []
    local_times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="digits-bench-") as scratch_name:
        scratch = Path(scratch_name)
        for repetition in range(1, args.repeat + 1):
            workdir = fresh_copy(scratch, f"pool-{repetition}")
            pool_args = [
                "--executor",
                "vastai",
                "--vastai-sandbox",
                "--jobs",
                str(args.jobs),
            ]
            seconds = timed_snakemake(pool_args, workdir)
            summary = summarize_latest_run(find_pool_db(workdir))
            pool_times.append(seconds)
            print(
                f"pool run {repetition}: {seconds:.1f} s, "
                f"{summary.instances_rented} instances rented, {summary.jobs} jobs, "
                f"{summary.warm_jobs} warm, {summary.instances_alive} still alive"
            )

            workdir = fresh_copy(scratch, f"local-{repetition}")
            seconds = timed_snakemake(["--cores", str(args.jobs)], workdir)
            local_times.append(seconds)
            print(f"local run {repetition}: {seconds:.1f} s")

    pool_median = statistics.median(pool_times)
    local_median = statistics.median(local_times)
    print()
    print("| workflow | runs | pool --jobs | pool median (s) | local median (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(
        f"| examples/digits | {args.repeat} | {args.jobs} "
        f"| {pool_median:.1f} | {local_median:.1f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
