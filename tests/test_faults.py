"""Real Snakemake runs through a sandbox that replays a fault script, one
test per fault kind.

Every test checks that the workflow ends with exit code 0 and correct
outputs, that the sandbox ledger shows nothing alive and that the fault was
really injected. It also checks that the Snakemake output explains the
fault in at least one line and at most one line per injection, not one per
poll. ``PHRASES`` lists the phrases matched.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snakemake_executor_plugin_vastai.resources import requirements_from_resources
from snakemake_executor_plugin_vastai.settings import ExecutorSettings
from tests.fault_helpers import (
    FaultRun,
    Workflow,
    leases,
    partial_files,
    query,
    rentals_after_boot_failure,
    run_snakemake,
    write_workflow,
)
from vastai_pool.api import VastApi
from vastai_pool.sandbox import Sandbox
from vastai_pool.sandbox.fault_script import FATAL_MESSAGES
from vastai_pool.sandbox.sftp import InstanceSftpHandle

# The log phrase (a regex, matched ignoring case) that explains each fault
# kind to a user. The pool's messages and these tests must agree on them.
# The pool's line for a destroy that returned 504 names the destroy, and
# its other 504 lines do not.
PHRASES = {
    "offer_taken": r"offer \d+ was taken",
    "create_fails": r"did not accept the contract",
    "boot_stuck": r"boot timeout",
    "http_429": r"HTTP 429",
    "http_502": r"HTTP 502",
    "http_503": r"HTTP 503",
    "http_504": r"^(?!.*destroy).*HTTP 504",
    "host_offline": r"offline",
    "ssh_drop": r"reconnect",
    "destroyed_outside": r"destroyed outside",
    "destroy_504_once": r"destroy.*HTTP 504",
}
# Seconds after an instance starts running at which a fault of a running
# instance fires, an estimate of when the pool has prepared it and started
# the job. The job waits for the fault, so a slower start only moves the
# fault before the job.
RUNNING_FAULT_AFTER = 5
# Seconds the pool waits for a stuck boot. A normal sandbox boot takes one
# API poll of 2 s.
BOOT_TIMEOUT = 6
# Snakemake's line for each failed job attempt.
FAILED_JOB = "Error in rule work"
BOOT_SECONDS = 0.2


def start_sandbox(
    state_dir: Path, rules: list[dict[str, Any]], seed: int = 11
) -> Sandbox:
    return Sandbox(
        boot_seconds=BOOT_SECONDS,
        state_dir=state_dir,
        faults={"seed": seed, "rules": rules},
    ).start()


@pytest.fixture
def make_sandbox(tmp_path: Path) -> Iterator[Any]:
    """Start sandboxes with a fault script; each is stopped afterwards."""
    started: list[Sandbox] = []

    def make(rules: list[dict[str, Any]], seed: int = 11) -> Sandbox:
        started.append(start_sandbox(tmp_path / f"sandbox-{len(started)}", rules, seed))
        return started[-1]

    yield make
    for sandbox in started:
        sandbox.stop()


def fault_run(
    sandbox: Sandbox,
    tmp_path: Path,
    name: str = "wf",
    *,
    jobs: int = 2,
    parallel: int | None = None,
    extra: list[str] | None = None,
    pool_db: Path | None = None,
    **workflow: Any,
) -> FaultRun:
    workflow_spec = write_workflow(tmp_path / name, sandbox, jobs=jobs, **workflow)
    return run_snakemake(
        sandbox,
        workflow_spec,
        tmp_path / f"home-{name}",
        pool_db=pool_db or tmp_path / "pool.sqlite",
        jobs=parallel or jobs,
        extra=extra,
    )


def assert_completed(run: FaultRun) -> None:
    """The run exited 0, its outputs are correct and nothing is left alive."""
    assert run.code == 0, run.summary()
    assert run.workflow.output_problems() == [], run.summary()
    assert run.ledger["alive"] == [], run.summary()
    assert partial_files(run.workflow.workdir) == [], run.summary()


def assert_explained(run: FaultRun, kind: str, phrase: str | None = None) -> None:
    """The fault was injected and the log names it once per injection at most."""
    injected = run.ledger["faults"].get(kind, 0)
    assert injected >= 1, f"no {kind} fault was injected; {run.summary()}"
    assert_lines_at_most(run, phrase or PHRASES[kind], injected)


def assert_lines_at_most(run: FaultRun, pattern: str, injected: int) -> None:
    """At least one and at most ``injected`` log lines match ``pattern``."""
    lines = run.lines_matching(pattern)
    listed = "\n".join(lines[:20])
    assert lines, f"no log line matches {pattern!r}; {run.summary()}"
    assert len(lines) <= injected, (
        f"{len(lines)} log lines match {pattern!r} for {injected} faults:\n{listed}"
    )


def attempts_by_job(run: FaultRun) -> dict[int, list[tuple]]:
    by_job: dict[int, list[tuple]] = {}
    for job_id, attempt, vast_id, outcome in leases(run.pool_db):
        by_job.setdefault(job_id, []).append((attempt, vast_id, outcome))
    return by_job


def cheapest_machines(sandbox: Sandbox, count: int) -> list[int]:
    """Return the machines of the ``count`` cheapest offers that the
    workflow's jobs match, in the order the pool tries them."""
    requirements = requirements_from_resources(
        {"gpu": 1, "mem_mb": 500, "disk_mb": 500}, 1, "work", ExecutorSettings()
    )
    offers = VastApi(sandbox.url, sandbox.api_key).search_offers(
        requirements.offer_query(),
        order=requirements.order,
        disk_gb=requirements.disk_gb,
    )
    machines: list[int] = []
    for offer in sorted(offers, key=lambda offer: offer.hardware.dph_total):
        if offer.machine_id is not None and offer.machine_id not in machines:
            machines.append(offer.machine_id)
    assert len(machines) > count, f"the catalog has only {len(machines)} machines"
    return machines[:count]


# Renting and the API -----------------------------------------------------
#
# The faults that the pool survives without failing a job share one run:
# its workflow runs 2 jobs one after the other, so that no offer is taken
# by the run's own other job and every "was taken" line is injected. Each
# test below checks one fault kind of that run.

# Offers in a row that could not be rented before the pool searches the
# market again (``MISSES_PER_SEARCH`` in vastai_pool/rental.py): one more
# taken offer than that makes it search again.
TAKEN_OFFERS = 4
SHOW_ROUTE = r"^/api/v0/instances/\d+$"
API_RULES: list[dict[str, Any]] = [
    {"kind": "offer_taken", "count": TAKEN_OFFERS},
    {"kind": "create_fails", "count": 1},
    {"kind": "http_503", "count": 1, "method": "PUT", "route": r"^/api/v0/asks/\d+$"},
    {
        "kind": "http_429",
        "count": 1,
        "burst": 2,
        "route": r"^/api/v0/(bundles|search/asks)$",
    },
    {
        "kind": "http_502",
        "count": 1,
        "burst": 2,
        "method": "GET",
        "route": r"^/api/v1/instances$",
    },
    {"kind": "http_504", "count": 1, "burst": 2, "method": "GET", "route": SHOW_ROUTE},
    {"kind": "boot_stuck", "count": 1},
    {"kind": "destroy_504_once"},
]


@pytest.fixture(scope="module")
def api_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultRun]:
    root = tmp_path_factory.mktemp("api-faults")
    sandbox = start_sandbox(root / "sandbox", API_RULES)
    try:
        yield fault_run(
            sandbox,
            root,
            parallel=1,
            extra=["--vastai-boot-timeout", str(BOOT_TIMEOUT)],
        )
    finally:
        sandbox.stop()


@pytest.fixture
def completed_api_run(api_run: FaultRun) -> FaultRun:
    assert_completed(api_run)
    assert FAILED_JOB not in api_run.log, api_run.summary()
    return api_run


def test_taken_offers_rent_next_offer(completed_api_run: FaultRun) -> None:
    run = completed_api_run
    assert run.ledger["faults"]["offer_taken"] == TAKEN_OFFERS, run.summary()
    assert_explained(run, "offer_taken")
    assert run.lines_matching(r"searching the market again"), run.summary()


def test_failed_create_rents_next_offer(completed_api_run: FaultRun) -> None:
    assert_explained(completed_api_run, "create_fails")


def test_stuck_boot_rents_another_machine(completed_api_run: FaultRun) -> None:
    run = completed_api_run
    assert_explained(run, "boot_stuck")
    # The job waited for another instance; it was never failed.
    assert all(len(rows) == 1 for rows in attempts_by_job(run).values())
    stuck = query(
        run.pool_db,
        "SELECT DISTINCT instances.machine_id FROM instances "
        "JOIN events ON events.instance_pk = instances.pk "
        "WHERE events.detail LIKE '%boot timeout%'",
    )
    leased = query(
        run.pool_db,
        "SELECT DISTINCT instances.machine_id FROM instances "
        "JOIN leases ON leases.instance_pk = instances.pk",
    )
    assert len(stuck) == 1, run.summary()
    assert stuck[0] not in leased, f"a job ran on the stuck machine {stuck[0]}"


@pytest.mark.parametrize("kind", ["http_429", "http_502", "http_503", "http_504"])
def test_api_error_burst_is_survived(completed_api_run: FaultRun, kind: str) -> None:
    # 429 on the search, 502 on the instance list, 503 on a create and
    # 504 on reading one instance's state.
    assert_explained(completed_api_run, kind)


def test_destroy_504_is_retried_until_confirmed(completed_api_run: FaultRun) -> None:
    run = completed_api_run
    # The first destroy of every created instance returned 504.
    assert run.ledger["faults"]["destroy_504_once"] == run.ledger["rented"]
    assert_explained(run, "destroy_504_once")
    states = query(run.pool_db, "SELECT DISTINCT state FROM instances")
    assert states == [("destroyed",)]


# Booting ----------------------------------------------------------------------


def test_fatal_boot_avoids_machine_now_and_later(
    make_sandbox: Any, tmp_path: Path
) -> None:
    probe = make_sandbox([])
    bad = dict(zip(cheapest_machines(probe, 4), FATAL_MESSAGES, strict=True))
    rules = [
        {"kind": "boot_fatal", "machine": machine, "message": message}
        for machine, message in bad.items()
    ]
    sandbox = make_sandbox(rules)
    pool_db = tmp_path / "pool.sqlite"
    boot_timeout = 600
    extra = ["--vastai-boot-timeout", str(boot_timeout)]

    first = fault_run(sandbox, tmp_path, "first", extra=extra, pool_db=pool_db)
    assert_completed(first)
    # A behaviour bound, not a benchmark: no boot waited for its timeout.
    assert first.seconds < boot_timeout / 2, first.summary()
    assert FAILED_JOB not in first.log
    # Two jobs rent at once, so a machine may be rented twice while its
    # first boot is still under way, but never after that boot failed.
    late = rentals_after_boot_failure(pool_db)
    assert late == [], "\n".join(late) + "\n" + first.summary()
    # The rows of taken offers have no instance id: nothing booted there.
    rented = Counter(
        machine
        for (machine,) in query(
            pool_db, "SELECT machine_id FROM instances WHERE vast_id IS NOT NULL"
        )
    )
    for machine, message in bad.items():
        if rented[machine]:
            assert_lines_at_most(first, re.escape(message), rented[machine])
    injected = first.ledger["faults"]["boot_fatal"]
    assert injected == sum(rented[machine] for machine in bad), first.summary()

    second = fault_run(sandbox, tmp_path, "second", extra=extra, pool_db=pool_db)
    assert_completed(second)
    assert second.ledger["faults"]["boot_fatal"] == injected, second.summary()


# Hosts ----------------------------------------------------------------------


def test_offline_host_job_retried_elsewhere(make_sandbox: Any, tmp_path: Path) -> None:
    rule = {
        "kind": "host_offline",
        "count": 1,
        "after_seconds": RUNNING_FAULT_AFTER,
        "gone_after_seconds": 3,
    }
    sandbox = make_sandbox([rule])
    run = fault_run(sandbox, tmp_path, extra=["--retries", "1"], wait_for=rule["kind"])
    assert_completed(run)
    assert_explained(run, "host_offline")
    assert run.log.count(FAILED_JOB) == 1, run.summary()
    retried = {job: rows for job, rows in attempts_by_job(run).items() if len(rows) > 1}
    assert len(retried) == 1, leases(run.pool_db)
    ((first, second),) = retried.values()
    assert first[1] != second[1], "the retry ran on the dead host's instance"
    assert second[2] == "succeeded"


def test_destroyed_busy_instance_job_retried(make_sandbox: Any, tmp_path: Path) -> None:
    rule = {
        "kind": "destroyed_outside",
        "count": 1,
        "after_seconds": RUNNING_FAULT_AFTER,
    }
    sandbox = make_sandbox([rule])
    run = fault_run(sandbox, tmp_path, extra=["--retries", "1"], wait_for=rule["kind"])
    assert_completed(run)
    assert_explained(run, "destroyed_outside")
    assert run.log.count(FAILED_JOB) == 1, run.summary()
    retried = [rows for rows in attempts_by_job(run).values() if len(rows) > 1]
    assert len(retried) == 1, leases(run.pool_db)
    assert retried[0][0][1] != retried[0][1][1]


def test_destroyed_idle_instance_not_leased(make_sandbox: Any, tmp_path: Path) -> None:
    # Job 0 runs alone and its instance is then idle. A local rule waits
    # until the sandbox has destroyed that instance, and job 1 runs after
    # that. The margin over RUNNING_FAULT_AFTER lets job 0 finish first.
    rule = {"kind": "destroyed_outside", "count": 1, "after_seconds": 8}
    sandbox = make_sandbox([rule])
    run = fault_run(sandbox, tmp_path, idle_gate=rule["kind"])
    assert_completed(run)
    assert_explained(run, "destroyed_outside")
    assert FAILED_JOB not in run.log
    rows = leases(run.pool_db)
    # No Snakemake retry: every lease is a first attempt.
    assert all(attempt == 1 for _, attempt, _, _ in rows), rows
    first_job, _, destroyed, outcome = rows[0]
    assert outcome == "succeeded", rows
    later = [row for row in rows if row[0] != first_job]
    succeeded = [vast_id for _, _, vast_id, outcome in later if outcome == "succeeded"]
    assert len(succeeded) == 1, rows
    assert succeeded[0] != destroyed, f"job 1 ran on destroyed instance {destroyed}"
    jobs_dir = sandbox.instance_dir(destroyed) / "vastai-pool" / "jobs"
    started = (
        sorted(path.name for path in jobs_dir.iterdir()) if jobs_dir.exists() else []
    )
    assert len(started) == 1, (
        f"jobs started on destroyed instance {destroyed}: {started}"
    )


# SSH ------------------------------------------------------------------------


def remote_partials(sandbox: Sandbox, run: FaultRun) -> list[Path]:
    found: list[Path] = []
    for (vast_id,) in query(run.pool_db, "SELECT vast_id FROM instances"):
        if vast_id is not None:
            found += partial_files(sandbox.instance_dir(vast_id))
    return found


def test_ssh_drops_reconnect_and_redo_transfers(
    make_sandbox: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three drops in one run. The first comes at an instance's first SFTP
    # transfer, the upload of the workflow's sources before the 4 MB
    # input. The second comes in the middle of a job, and each job waits
    # until the ledger counts both. The third comes in the middle of a
    # 4 MB output's download. A fault script can only drop SSH at an
    # instance's first transfer, so this test injects the third itself,
    # at the first read of a ``.big`` file past its start.
    rules = [
        {"kind": "ssh_drop", "count": 1, "during": "sftp"},
        {"kind": "ssh_drop", "count": 1, "after_seconds": RUNNING_FAULT_AFTER},
    ]
    sandbox = make_sandbox(rules)
    drops: list[str] = []
    lock = threading.Lock()
    read = InstanceSftpHandle.read

    def read_then_drop(handle: InstanceSftpHandle, offset: int, length: int) -> Any:
        name = str(getattr(handle, "filename", ""))
        with lock:
            hit = name.endswith(".big") and offset > 0 and not drops
            if hit:
                drops.append(name)
        if hit:
            instance_id = int(Path(name).parts[Path(name).parts.index("instances") + 1])
            instance = sandbox.market.get(instance_id)
            assert instance is not None
            instance.ssh.drop_connections()
        return read(handle, offset, length)

    monkeypatch.setattr(InstanceSftpHandle, "read", read_then_drop)
    run = fault_run(
        sandbox,
        tmp_path,
        wait_for="ssh_drop",
        wait_count=len(rules),
        big_input_bytes=4_000_000,
        big_output_bytes=4_000_000,
    )
    assert_completed(run)
    assert run.ledger["faults"].get("ssh_drop") == len(rules), run.summary()
    assert drops, "no download of a .big output was interrupted"
    assert FAILED_JOB not in run.log
    assert all(len(rows) == 1 for rows in attempts_by_job(run).values())
    assert_lines_at_most(run, PHRASES["ssh_drop"], len(rules) + len(drops))
    assert remote_partials(sandbox, run) == []


def test_workflow_spec_predicts_outputs(tmp_path: Path) -> None:
    # The checks above trust Workflow.output_problems; it must see a
    # missing and a wrong output.
    workflow = Workflow(tmp_path, jobs=2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "0.txt").write_text("job 0\n")
    (tmp_path / "out" / "1.txt").write_text("job 7\n")
    assert workflow.output_problems() == [f"{tmp_path}/out/1.txt contains 'job 7\\n'"]
