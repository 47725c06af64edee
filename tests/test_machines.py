"""Machines that failed: remembered in the pool database, listed and
forgotten with ``vastai-pool machines``, skipped by later runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vastai_pool import store as pool_store
from vastai_pool.cli import main
from vastai_pool.pool import JobSpec, JobState, Pool, PoolConfig
from vastai_pool.requirements import Requirements
from vastai_pool.sandbox import Sandbox

API_URL = "https://console.vast.ai"
API_KEY = "machines-test-key"
DAY = 24 * 3600.0


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("VAST_API_KEY", "SNAKEMAKE_VASTAI_API_KEY", "VAST_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def remember(store: pool_store.Store, machine_id: int, detail: str) -> None:
    pool_store.record_failed_machine(
        store,
        account=pool_store.account_id(API_URL, API_KEY),
        machine_id=machine_id,
        run_id="r1",
        instance_vast_id=machine_id * 10,
        detail=detail,
    )


def cli(db_path: Path, *args: str) -> list[str]:
    return [
        "machines",
        "--db",
        str(db_path),
        "--api-url",
        API_URL,
        "--api-key",
        API_KEY,
        *args,
    ]


def test_machines_lists_failures_and_forgets_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path = tmp_path / "pool.sqlite"
    with pool_store.Store(db_path) as store:
        remember(store, 5001, "failed to boot: manifest unknown")
        remember(store, 5001, "failed to boot: manifest unknown")
        remember(store, 5002, "host offline: lost its instance")

    assert main(cli(db_path, "--json")) == 0
    listed = {row["machine_id"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(listed) == {5001, 5002}
    assert listed[5001]["failures"] == 2
    assert "manifest unknown" in listed[5001]["detail"]

    assert main(cli(db_path, "--forget", "5001")) == 0
    capsys.readouterr()
    assert main(cli(db_path)) == 0
    table = capsys.readouterr().out
    assert "5002" in table
    assert "host offline" in table
    assert "5001" not in table

    assert main(cli(db_path, "--forget")) == 0
    capsys.readouterr()
    assert main(cli(db_path)) == 0
    assert capsys.readouterr().out.strip() == "no machine is avoided"


def test_failures_older_than_a_day_are_not_avoided(tmp_path: Path) -> None:
    with pool_store.Store(tmp_path / "pool.sqlite") as store:
        now = store.clock()
        store.clock = lambda: now - DAY - 60
        remember(store, 5003, "failed to boot: pull rate limit")
        store.clock = lambda: now
        remember(store, 5004, "failed to boot: no space left on device")
        account = pool_store.account_id(API_URL, API_KEY)
        assert set(pool_store.failed_machines(store, account)) == {5004}


def run_one_job(config: PoolConfig) -> tuple[JobState, str, int | None]:
    """Run one job on a fresh pool; return its state, message and machine."""
    pool = Pool(config)
    pool.open()
    try:
        handle = pool.submit(
            JobSpec(
                rule="step",
                job_id=1,
                attempt=1,
                requirements=Requirements(
                    image="python:3.11-slim", disk_gb=10, datacenter_only=False
                ),
                command="true",
                inputs=(),
                outputs=(),
                logs=(),
                source_archive=None,
                source_checksum=None,
            )
        )
        while pool.status(handle).state in (JobState.QUEUED, JobState.RUNNING):
            time.sleep(0.05)
        status = pool.status(handle)
        (record,) = [
            r
            for r in pool_store.list_instances(pool.store, include_destroyed=True)
            if r.vast_id == status.instance_id
        ]
    finally:
        pool.close()
    return status.state, status.message, record.machine_id


def test_later_run_skips_remembered_machine(tmp_path: Path) -> None:
    with Sandbox(boot_seconds=0.2) as sandbox:
        db_path = tmp_path / "pool.sqlite"
        config = PoolConfig(
            api_url=sandbox.url,
            api_key=sandbox.api_key,
            db_path=db_path,
            workdir=tmp_path,
            logs_dir=tmp_path / "logs",
            key_dir=tmp_path / "keys",
            poll_interval=0.2,
        )
        first_state, first_message, first_machine = run_one_job(config)
        assert first_state is JobState.SUCCEEDED, first_message
        assert first_machine is not None
        with pool_store.Store(db_path) as store:
            pool_store.record_failed_machine(
                store,
                account=pool_store.account_id(sandbox.url, sandbox.api_key),
                machine_id=first_machine,
                run_id=None,
                instance_vast_id=None,
                detail="failed to boot: OCI runtime create failed",
            )
        # The same job would pick the same, cheapest machine again.
        state, message, machine = run_one_job(config)
        assert sandbox.ledger()["alive"] == []

    assert state is JobState.SUCCEEDED, message
    assert machine is not None and machine != first_machine
