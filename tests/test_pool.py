"""The pool's lifecycle, driven directly with plain shell jobs.

Every test runs against a real sandbox marketplace (real SSH hosts on
127.0.0.1) and a real SQLite pool database.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from vastai_pool import store as db
from vastai_pool.errors import NoMatchingOffer
from vastai_pool.models import DestroyReason, InstanceState
from vastai_pool.pool import JobSpec, JobState, JobStatus, Pool, PoolConfig
from vastai_pool.remote import remote_work_dir
from vastai_pool.requirements import Requirements

IMAGE = "python:3.11-slim"


@pytest.fixture
def market(request: pytest.FixtureRequest) -> Iterator[object]:
    """A sandbox marketplace whose instances boot in 0.2 s (or the parameter)."""
    from vastai_pool.sandbox import Sandbox

    sandbox = Sandbox(boot_seconds=getattr(request, "param", 0.2))
    sandbox.start()
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "workflow"
    path.mkdir()
    return path


@pytest.fixture
def make_pool(market, workdir: Path, tmp_path: Path) -> Iterator[Callable[..., Pool]]:
    """Open pools on the market; close any a test leaves open."""
    opened: list[Pool] = []

    def make(**overrides: object) -> Pool:
        settings: dict = dict(
            api_url=market.url,
            api_key=market.api_key,
            db_path=tmp_path / "pool.sqlite",
            workdir=workdir,
            logs_dir=tmp_path / "logs",
            key_dir=tmp_path / "keys",
            boot_timeout=30.0,
            poll_interval=0.05,
        )
        settings.update(overrides)
        pool = Pool(PoolConfig(**settings))
        pool.open()
        opened.append(pool)
        return pool

    yield make
    for pool in opened:
        pool.close(interrupted=True)
    # Every rental, on every path a test took, ends destroyed unless kept.
    if not any(p.config.keep_instances or p.config.linger for p in opened):
        assert market.ledger()["alive"] == []


def job(
    job_id: int,
    command: str,
    *,
    rule: str = "step",
    gpus: int = 1,
    models: tuple[str, ...] = (),
    inputs: tuple[str, ...] = (),
    outputs: tuple[str, ...] = (),
    logs: tuple[str, ...] = (),
    runtime_minutes: float | None = None,
) -> JobSpec:
    requirements = Requirements(
        image=IMAGE,
        disk_gb=10,
        num_gpus=gpus,
        gpu_names=models,
        datacenter_only=False,
    )
    return JobSpec(
        rule=rule,
        job_id=job_id,
        attempt=1,
        requirements=requirements,
        command=command,
        inputs=inputs,
        outputs=outputs,
        logs=logs,
        source_archive=None,
        source_checksum=None,
        runtime_minutes=runtime_minutes,
    )


def finish(pool: Pool, handle: str, timeout: float = 120.0) -> JobStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = pool.status(handle)
        if status.state in (JobState.SUCCEEDED, JobState.FAILED):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {handle} did not finish: {pool.status(handle)}")


def run(pool: Pool, spec: JobSpec) -> JobStatus:
    return finish(pool, pool.submit(spec))


def alive_ids(market) -> set[int]:
    return {int(entry) for entry in _ids(market.ledger()["alive"])}


def rented_count(market) -> int:
    rented = market.ledger()["rented"]
    return rented if isinstance(rented, int) else len(rented)


def _ids(entries: object) -> list[object]:
    if isinstance(entries, dict):
        return list(entries)
    return [e["id"] if isinstance(e, dict) else e for e in entries]  # type: ignore[union-attr]


def leases(db_path: Path) -> list[tuple[int, int, bool]]:
    """Return (job_id, instance vast_id, warm) of every lease, in order."""
    engine = create_engine(f"sqlite:///{db_path}")
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT leases.job_id, instances.vast_id, leases.warm FROM leases "
                "JOIN instances ON instances.pk = leases.instance_pk "
                "ORDER BY leases.id"
            )
        ).all()
    engine.dispose()
    return [(row[0], row[1], bool(row[2])) for row in rows]


def records(pool: Pool) -> dict[int, db.InstanceRecord]:
    return {
        r.vast_id: r
        for r in db.list_instances(pool.store, include_destroyed=True)
        if r.vast_id is not None
    }


def test_job_output_comes_back(make_pool, workdir: Path) -> None:
    pool = make_pool()
    status = run(
        pool,
        job(
            1,
            "echo hello from the job; mkdir -p out && echo 42 > out/answer.txt",
            outputs=("out/answer.txt",),
        ),
    )
    assert status.state is JobState.SUCCEEDED, status.message
    assert (workdir / "out/answer.txt").read_text() == "42\n"
    assert status.log_path is not None
    assert "hello from the job" in status.log_path.read_text()
    assert status.instance_id is not None


def test_outputs_are_renamed_into_place(make_pool, workdir: Path) -> None:
    pool = make_pool()
    status = run(
        pool,
        job(
            1,
            "mkdir -p res/tree && head -c 300000 /dev/urandom > res/big.bin && "
            "echo a > res/tree/a && echo b > res/tree/b",
            outputs=("res/big.bin", "res/tree", "res/missing.txt"),
        ),
    )
    assert status.state is JobState.SUCCEEDED, status.message
    assert (workdir / "res/big.bin").stat().st_size == 300000
    assert (workdir / "res/tree/b").read_text() == "b\n"
    # No temporary names are left behind, and a missing output is skipped so
    # that Snakemake reports it.
    names = sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*"))
    assert names == ["res", "res/big.bin", "res/tree", "res/tree/a", "res/tree/b"]


def test_idle_instance_is_reused_warm(make_pool, market, tmp_path: Path) -> None:
    pool = make_pool()
    first = run(pool, job(1, "true"))
    second = run(pool, job(2, "true"))
    assert first.state is JobState.SUCCEEDED, first.message
    assert second.state is JobState.SUCCEEDED, second.message
    assert second.instance_id == first.instance_id
    assert rented_count(market) == 1
    assert leases(tmp_path / "pool.sqlite") == [
        (1, first.instance_id, False),
        (2, first.instance_id, True),
    ]


def test_gpu_models_never_share_instance(
    make_pool, market, workdir: Path, tmp_path: Path
) -> None:
    pool = make_pool()
    plan = [
        (1, ("RTX_4090",), 1),
        (2, ("A100_SXM4",), 1),
        (3, ("RTX_4090",), 2),
        (4, ("RTX_4090",), 1),
    ]
    statuses = {}
    for job_id, models, gpus in plan:
        spec = job(
            job_id,
            f"nvidia-smi -L > gpus-{job_id}.txt",
            models=models,
            gpus=gpus,
            outputs=(f"gpus-{job_id}.txt",),
        )
        statuses[job_id] = run(pool, spec)
        assert statuses[job_id].state is JobState.SUCCEEDED, statuses[job_id].message

    for job_id, models, gpus in plan:
        listed = (workdir / f"gpus-{job_id}.txt").read_text().splitlines()
        assert len(listed) >= gpus
        wanted = models[0].replace("_", " ").replace("A100 SXM4", "A100-SXM4")
        assert all(wanted in line for line in listed), listed

    assert statuses[2].instance_id != statuses[1].instance_id
    assert statuses[3].instance_id not in (
        statuses[1].instance_id,
        statuses[2].instance_id,
    )
    # Job 4 fits both RTX 4090 instances and finds one of them warm.
    assert statuses[4].instance_id in (
        statuses[1].instance_id,
        statuses[3].instance_id,
    )
    assert rented_count(market) == 3
    by_id = records(pool)
    for job_id, vast_id, _warm in leases(tmp_path / "pool.sqlite"):
        _, models, gpus = plan[job_id - 1]
        hardware = by_id[vast_id].hardware
        assert hardware.num_gpus >= gpus
        assert hardware.gpu_name == models[0].replace("_", " ")


def test_inputs_uploaded_once_per_instance(make_pool, workdir: Path) -> None:
    pool = make_pool()
    (workdir / "data").mkdir()
    (workdir / "data/input.txt").write_text("first\n")
    (workdir / "data/more.txt").write_text("more\n")
    probe = "stat -c '%i %Y' data/input.txt > {0}; cat data/input.txt >> {0}"
    first = run(
        pool, job(1, probe.format("seen-1"), inputs=("data",), outputs=("seen-1",))
    )
    second = run(
        pool,
        job(2, probe.format("seen-2"), inputs=("data/input.txt",), outputs=("seen-2",)),
    )
    assert first.state is JobState.SUCCEEDED, first.message
    assert second.state is JobState.SUCCEEDED, second.message
    assert second.instance_id == first.instance_id
    # Same inode and mtime: the second job found the file already in place.
    seen_1 = (workdir / "seen-1").read_text()
    seen_2 = (workdir / "seen-2").read_text()
    assert seen_1 == seen_2
    held = db.files_on(pool.store, records(pool)[first.instance_id].pk)
    base = remote_work_dir(workdir)
    assert held[f"{base}/data/input.txt"][0] == len("first\n")
    assert f"{base}/data/more.txt" in held
    assert f"{base}/seen-1" in held

    (workdir / "data/input.txt").write_text("second version\n")
    third = run(
        pool,
        job(3, probe.format("seen-3"), inputs=("data/input.txt",), outputs=("seen-3",)),
    )
    assert third.state is JobState.SUCCEEDED, third.message
    assert (workdir / "seen-3").read_text().endswith("second version\n")


def test_job_env_reaches_job_not_command_line(make_pool, workdir: Path) -> None:
    pool = make_pool(job_env={"SECRET_TOKEN": "s3cr3t value"})
    status = run(pool, job(1, 'echo "$SECRET_TOKEN" > env.txt', outputs=("env.txt",)))
    assert status.state is JobState.SUCCEEDED, status.message
    assert (workdir / "env.txt").read_text() == "s3cr3t value\n"


def test_failed_job_leaves_instance_warm(make_pool, market) -> None:
    pool = make_pool()
    failed = run(pool, job(1, "echo broken >&2; exit 3"))
    assert failed.state is JobState.FAILED
    assert failed.exit_code == 3
    assert "exited with code 3" in failed.message
    again = run(pool, job(2, "true"))
    assert again.state is JobState.SUCCEEDED, again.message
    assert again.instance_id == failed.instance_id
    assert rented_count(market) == 1


def test_runtime_limit_kills_job_and_instance(make_pool, market) -> None:
    pool = make_pool()
    status = run(pool, job(1, "sleep 60", runtime_minutes=0.01))
    assert status.state is JobState.FAILED
    assert "runtime limit of 0.01 minutes" in status.message
    assert status.instance_id not in alive_ids(market)
    record = records(pool)[status.instance_id]
    assert record.state == InstanceState.DESTROYED
    assert record.destroy_reason == DestroyReason.JOB_TIMEOUT


def test_close_destroys_idle_instances(make_pool, market) -> None:
    pool = make_pool()
    first = run(pool, job(1, "true", models=("RTX_4090",)))
    second = run(pool, job(2, "true", models=("RTX_3090",)))
    assert first.state is JobState.SUCCEEDED, first.message
    assert second.state is JobState.SUCCEEDED, second.message
    assert len(alive_ids(market)) == 2
    summary = pool.close()
    assert alive_ids(market) == set()
    assert summary.instances_rented == 2
    assert summary.jobs == 2
    assert summary.warm_jobs == 0
    assert summary.instances_alive == 0
    assert summary.billed_usd > 0


def test_keep_instances_survive_close(make_pool, market, tmp_path: Path) -> None:
    pool = make_pool(keep_instances=True)
    status = run(pool, job(1, "true"))
    assert status.state is JobState.SUCCEEDED, status.message
    summary = pool.close()
    assert alive_ids(market) == {status.instance_id}
    assert summary.instances_alive == 1
    with db.Store(tmp_path / "pool.sqlite") as store:
        kept = [r for r in db.list_instances(store) if r.vast_id == status.instance_id]
    assert [r.state for r in kept] == [InstanceState.KEPT]


@pytest.mark.parametrize("market", [30.0], indirect=True)
def test_boot_timeout_tries_other_machines(make_pool, market) -> None:
    pool = make_pool(boot_timeout=0.3)
    status = run(pool, job(1, "true"))
    assert status.state is JobState.FAILED
    assert "boot timeout" in status.message
    assert "5 instances failed to boot" in status.message
    # Five boots, each on another machine, every one destroyed.
    assert rented_count(market) == 5
    assert alive_ids(market) == set()
    rows = list(records(pool).values())
    assert len({r.machine_id for r in rows}) == 5
    assert {r.state for r in rows} == {InstanceState.DESTROYED}
    assert {r.destroy_reason for r in rows} == {DestroyReason.BOOT_FAILED}
    assert str(rows[-1].vast_id) in status.message
    remembered = db.failed_machines(pool.store, pool.account)
    assert set(remembered) == {r.machine_id for r in rows}


def test_max_instances_waits_then_evicts(make_pool, market) -> None:
    pool = make_pool(max_instances=1)
    handles = [pool.submit(job(i, "sleep 0.3")) for i in (1, 2, 3)]
    statuses = [finish(pool, h) for h in handles]
    assert all(s.state is JobState.SUCCEEDED for s in statuses), statuses
    assert len({s.instance_id for s in statuses}) == 1
    assert rented_count(market) == 1
    # A job the idle instance cannot serve evicts it instead of waiting forever.
    other = run(pool, job(4, "true", gpus=2))
    assert other.state is JobState.SUCCEEDED, other.message
    assert alive_ids(market) == {other.instance_id}


def test_cancel_destroys_instance(make_pool, market) -> None:
    pool = make_pool()
    handle = pool.submit(job(1, "sleep 60"))
    deadline = time.monotonic() + 60
    while pool.status(handle).state is not JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pool.cancel([handle])
    status = pool.status(handle)
    assert status.state is JobState.FAILED
    assert alive_ids(market) == set()


def test_check_market_rejects_impossible_requirements(make_pool, market) -> None:
    pool = make_pool()
    requirements = Requirements(image=IMAGE, disk_gb=10, gpu_names=("RTX_9999",))
    with pytest.raises(NoMatchingOffer) as caught:
        pool.check_market(requirements)
    assert "RTX_9999" in caught.value.query
    pool.check_market(Requirements(image=IMAGE, disk_gb=10, datacenter_only=False))
    assert rented_count(market) == 0


def test_fatal_boot_message_moves_job_to_another_machine(make_pool, market) -> None:
    from vastai_pool.sandbox import BootFault, FaultHooks

    failed: list[int] = []

    class FirstPullFails(FaultHooks):
        def boot_fault(self, instance_id: int) -> BootFault | None:
            if failed and failed[0] != instance_id:
                return None
            failed[:1] = [instance_id]
            return BootFault("loading", "Error response: manifest unknown")

    market.faults = FirstPullFails()
    pool = make_pool()
    status = run(pool, job(1, "true"))
    assert status.state is JobState.SUCCEEDED, status.message
    assert alive_ids(market) == {status.instance_id}
    rows = {r.vast_id: r for r in records(pool).values()}
    bad = rows[failed[0]]
    assert bad.destroy_reason == DestroyReason.BOOT_FAILED
    assert rows[status.instance_id].machine_id != bad.machine_id
    remembered = db.failed_machines(pool.store, pool.account)
    assert list(remembered) == [bad.machine_id]
    assert "manifest unknown" in remembered[bad.machine_id]


def test_taken_offer_falls_through_to_next(make_pool, market) -> None:
    from vastai_pool.sandbox import FaultHooks, Reply

    taken: list[int] = []

    class FirstOfferTaken(FaultHooks):
        def create_reply(self, offer_id: int) -> Reply | None:
            if taken:
                return None
            taken.append(offer_id)
            body = {"success": False, "error": "no_such_ask", "msg": "taken"}
            return Reply(404, body)

    market.faults = FirstOfferTaken()
    pool = make_pool()
    status = run(pool, job(1, "true"))
    assert status.state is JobState.SUCCEEDED, status.message
    rows = db.list_instances(pool.store, include_destroyed=True)
    assert [r.destroy_reason for r in rows] == [DestroyReason.RENT_FAILED, None]
    assert rows[0].offer_id == taken[0]
    assert rows[1].vast_id == status.instance_id


def test_host_gone_mid_job_fails_job(make_pool, market) -> None:
    from vastai_pool.api import VastApi

    pool = make_pool()
    handle = pool.submit(job(1, "sleep 60"))
    deadline = time.monotonic() + 60
    while True:
        status = pool.status(handle)
        if status.state is JobState.RUNNING:
            jobs = market.instance_dir(status.instance_id) / "vastai-pool/jobs"
            if list(jobs.glob("*/pid")):
                break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    VastApi(market.url, market.api_key).destroy_instance(status.instance_id)

    status = finish(pool, handle)
    assert status.state is JobState.FAILED
    assert f"lost its instance {status.instance_id}" in status.message
    record = records(pool)[status.instance_id]
    assert record.state == InstanceState.DESTROYED
    assert record.destroy_reason == DestroyReason.GONE


def test_idle_timeout_reaps_instance(make_pool, market) -> None:
    pool = make_pool(idle_timeout=0.2)
    status = run(pool, job(1, "true"))
    assert status.state is JobState.SUCCEEDED, status.message
    deadline = time.monotonic() + 30
    while status.instance_id in alive_ids(market):
        assert time.monotonic() < deadline, "the reaper never destroyed the instance"
        time.sleep(0.05)
    record = records(pool)[status.instance_id]
    assert record.destroy_reason == DestroyReason.IDLE_TIMEOUT


def test_linger_keeps_idle_instance_for_next_run(make_pool, market) -> None:
    pool = make_pool(linger=600.0)
    first = run(pool, job(1, "true"))
    pool.close()
    assert alive_ids(market) == {first.instance_id}

    successor = make_pool(linger=0.0)
    second = run(successor, job(1, "true"))
    assert second.state is JobState.SUCCEEDED, second.message
    assert second.instance_id == first.instance_id
    assert rented_count(market) == 1
    successor.close()
    assert alive_ids(market) == set()


def test_sources_shipped_once_per_checksum(
    make_pool, workdir: Path, tmp_path: Path
) -> None:
    import hashlib
    import tarfile

    sources = tmp_path / "src"
    (sources / "scripts").mkdir(parents=True)
    (sources / "Snakefile").write_text("rule all:\n    input: []\n")
    (sources / "scripts/tool.sh").write_text("echo tool ran\n")
    archive = tmp_path / "sources.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(sources / "Snakefile", arcname="Snakefile")
        tar.add(sources / "scripts", arcname="scripts")
    checksum = hashlib.sha256(archive.read_bytes()).hexdigest()

    pool = make_pool()
    statuses = []
    for job_id in (1, 2):
        spec = dataclasses.replace(
            job(
                job_id,
                f"sh scripts/tool.sh > tool-{job_id}.txt; "
                f"stat -c %i Snakefile >> tool-{job_id}.txt",
                outputs=(f"tool-{job_id}.txt",),
            ),
            source_archive=archive,
            source_checksum=checksum,
        )
        statuses.append(run(pool, spec))
    assert [s.state for s in statuses] == [JobState.SUCCEEDED] * 2, statuses
    first = (workdir / "tool-1.txt").read_text()
    assert first.startswith("tool ran\n")
    # The same inode: the archive was not unpacked a second time.
    assert (workdir / "tool-2.txt").read_text() == first
    record = records(pool)[statuses[0].instance_id]
    assert record.sources == frozenset({f"{remote_work_dir(workdir)}/{checksum}"})


def test_create_server_errors_reconcile_labels_then_give_up(make_pool, market) -> None:
    from vastai_pool.sandbox import FaultHooks, Reply

    class CreateGateway(FaultHooks):
        def create_reply(self, offer_id: int) -> Reply | None:
            return Reply(502, {"success": False, "error": "bad_gateway"})

    market.faults = CreateGateway()
    pool = make_pool()
    status = run(pool, job(1, "true"))
    assert status.state is JobState.FAILED
    assert "HTTP 502" in status.message
    # Three offers per search, three searches, and no instance behind any.
    rows = db.list_instances(pool.store, include_destroyed=True)
    assert len(rows) == 9
    assert {r.state for r in rows} == {InstanceState.DESTROYED}
    assert {r.destroy_reason for r in rows} == {DestroyReason.RENT_FAILED}
    assert rented_count(market) == 0


def test_second_workdir_gets_its_own_inputs(
    make_pool, workdir: Path, tmp_path: Path
) -> None:
    # Two workflows in different directories share one pool file, and the
    # second leases the first one's idle instance. The same file under the
    # same relative path is already there, but in the first workflow's
    # directory on the instance, so it must be uploaded again.
    other = tmp_path / "other-workflow"
    for directory in (workdir, other):
        (directory / "data").mkdir(parents=True)
        (directory / "data" / "input.txt").write_text("same content\n")
    first_pool = make_pool()
    second_pool = make_pool(workdir=other)
    command = "cat data/input.txt > copy.txt"
    spec = job(1, command, inputs=("data/input.txt",), outputs=("copy.txt",))

    first = run(first_pool, spec)
    second = run(second_pool, dataclasses.replace(spec, job_id=2))

    assert first.state is JobState.SUCCEEDED, first.message
    assert second.state is JobState.SUCCEEDED, second.message
    assert second.instance_id == first.instance_id
    assert (other / "copy.txt").read_text() == "same content\n"


def test_parallel_rentals_pick_different_offers(make_pool, market) -> None:
    # Twelve jobs rent at once from the same search results; each must
    # create on an offer no other job of the run is renting.
    pool = make_pool()
    handles = [pool.submit(job(i, "sleep 1")) for i in range(12)]
    statuses = [finish(pool, h) for h in handles]

    assert all(s.state is JobState.SUCCEEDED for s in statuses), statuses
    rows = db.list_instances(pool.store, include_destroyed=True)
    taken = [r for r in rows if r.destroy_reason == DestroyReason.RENT_FAILED]
    assert taken == []
    assert len({s.instance_id for s in statuses}) == 12


def test_wrong_image_fails_fast_and_blames_no_machine(make_pool, market) -> None:
    from vastai_pool.sandbox import BootFault, FaultHooks

    class NoSuchImage(FaultHooks):
        def boot_fault(self, instance_id: int) -> BootFault | None:
            return BootFault(
                "loading", "manifest for bad:tag not found: manifest unknown"
            )

    market.faults = NoSuchImage()
    pool = make_pool()
    first = run(pool, job(1, "true"))
    second = run(pool, job(2, "true"))

    assert first.state is JobState.FAILED
    assert "check --vastai-image" in first.message
    # Two machines show the image is at fault; the second job rents nothing.
    assert rented_count(market) == 2
    assert second.state is JobState.FAILED
    assert "no instance was rented" in second.message
    assert alive_ids(market) == set()
    assert db.failed_machines(pool.store, pool.account) == {}
