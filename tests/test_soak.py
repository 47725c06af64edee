"""A short soak: 40 jobs of real Snakemake through a sandbox that injects
every fault kind at about 10 % of the operations it can hit."""

from __future__ import annotations

from pathlib import Path

from tests.fault_helpers import (
    leases,
    partial_files,
    run_snakemake,
    soak_rules,
    write_workflow,
)
from vastai_pool.sandbox import Sandbox

JOBS = 40
PARALLEL = 8
SEED = 4


def test_soak_with_mixed_faults_completes(tmp_path: Path) -> None:
    sandbox = Sandbox(
        boot_seconds=0.2,
        state_dir=tmp_path / "sandbox",
        faults={"seed": SEED, "rules": soak_rules(0.1)},
    )
    sandbox.start()
    try:
        workflow = write_workflow(tmp_path / "wf", sandbox, jobs=JOBS, sleep=0.2)
        run = run_snakemake(
            sandbox,
            workflow,
            tmp_path / "home",
            pool_db=tmp_path / "pool.sqlite",
            jobs=PARALLEL,
            extra=["--retries", "3", "--vastai-boot-timeout", "8"],
            timeout=600,
        )
    finally:
        sandbox.stop()

    rows = leases(run.pool_db)
    retried = {job for job, attempt, _, _ in rows if attempt > 1}
    report = (
        f"faults injected {run.ledger.get('faults')}, rented "
        f"{run.ledger['rented']}, leases {len(rows)}, jobs retried "
        f"{len(retried)}, {run.seconds:.0f} s; {run.summary()}"
    )
    assert run.code == 0, report
    assert run.workflow.output_problems() == [], report
    assert run.ledger["alive"] == [], report
    assert partial_files(workflow.workdir) == [], report
    assert sum(run.ledger["faults"].values()) >= 1, report
