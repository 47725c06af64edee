"""Helpers for the end-to-end fault tests: a workflow whose outputs the test
can predict, a Snakemake run against a sandbox with a fault script, and
checks on the run's log, outputs and pool database.

Each job of the workflow writes ``out/<i>.txt`` with the line ``job <i>``,
followed by the SHA-256 of its input when the workflow has one, and
optionally a large ``out/<i>.big`` of ``big_output_bytes`` zero bytes
followed by ``job <i>\\n``. A job can wait until the sandbox ledger shows a
fault of one kind, so that a fault timed by ``after_seconds`` lands while
the job runs instead of after it ended.
"""

from __future__ import annotations

import hashlib
import random
import re
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.pool_helpers import query, snakemake_command, start

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

BIG_INPUT = "data/big.bin"

# The job's script, run by Snakemake on the instance through ``script:``.
JOB_SCRIPT = textwrap.dedent(
    '''
    """One job of the fault-test workflow; see tests/fault_helpers.py."""
    import hashlib
    import json
    import time
    import urllib.request

    params = snakemake.params  # noqa: F821 (Snakemake defines it)
    index = snakemake.wildcards.i  # noqa: F821
    deadline = time.monotonic() + params.wait_seconds
    while params.wait_for and time.monotonic() < deadline:
        with urllib.request.urlopen(params.ledger_url, timeout=5) as reply:
            faults = json.load(reply).get("faults", {})
        if faults.get(params.wait_for, 0) >= params.wait_count:
            break
        time.sleep(0.2)
    time.sleep(params.sleep)
    line = f"job {index}"
    if params.hash_input:
        with open(snakemake.input.big, "rb") as data:  # noqa: F821
            line += " " + hashlib.sha256(data.read()).hexdigest()
    with open(snakemake.output.txt, "w") as out:  # noqa: F821
        out.write(line + "\\n")
    if params.big_bytes:
        with open(snakemake.output.big, "wb") as out:  # noqa: F821
            out.write(bytes(params.big_bytes) + f"job {index}\\n".encode())
    '''
)


@dataclass(frozen=True)
class Workflow:
    """What the fault-test workflow of one directory runs and must produce."""

    workdir: Path
    jobs: int
    big_input: bytes | None = None
    big_output_bytes: int = 0
    # Extra target files of local rules that must exist after the run.
    extra_targets: tuple[str, ...] = ()

    def expected_line(self, index: int) -> str:
        line = f"job {index}"
        if self.big_input is not None:
            line += " " + hashlib.sha256(self.big_input).hexdigest()
        return line + "\n"

    def job_problems(self, index: int) -> list[str]:
        """Return what is missing or wrong among job ``index``'s outputs."""
        problems = []
        path = self.workdir / "out" / f"{index}.txt"
        if not path.exists():
            problems.append(f"{path} is missing")
        elif path.read_text() != self.expected_line(index):
            problems.append(f"{path} contains {path.read_text()!r}")
        if self.big_output_bytes:
            big = self.workdir / "out" / f"{index}.big"
            expected = bytes(self.big_output_bytes) + f"job {index}\n".encode()
            if not big.exists():
                problems.append(f"{big} is missing")
            elif big.read_bytes() != expected:
                problems.append(
                    f"{big} has {big.stat().st_size} bytes, not the "
                    f"{len(expected)} expected, or other content"
                )
        return problems

    def output_problems(self) -> list[str]:
        """Return what is missing or wrong among all outputs; empty when all
        are correct."""
        problems = []
        for index in range(self.jobs):
            problems += self.job_problems(index)
        for name in self.extra_targets:
            if not (self.workdir / name).exists():
                problems.append(f"{self.workdir / name} is missing")
        return problems


def write_workflow(
    workdir: Path,
    sandbox: Sandbox,
    *,
    jobs: int,
    sleep: float = 0.0,
    wait_for: str | None = None,
    wait_seconds: float = 60.0,
    wait_count: int = 1,
    big_input_bytes: int = 0,
    big_output_bytes: int = 0,
    runtime_minutes: float | None = None,
    idle_gate: str | None = None,
) -> Workflow:
    """Write the Snakefile, the job script and any input into ``workdir``.

    ``wait_for`` makes each job wait, up to ``wait_seconds``, until the
    ledger counts ``wait_count`` faults of that kind. ``idle_gate`` splits
    the jobs in two. Job 0 runs first. Then a local rule waits until the
    ledger counts a fault of that kind and no instance alive, because job
    0's idle instance is the only one rented by then. Only then do the
    other jobs run.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "scripts").mkdir(exist_ok=True)
    (workdir / "scripts" / "job.py").write_text(JOB_SCRIPT)
    big_input = None
    if big_input_bytes:
        big_input = random.Random(big_input_bytes).randbytes(big_input_bytes)
        (workdir / BIG_INPUT).parent.mkdir(parents=True, exist_ok=True)
        (workdir / BIG_INPUT).write_bytes(big_input)
    outputs = 'txt="out/{i}.txt"'
    if big_output_bytes:
        outputs += ', big="out/{i}.big"'
    inputs = [f'big="{BIG_INPUT}"'] if big_input_bytes else []
    gate_rule = ""
    extra_targets: tuple[str, ...] = ()
    if idle_gate is not None:
        extra_targets = ("gate.txt",)
        inputs.insert(0, 'lambda wildcards: [] if wildcards.i == "0" else ["gate.txt"]')
        gate_rule = _gate_rule(sandbox, idle_gate)
    resources = "gpu=1, mem_mb=500, disk_mb=500"
    if runtime_minutes is not None:
        resources += f", runtime={runtime_minutes}"
    (workdir / "Snakefile").write_text(
        textwrap.dedent(
            f"""
            localrules: all{", gate" if gate_rule else ""}

            rule all:
                input: expand("out/{{i}}.txt", i=range({jobs}))

            rule work:
                input: {", ".join(inputs) if inputs else "[]"}
                output: {outputs}
                params:
                    ledger_url="{sandbox.url}/sandbox/ledger",
                    wait_for={wait_for!r},
                    wait_seconds={wait_seconds},
                    wait_count={wait_count},
                    sleep={sleep},
                    big_bytes={big_output_bytes},
                    hash_input={bool(big_input_bytes)},
                resources: {resources}
                script: "scripts/job.py"
            """
        )
        + gate_rule
    )
    return Workflow(
        workdir,
        jobs,
        big_input=big_input,
        big_output_bytes=big_output_bytes,
        extra_targets=extra_targets,
    )


def _gate_rule(sandbox: Sandbox, kind: str) -> str:
    return textwrap.dedent(
        f"""
        rule gate:
            input: "out/0.txt"
            output: "gate.txt"
            run:
                import json, time, urllib.request
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    url = "{sandbox.url}/sandbox/ledger"
                    with urllib.request.urlopen(url, timeout=5) as reply:
                        ledger = json.load(reply)
                    # The sandbox counts the fault before it destroys the instance.
                    if ledger["faults"].get("{kind}", 0) >= 1 and not ledger["alive"]:
                        break
                    time.sleep(0.2)
                with open(output[0], "w") as gate:
                    gate.write("open\\n")
        """
    )


@dataclass
class FaultRun:
    """One finished Snakemake run: its exit code, output and pool database."""

    workflow: Workflow
    pool_db: Path
    code: int
    log: str
    seconds: float
    ledger: dict = field(default_factory=dict)

    def lines_matching(self, pattern: str) -> list[str]:
        """Return the log lines that match the regex ``pattern``, ignoring
        case and the test's own directory names, which repeat test names."""
        scratch = str(self.workflow.workdir.parent)
        compiled = re.compile(pattern, re.IGNORECASE)
        return [
            line
            for line in self.log.replace(scratch, "<tmp>").splitlines()
            if compiled.search(line)
        ]

    def summary(self) -> str:
        """Return a failure message: exit code, ledger and the log's tail."""
        tail = "\n".join(self.log.splitlines()[-80:])
        return (
            f"exit code {self.code}, {self.seconds:.0f} s, ledger {self.ledger}\n"
            f"--- last lines of the Snakemake output ---\n{tail}"
        )


def run_snakemake(
    sandbox: Sandbox,
    workflow: Workflow,
    home: Path,
    *,
    pool_db: Path,
    jobs: int = 2,
    extra: list[str] | None = None,
    timeout: float = 240,
) -> FaultRun:
    """Run real Snakemake on ``workflow`` against ``sandbox``; never raises on
    a failed run, so the test can assert on what happened."""
    command = snakemake_command(sandbox, pool_db, jobs=jobs, extra=extra)
    started = time.monotonic()
    process = start(command, workflow.workdir, home)
    try:
        code = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    seconds = time.monotonic() - started
    return FaultRun(
        workflow,
        pool_db,
        code,
        (home / "snakemake.log").read_text(),
        seconds,
        sandbox.ledger(),
    )


def partial_files(root: Path) -> list[Path]:
    """Return the temporary transfer files (``*.part``) left under ``root``."""
    if not root.exists():
        return []
    return sorted(path for path in root.rglob("*") if path.name.endswith(".part"))


def leases(pool_db: Path) -> list[tuple]:
    """Return (job_id, attempt, instance vast_id, outcome) of every lease."""
    return query(
        pool_db,
        "SELECT leases.job_id, leases.attempt, instances.vast_id, leases.outcome "
        "FROM leases JOIN instances ON instances.pk = leases.instance_pk "
        "ORDER BY leases.id",
    )


def soak_rules(rate: float = 0.1) -> list[dict]:
    """Return a fault script's rules with every fault kind at ``rate``.

    The four HTTP kinds share ``rate`` between them, so that about that
    share of API requests fails rather than four times it. The faults of
    running instances fire at different ages, in seconds since running.
    """
    http_rate = rate / 4
    return [
        {"kind": "offer_taken", "rate": rate},
        {"kind": "create_fails", "rate": rate},
        {"kind": "boot_stuck", "rate": rate},
        {"kind": "boot_fatal", "rate": rate, "message": "manifest unknown"},
        {"kind": "http_429", "rate": http_rate},
        {"kind": "http_502", "rate": http_rate, "burst": 2},
        {"kind": "http_503", "rate": http_rate},
        {"kind": "http_504", "rate": http_rate},
        {"kind": "host_offline", "rate": rate, "after_seconds": 6},
        {"kind": "ssh_drop", "rate": rate, "after_seconds": 4},
        {"kind": "ssh_drop", "rate": rate, "during": "sftp"},
        {"kind": "destroyed_outside", "rate": rate, "after_seconds": 8},
        {"kind": "destroy_504_once", "rate": rate},
    ]


def rentals_after_boot_failure(pool_db: Path) -> list[str]:
    """Return the rentals on a machine that began after a boot on that
    machine had failed, read from the pool database's events.

    A rental that began while another job's boot on the same machine was
    still under way is not listed, because the pool could not know yet.
    """
    failed_at = dict(
        query(
            pool_db,
            "SELECT instances.machine_id, MIN(events.at) FROM events "
            "JOIN instances ON instances.pk = events.instance_pk "
            "WHERE events.reason = 'boot_failed' "
            "AND instances.machine_id IS NOT NULL "
            "GROUP BY instances.machine_id",
        )
    )
    rentals = query(
        pool_db,
        "SELECT instances.machine_id, events.at, instances.offer_id, "
        "instances.label FROM events "
        "JOIN instances ON instances.pk = events.instance_pk "
        "WHERE events.kind = 'renting' ORDER BY events.at",
    )
    return [
        f"{label} from offer {offer} on machine {machine}, "
        f"{at - failed_at[machine]:.3f} s after a boot on it failed"
        for machine, at, offer, label in rentals
        if machine in failed_at and at > failed_at[machine]
    ]
