"""Booting instances share one paginated list call per status round."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from vastai_pool.pool import JobSpec, JobState, Pool, PoolConfig
from vastai_pool.requirements import Requirements
from vastai_pool.sandbox import Sandbox
from vastai_pool.sandbox.faults import FaultHooks, Reply

POLL_SECONDS = 0.25
SHOW_PATH = re.compile(r"/api/v0/instances/\d+")
LIST_PATH = "/api/v1/instances"


class RequestLog(FaultHooks):
    """Records when each status request arrived; injects no fault."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.shows = 0
        self.lists: list[float] = []

    def http_reply(self, method: str, path: str) -> Reply | None:
        with self.lock:
            if method == "GET" and SHOW_PATH.fullmatch(path):
                self.shows += 1
            if method == "GET" and path == LIST_PATH:
                self.lists.append(time.monotonic())
        return None


def spec(job_id: int, model: str) -> JobSpec:
    return JobSpec(
        rule="step",
        job_id=job_id,
        attempt=1,
        requirements=Requirements(
            image="python:3.11-slim",
            disk_gb=10,
            gpu_names=(model,),
            datacenter_only=False,
        ),
        command="true",
        inputs=(),
        outputs=(),
        logs=(),
        source_archive=None,
        source_checksum=None,
    )


def test_boots_share_list_calls(tmp_path: Path) -> None:
    requests = RequestLog()
    with Sandbox(boot_seconds=1.5) as sandbox:
        sandbox.faults = requests
        pool = Pool(
            PoolConfig(
                api_url=sandbox.url,
                api_key=sandbox.api_key,
                db_path=tmp_path / "pool.sqlite",
                workdir=tmp_path,
                logs_dir=tmp_path / "logs",
                key_dir=tmp_path / "keys",
                poll_interval=POLL_SECONDS,
            )
        )
        pool.open()
        try:
            # Three models, so three instances boot at the same time.
            models = ("RTX_3090", "RTX_4090", "L40S")
            handles = [pool.submit(spec(i, m)) for i, m in enumerate(models)]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and any(
                pool.status(h).state in (JobState.QUEUED, JobState.RUNNING)
                for h in handles
            ):
                time.sleep(0.05)
            states = [pool.status(h).state for h in handles]
            # Destroys at close confirm with a show call each; only the boots
            # count here.
            shows_while_booting = requests.shows
        finally:
            pool.close()
        assert sandbox.ledger()["alive"] == []
        rented = sandbox.ledger()["rented"]

    assert states == [JobState.SUCCEEDED] * 3
    assert rented == 3
    assert shows_while_booting == 0
    assert len(requests.lists) >= 2
    gaps = [b - a for a, b in zip(requests.lists, requests.lists[1:], strict=False)]
    # One round per poll interval for all three boots; the run's stale-run
    # sweep at start may add one list call of its own.
    close_together = [gap for gap in gaps if gap < 0.8 * POLL_SECONDS]
    assert len(close_together) <= 1, gaps
