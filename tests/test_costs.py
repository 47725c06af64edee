"""Cost accounting of runs and the ``vastai-pool report`` command.

The expected dollars are worked out by hand from Vast.ai's billing: storage
($/h of the allocated disk) from creation to destroy, the rental price only
from the moment the instance runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vastai_pool import costs
from vastai_pool import store as db
from vastai_pool.models import DestroyReason, InstanceState, LeaseOutcome
from vastai_pool.requirements import Hardware, Requirements
from vastai_pool.store import Store

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

ACCOUNT = "http://127.0.0.1:1#0123456789abcdef"
IMAGE = "pytorch/pytorch:latest"
# One instance's prices, $/h: rental 0.50, storage 0.02, so dph_total 0.52.
RENTAL = 0.50
STORAGE = 0.02
HARDWARE = Hardware(
    num_gpus=1,
    gpu_name="RTX_4090",
    cpu_cores_effective=8.0,
    cpu_ram_mb=32000.0,
    disk_gb=20.0,
    dph_total=RENTAL + STORAGE,
    reliability=0.99,
    datacenter=True,
    country="US",
)
REQUIREMENTS = Requirements(image=IMAGE, disk_gb=10.0)


class Clock:
    """A settable clock for ``Store.clock``."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    opened = Store(tmp_path / "pool.sqlite")
    opened.clock = clock
    yield opened
    opened.close()


def start_run(store: Store) -> str:
    return db.start_run(
        store, account=ACCOUNT, workdir="/work", budget_usd=None, linger_seconds=0.0
    )


def rent(
    store: Store,
    clock: Clock,
    run_id: str,
    *,
    label: str,
    running_after: float,
    ready_after: float,
    priced: bool = True,
) -> int:
    """Record a rental now, running and ready after the given seconds."""
    pk = db.record_rental(
        store,
        run_id=run_id,
        account=ACCOUNT,
        label=label,
        offer_id=1,
        machine_id=1,
        image=IMAGE,
        extra_query="",
        hardware=HARDWARE,
        keep=False,
    )
    prices = {"dph_base": RENTAL, "storage_dph": STORAGE} if priced else {}
    db.transition(
        store, pk, InstanceState.BOOTING, why="created", vast_id=100 + pk, **prices
    )
    rented_at = clock.now
    clock.now = rented_at + running_after
    running = {"running_at": clock.now} if priced else {}
    db.transition(store, pk, InstanceState.BOOTING, why="running", **running)
    clock.now = rented_at + ready_after
    db.transition(store, pk, InstanceState.IDLE, why="prepared")
    return pk


def run_job(
    store: Store, clock: Clock, run_id: str, pk: int | None, rule: str, seconds: float
) -> int:
    """Lease an instance (``pk``, or any idle one warm) for ``seconds``."""
    if pk is None:
        leased = db.lease_idle(
            store,
            run_id=run_id,
            account=ACCOUNT,
            requirements=REQUIREMENTS,
            rule=rule,
            job_id=0,
            attempt=1,
            input_sizes={},
        )
        assert leased is not None
        record, lease_id = leased
        pk = record.pk
    else:
        lease_id = db.lease_new(
            store, pk, run_id=run_id, rule=rule, job_id=0, attempt=1
        )
    clock.now += seconds
    db.end_lease(
        store, lease_id, LeaseOutcome.SUCCEEDED, 0, instance_state=InstanceState.IDLE
    )
    return pk


def destroy(store: Store, pk: int) -> None:
    db.transition(
        store, pk, InstanceState.DESTROYING, why="end", reason=DestroyReason.RUN_ENDED
    )
    db.transition(store, pk, InstanceState.DESTROYED, why="end")


def test_run_costs_split_rules_and_idle(store: Store, clock: Clock) -> None:
    run_id = start_run(store)
    # Rented at t=1000, running at 1060, ready at 1120.
    pk = rent(store, clock, run_id, label="a", running_after=60, ready_after=120)
    run_job(store, clock, run_id, pk, "train", 1800)  # 1120 to 2920
    clock.now += 180
    run_job(store, clock, run_id, None, "plot", 360)  # warm, 3100 to 3460
    clock.now += 180
    destroy(store, pk)  # at 3640
    db.end_run(store, run_id)

    result = costs.run_costs(store, run_id)

    # Storage for 2640 s, the rental from 1060 on (2580 s).
    total = 0.02 * 2640 / 3600 + 0.50 * 2580 / 3600
    train = 0.52 * 1800 / 3600
    plot = 0.52 * 360 / 3600
    assert result.total_usd == pytest.approx(total)
    assert result.usd_per_rule == {
        "plot": pytest.approx(plot),
        "train": pytest.approx(train),
    }
    assert result.idle_usd == pytest.approx(total - train - plot)
    assert result.busy_hours == pytest.approx(2160 / 3600)
    assert result.idle_hours == pytest.approx(480 / 3600)
    assert result.instances_rented == 1
    assert result.jobs == 2
    assert result.warm_jobs == 1
    assert result.boots_avoided == 1
    assert result.mean_boot_seconds == pytest.approx(120)
    assert result.boot_seconds_saved == pytest.approx(120)
    assert [rule.jobs for rule in result.rules] == [1, 1]


def test_instance_spend_matches_run_total(store: Store, clock: Clock) -> None:
    run_id = start_run(store)
    pk = rent(store, clock, run_id, label="a", running_after=30, ready_after=45)
    clock.now += 600
    destroy(store, pk)

    record = db.get_instance(store, pk)
    # Records that carry the price parts bill storage from the rental and the
    # rental price from running; records without them bill dph_total.
    priced = 0.02 * 645 / 3600 + 0.50 * 615 / 3600
    unpriced = 0.52 * 645 / 3600
    spend = costs.instance_spend(record, clock.now + 1000)
    expected = priced if getattr(record, "dph_base", None) is not None else unpriced
    assert spend == pytest.approx(expected)
    assert costs.run_costs(store, run_id).total_usd == pytest.approx(priced)


def test_unpriced_row_bills_dph_total(store: Store, clock: Clock) -> None:
    run_id = start_run(store)
    pk = rent(
        store, clock, run_id, label="a", running_after=30, ready_after=45, priced=False
    )
    clock.now += 600
    destroy(store, pk)

    assert costs.run_costs(store, run_id).total_usd == pytest.approx(0.52 * 645 / 3600)
    record = db.get_instance(store, pk)
    assert costs.instance_spend(record, clock.now) == pytest.approx(0.52 * 645 / 3600)


def test_alive_instance_bills_until_now(store: Store, clock: Clock) -> None:
    run_id = start_run(store)
    pk = rent(store, clock, run_id, label="a", running_after=10, ready_after=20)
    db.lease_new(store, pk, run_id=run_id, rule="train", job_id=1, attempt=1)
    clock.now += 100  # the job runs from 1020 and is still running at 1120

    result = costs.run_costs(store, run_id)
    later = costs.run_costs(store, run_id, now=clock.now + 3600)

    assert result.total_usd == pytest.approx(0.02 * 120 / 3600 + 0.50 * 110 / 3600)
    assert result.usd_per_rule["train"] == pytest.approx(0.52 * 100 / 3600)
    assert later.total_usd == pytest.approx(result.total_usd + 0.52)


def test_adopted_instance_splits_between_runs(store: Store, clock: Clock) -> None:
    first = start_run(store)
    pk = rent(store, clock, first, label="a", running_after=10, ready_after=20)
    run_job(store, clock, first, pk, "train", 100)  # 1020 to 1120
    db.end_run(store, first)
    clock.now += 300  # lingers idle, owned by the first run, until 1420
    second = start_run(store)
    run_job(store, clock, second, None, "train", 200)  # adopted, 1420 to 1620
    clock.now += 30
    destroy(store, pk)  # at 1650

    first_costs = costs.run_costs(store, first)
    second_costs = costs.run_costs(store, second)

    first_total = 0.02 * 420 / 3600 + 0.50 * 410 / 3600
    second_total = 0.52 * 230 / 3600
    assert first_costs.total_usd == pytest.approx(first_total)
    assert second_costs.total_usd == pytest.approx(second_total)
    assert first_costs.idle_hours == pytest.approx(320 / 3600)
    assert second_costs.idle_hours == pytest.approx(30 / 3600)
    assert first_costs.instances_rented == 1
    assert second_costs.instances_rented == 0
    assert second_costs.warm_jobs == 1
    # The second run measured no boot of its own.
    assert second_costs.mean_boot_seconds is None
    # Together the runs pay for the whole lifetime, 1000 to 1650.
    whole = 0.02 * 650 / 3600 + 0.50 * 640 / 3600
    assert first_total + second_total == pytest.approx(whole)


def test_price_fields_from_offer_and_row() -> None:
    offer = {"id": 7, "dph_base": 1.0, "storage_cost": 0.14933, "dph_total": 1.002}

    fields = costs.rental_price_fields(offer, 10.0)
    running = costs.running_fields(
        {"uptime_mins": 0.5}, seen_at=2000.0, rented_at=1900.0
    )

    assert fields == {
        "dph_base": 1.0,
        "storage_dph": pytest.approx(0.14933 * 10 / 720),
    }
    assert costs.rental_price_fields({"id": 8}, 10.0) == {}
    assert running == {"running_at": pytest.approx(1970.0)}
    assert costs.running_fields(
        {"uptime_mins": None}, seen_at=2000.0, rented_at=1900.0
    ) == {"running_at": 2000.0}
    assert costs.running_fields(
        {"uptime_mins": 60.0}, seen_at=2000.0, rented_at=1900.0
    ) == {"running_at": 1900.0}


def report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vastai-pool")
    costs.add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", *argv])
    return int(args.func(args))


def test_report_json_of_latest_run(
    store: Store, clock: Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    older = start_run(store)
    pk = rent(store, clock, older, label="a", running_after=10, ready_after=20)
    destroy(store, pk)
    clock.now += 10
    latest = start_run(store)
    pk = rent(store, clock, latest, label="b", running_after=10, ready_after=20)
    run_job(store, clock, latest, pk, "train", 100)
    destroy(store, pk)

    assert report(["--db", str(store.path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert report(["--db", str(store.path), "--run", older]) == 0
    table = capsys.readouterr().out

    assert shown["run_id"] == latest
    assert shown["jobs"] == 1
    assert shown["usd_per_rule"]["train"] == pytest.approx(0.52 * 100 / 3600)
    assert shown["total_usd"] == pytest.approx(costs.run_costs(store, latest).total_usd)
    assert f"Vast.ai pool run {older}:" in table
    assert "instances rented" in table
    assert "idle (USD)" in table


def test_report_without_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "none.sqlite"

    assert report(["--db", str(missing)]) == 1
    assert "not found" in capsys.readouterr().err
    assert not missing.exists()


# End to end ---------------------------------------------------------------

SNAKEFILE = """
rule all:
    input: expand("plots/{n}.txt", n=[1, 2])

rule train:
    output: "models/{n}.txt"
    shell: "echo model {wildcards.n} > {output}"

rule plot:
    input: "models/{n}.txt"
    output: "plots/{n}.txt"
    shell: "cat {input} > {output}"
"""

# Per instance, seconds of its dph_total by which the pool's bill may differ
# from the sandbox's: the pool stamps the rental before the create call and
# the destroy after the call returns, while the sandbox bills from inside
# each call. On two busy cores each call takes well under a second.
TIMESTAMP_SLACK_SECONDS = 2.0


def test_report_total_equals_ledger(sandbox: Sandbox, tmp_path: Path) -> None:
    workdir = tmp_path / "workflow"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(textwrap.dedent(SNAKEFILE))
    pool_db = tmp_path / "pool.sqlite"
    command = [sys.executable, "-m", "snakemake", "--executor", "vastai"]
    command += ["--jobs", "1", "--vastai-api-url", sandbox.url]
    command += ["--vastai-api-key", sandbox.api_key, "--vastai-pool-db", str(pool_db)]
    result = subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "idle instance-hours" in output

    ledger = sandbox.ledger()
    shown = report_json(pool_db)
    with Store(pool_db) as store:
        records = db.list_instances(store, include_destroyed=True)
    created = [record for record in records if record.vast_id is not None]

    assert ledger["alive"] == []
    assert shown["instances_rented"] == ledger["rented"] == len(created)
    assert shown["jobs"] == 4
    assert set(shown["usd_per_rule"]) == {"train", "plot"}
    slack = sum(r.hardware.dph_total for r in created) * TIMESTAMP_SLACK_SECONDS
    assert shown["total_usd"] == pytest.approx(ledger["billed_usd"], abs=slack / 3600)


def report_json(pool_db: Path) -> dict:
    """Run ``vastai-pool report --json`` through the installed console script."""
    script = shutil.which("vastai-pool", path=str(Path(sys.executable).parent))
    assert script is not None
    shown = subprocess.run(
        [script, "report", "--json", "--db", str(pool_db)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(shown.stdout)
