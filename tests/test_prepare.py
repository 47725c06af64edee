"""Preparing a new instance installs only the packages it lacks."""

from __future__ import annotations

import importlib.metadata
import logging
import time
from pathlib import Path

import pytest

from vastai_pool.models import DestroyReason
from vastai_pool.pool import JobSpec, JobState, JobStatus, Pool, PoolConfig
from vastai_pool.requirements import Requirements
from vastai_pool.sandbox import Sandbox
from vastai_pool.store import Store, list_instances


def spec() -> JobSpec:
    return JobSpec(
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


def run_one(sandbox: Sandbox, tmp_path: Path, packages: tuple[str, ...]) -> JobStatus:
    pool = Pool(
        PoolConfig(
            api_url=sandbox.url,
            api_key=sandbox.api_key,
            db_path=tmp_path / "pool.sqlite",
            workdir=tmp_path,
            logs_dir=tmp_path / "logs",
            key_dir=tmp_path / "keys",
            poll_interval=0.05,
            packages=packages,
        )
    )
    pool.open()
    try:
        handle = pool.submit(spec())
        deadline = time.monotonic() + 180
        while pool.status(handle).state in (JobState.QUEUED, JobState.RUNNING):
            assert time.monotonic() < deadline, "the job did not finish"
            time.sleep(0.05)
        return pool.status(handle)
    finally:
        pool.close()


def test_present_package_not_installed(
    sandbox: Sandbox, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The sandbox's instances run this interpreter, so what is installed here
    # is installed there.
    present = f"paramiko=={importlib.metadata.version('paramiko')}"
    with caplog.at_level(logging.INFO, logger="vastai_pool.rental"):
        status = run_one(sandbox, tmp_path, (present,))

    assert status.state is JobState.SUCCEEDED, status.message
    assert not [r for r in caplog.records if "installing" in r.getMessage()]
    assert sandbox.ledger()["alive"] == []


def test_failed_install_destroys_instance(sandbox: Sandbox, tmp_path: Path) -> None:
    missing = "vastai-pool-no-such-package==0.0.1"
    status = run_one(sandbox, tmp_path, (missing,))

    assert status.state is JobState.FAILED
    assert f"pip install {missing} failed" in status.message
    assert sandbox.ledger()["rented"] == 1
    assert sandbox.ledger()["alive"] == []
    with Store(tmp_path / "pool.sqlite") as store:
        (record,) = list_instances(store, include_destroyed=True)
    assert record.destroy_reason is DestroyReason.BOOT_FAILED
