"""Measure a Snakemake job's overhead on a warm instance, from run_job to its shell.

Runs real Snakemake in this process with ``--executor vastai
--vastai-sandbox --jobs 1`` on a workflow of independent jobs whose shell
command first writes ``date +%s.%N``. ``Executor.run_job`` is wrapped to
record when Snakemake handed each job to the plugin, so the overhead is the
time the job's shell started minus that moment. It covers everything the
plugin, the pool and the instance add: requirements, placement, shipping
the sources, starting the job over SSH and the remote Snakemake process
that runs the rule. Jobs whose lease was warm (read from the pool database)
count; the first job rents and boots the instance.

The sandbox's instances share this machine's clock, which the method needs.

Usage: python benchmarks/run_job_overhead.py [--jobs N]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from machine import describe_machine
from snakemake.cli import main as snakemake_main

from snakemake_executor_plugin_vastai.executor import Executor

SNAKEFILE = """
rule all:
    input: expand("stamps/{{i}}.txt", i=range({jobs}))

rule stamp:
    output: "stamps/{{i}}.txt"
    resources: gpu=1
    shell: "date +%s.%N > {{output}}"
"""


def run_workflow(workdir: Path, jobs: int) -> dict[str, float]:
    """Run the workflow; return {output path: time run_job was called}."""
    (workdir / "Snakefile").write_text(textwrap.dedent(SNAKEFILE.format(jobs=jobs)))
    handed_over: dict[str, float] = {}
    original = Executor.run_job

    def timed_run_job(self: Executor, job) -> None:  # type: ignore[no-untyped-def]
        handed_over[str(next(iter(job.output)))] = time.time()
        original(self, job)

    Executor.run_job = timed_run_job  # type: ignore[method-assign]
    try:
        snakemake_main(
            ["--snakefile", str(workdir / "Snakefile"), "--directory", str(workdir)]
            + ["--executor", "vastai", "--vastai-sandbox", "--jobs", "1", "--quiet"]
            + ["all"]
        )
    except SystemExit as exc:
        if exc.code not in (0, None):
            message = f"the benchmark workflow failed (exit {exc.code})"
            raise SystemExit(message) from exc
    finally:
        Executor.run_job = original  # type: ignore[method-assign]
    return handed_over


def count_warm_leases(pool_db: Path) -> int:
    with sqlite3.connect(pool_db) as connection:
        (count,) = connection.execute(
            "SELECT count(*) FROM leases WHERE warm = 1"
        ).fetchone()
    return int(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--jobs",
        type=int,
        default=11,
        help="number of jobs; the first one rents the instance",
    )
    args = parser.parse_args(argv)

    print(f"machine: {describe_machine()}")
    with tempfile.TemporaryDirectory(prefix="run-job-overhead-") as scratch:
        workdir = Path(scratch)
        handed_over = run_workflow(workdir, args.jobs)
        overheads = sorted(
            (handed_over[output], float((workdir / output).read_text()) - at)
            for output, at in handed_over.items()
        )
        warm = count_warm_leases(workdir / ".snakemake" / "vastai" / "pool.sqlite")

    # Jobs ran one at a time on one instance, so the first handed over is the
    # cold one and every later one found the instance warm.
    cold = overheads[0][1]
    warm_overheads = [overhead for _, overhead in overheads[1:]]
    print(f"jobs: {len(overheads)}, on a warm instance: {warm}")
    print()
    print("| measure | runs | median (s) |")
    print("| --- | ---: | ---: |")
    print(
        "| first job, run_job to shell start, rent and boot included | 1 "
        f"| {cold:.3f} |"
    )
    print(
        f"| warm job, run_job to shell start | {len(warm_overheads)} "
        f"| {statistics.median(warm_overheads):.3f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
