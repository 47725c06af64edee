"""Soak the pool: a long workflow through a sandbox that injects every fault.

Runs real ``snakemake --executor vastai --retries 3`` on a workflow of
``--jobs-count`` jobs against an embedded sandbox whose seeded fault script
(``soak_rules`` in tests/fault_helpers.py) hits about 10 % of the
operations each fault kind can hit. Then prints the jobs that succeeded
(correct outputs), the jobs retried (leases with attempt > 1 in the pool
database), the faults injected by kind and the instances rented and left
alive (the sandbox ledger), the dollars billed by the ledger against the
pool's own cost report (``vastai-pool report --json``), the wall time and
the machine.

Usage: python benchmarks/soak.py [--jobs-count 200] [--seed N] [--parallel 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine

# The workflow and fault script are shared with the test suite's short soak.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fault_helpers import (
    leases,
    partial_files,
    run_snakemake,
    soak_rules,
    write_workflow,
)
from vastai_pool.sandbox import Sandbox

# Seconds a stuck boot waits before the pool gives the instance up.
BOOT_TIMEOUT_SECONDS = 8
# Seconds each job's command sleeps, so that faults of running instances
# can hit a job while it runs.
JOB_SLEEP_SECONDS = 1.0


def pool_report(pool_db: Path) -> dict:
    """Return ``vastai-pool report --json`` of the run in ``pool_db``."""
    result = subprocess.run(
        [sys.executable, "-m", "vastai_pool.cli", "report", "--json"]
        + ["--db", str(pool_db)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"vastai-pool report failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def current_commit() -> str:
    """Return the short hash of the checked-out commit, or "unknown"."""
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=Path(__file__).resolve().parent,
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs-count", type=int, default=200, help="jobs to run")
    parser.add_argument("--seed", type=int, default=1, help="fault script seed")
    parser.add_argument(
        "--parallel", type=int, default=8, help="Snakemake --jobs (at once)"
    )
    parser.add_argument(
        "--rate", type=float, default=0.1, help="share of operations hit per kind"
    )
    args = parser.parse_args(argv)
    if args.jobs_count < 1:
        parser.error(f"--jobs-count must be >= 1, got {args.jobs_count}")

    print(f"machine: {describe_machine()}")
    print(f"commit: {current_commit()}")
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        root = Path(scratch)
        sandbox = Sandbox(
            boot_seconds=0.2,
            state_dir=root / "sandbox",
            faults={"seed": args.seed, "rules": soak_rules(args.rate)},
        )
        sandbox.start()
        try:
            workflow = write_workflow(
                root / "workflow",
                sandbox,
                jobs=args.jobs_count,
                sleep=JOB_SLEEP_SECONDS,
            )
            started = time.monotonic()
            run = run_snakemake(
                sandbox,
                workflow,
                root / "home",
                pool_db=root / "pool.sqlite",
                jobs=args.parallel,
                extra=[
                    "--retries",
                    "3",
                    "--vastai-boot-timeout",
                    str(BOOT_TIMEOUT_SECONDS),
                ],
                timeout=4 * 3600,
            )
            wall = time.monotonic() - started
        finally:
            sandbox.stop()

        problems = workflow.output_problems()
        succeeded = sum(
            not workflow.job_problems(index) for index in range(args.jobs_count)
        )
        rows = leases(run.pool_db)
        retried = {job for job, attempt, _, _ in rows if attempt > 1}
        report = pool_report(run.pool_db) if run.pool_db.exists() else {}
        partials = partial_files(workflow.workdir)
        if run.code != 0:
            print(run.summary())

    faults = run.ledger.get("faults", {})
    print(
        f"jobs: {args.jobs_count}, --jobs {args.parallel}, seed {args.seed}, "
        f"rate {args.rate:g}"
    )
    print()
    print("| measure | value |")
    print("| --- | ---: |")
    print(f"| Snakemake exit code | {run.code} |")
    print(f"| jobs succeeded (correct output) | {succeeded} |")
    print(f"| jobs retried (a lease with attempt > 1) | {len(retried)} |")
    print(f"| leases | {len(rows)} |")
    print(f"| faults injected | {sum(faults.values())} |")
    for kind in sorted(faults):
        print(f"| - {kind} | {faults[kind]} |")
    print(f"| instances rented | {run.ledger['rented']} |")
    print(f"| instances left alive | {len(run.ledger['alive'])} |")
    print(f"| partial files left | {len(partials)} |")
    print(f"| US dollars billed, sandbox ledger | {run.ledger['billed_usd']:.4f} |")
    pool_usd = report.get("total_usd")
    pool_text = f"{pool_usd:.4f}" if isinstance(pool_usd, float) else "n/a"
    print(f"| US dollars, `vastai-pool report` | {pool_text} |")
    print(f"| wall time (s) | {wall:.0f} |")
    return 0 if run.code == 0 and not problems and not run.ledger["alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
