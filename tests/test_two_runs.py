"""Two Snakemake processes sharing one pool file, against one sandbox."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from tests.pool_helpers import (
    environment,
    finish,
    query,
    run,
    snakemake_command,
    start,
    write_workflow,
)

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

LINGER_SECONDS = 20


def overlapping_leases(pool_db: Path) -> list[tuple]:
    """Pairs of leases of one instance whose [started_at, ended_at] overlap."""
    by_instance: dict[int, list[tuple[int, float, float]]] = defaultdict(list)
    for lease_id, pk, started, ended in query(
        pool_db, "SELECT id, instance_pk, started_at, ended_at FROM leases"
    ):
        assert ended is not None, f"lease {lease_id} never ended"
        by_instance[pk].append((lease_id, started, ended))
    overlaps = []
    for leases in by_instance.values():
        leases.sort(key=lambda lease: lease[1])
        for before, after in zip(leases, leases[1:], strict=False):
            if after[1] < before[2]:
                overlaps.append((before, after))
    return overlaps


def test_concurrent_runs_share_pool_without_double_leases(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    pool_db = tmp_path / "pool.sqlite"
    linger = ["--vastai-linger", str(LINGER_SECONDS)]
    command = snakemake_command(sandbox, pool_db, jobs=2, extra=linger)
    for name in ("one", "two", "three"):
        write_workflow(tmp_path / name, jobs=4, command="sleep 0.5")

    processes = [
        (start(command, tmp_path / name, tmp_path / f"home-{name}"), name)
        for name in ("one", "two")
    ]
    for process, name in processes:
        finish(process, tmp_path / f"home-{name}")
    for name in ("one", "two"):
        assert len(list((tmp_path / name / "out").iterdir())) == 4

    runs = query(pool_db, "SELECT id, ended_at FROM runs")
    assert len(runs) == 2
    assert all(ended is not None for _, ended in runs)
    assert query(pool_db, "SELECT COUNT(*) FROM leases") == [(8,)]
    assert overlapping_leases(pool_db) == []

    # A third run inside the linger window adopts what the two left warm.
    rented = sandbox.ledger()["rented"]
    run(command, tmp_path / "three", tmp_path / "home-three")
    assert sandbox.ledger()["rented"] == rented
    assert overlapping_leases(pool_db) == []

    cleaned = subprocess.run(
        [sys.executable, "-m", "vastai_pool.cli", "gc", "--db", str(pool_db)]
        + ["--api-url", sandbox.url, "--api-key", sandbox.api_key],
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cleaned.returncode == 0, cleaned.stderr
    assert sandbox.ledger()["alive"] == []
