"""Print what the latest run in a pool database rented and ran.

Reads the SQLite file directly, independently of the pool's code, so the
demo and the benchmarks report numbers that the pool did not compute itself.

Usage: python benchmarks/pool_summary.py WORKFLOW_DIR_OR_POOL_DB [--json]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Instance states in which an instance may still bill.
ALIVE_STATES = ("renting", "booting", "idle", "busy", "destroying", "kept")


@dataclass(frozen=True)
class PoolSummary:
    run_id: str
    instances_rented: int
    jobs: int
    warm_jobs: int
    instances_alive: int


def find_pool_db(path: Path) -> Path:
    """Return ``path`` if it is a file, else the sandbox pool database below it.

    A run with ``--vastai-sandbox`` keeps its database in
    ``.snakemake/vastai/`` of the workflow directory.
    """
    if path.is_file():
        return path
    candidates = sorted((path / ".snakemake" / "vastai").glob("*.sqlite"))
    if not candidates:
        raise SystemExit(
            f"No pool database found: {path} is not a file and "
            f"{path / '.snakemake' / 'vastai'} contains no *.sqlite file. "
            "Pass the path given to --vastai-pool-db."
        )
    return candidates[0]


def summarize_latest_run(db_path: Path) -> PoolSummary:
    """Count the instances and leases of the run that started last."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as database:
        row = database.execute(
            "SELECT id FROM runs ORDER BY started_at DESC LIMIT 1"
        ).fetchone()
        if row is None:
            raise SystemExit(f"The pool database {db_path} records no run yet.")
        (run_id,) = row
        # Rented by this run: created (renting -> booting) while the run was
        # the owner. An offer taken before the create leaves a renting row
        # that never boots, and an adopted instance was rented by another run.
        (rented,) = database.execute(
            "SELECT COUNT(DISTINCT instance_pk) FROM events WHERE run_id = ? "
            "AND kind = 'booting' AND from_state = 'renting'",
            (run_id,),
        ).fetchone()
        (jobs, warm_jobs) = database.execute(
            "SELECT COUNT(*), COALESCE(SUM(warm), 0) FROM leases WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        placeholders = ",".join("?" * len(ALIVE_STATES))
        (alive,) = database.execute(
            f"SELECT COUNT(*) FROM instances WHERE state IN ({placeholders}) "
            "AND run_id = ?",
            (*ALIVE_STATES, run_id),
        ).fetchone()
    return PoolSummary(run_id, rented, jobs, warm_jobs, alive)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "path", type=Path, help="workflow directory of a sandbox run, or a pool db"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)

    summary = summarize_latest_run(find_pool_db(args.path))
    if args.json:
        print(json.dumps(asdict(summary), indent=2, sort_keys=True))
        return 0
    print(f"Pool summary of run {summary.run_id}:")
    print(f"  instances rented:          {summary.instances_rented}")
    print(f"  jobs run:                  {summary.jobs}")
    print(f"  jobs on a warm instance:   {summary.warm_jobs}")
    print(f"  instances still alive:     {summary.instances_alive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
