"""Measure what a job pays on a warm instance before its command starts.

Submits jobs one after another through ``vastai_pool.pool.Pool`` against an
embedded sandbox marketplace. Each job's command first writes
``date +%s.%N`` to a file that comes back as its output, and the overhead is
that time minus the moment ``Pool.submit`` was called. The first job rents
and boots the instance; every later one finds it warm. Beside the median
warm overhead it prints one SSH round trip (``true``) and
``python3 -m snakemake --version`` on the same instance, both over the
pool's own SSH key.

The sandbox's instances share this machine's clock. On Vast.ai the two
clocks differ, so this method only holds in the sandbox.

Usage: python benchmarks/warm_overhead.py [--jobs N] [--repeat-ssh N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine

from vastai_pool import store as db
from vastai_pool.pool import JobSpec, JobState, Pool, PoolConfig
from vastai_pool.requirements import Requirements
from vastai_pool.sandbox import Sandbox
from vastai_pool.ssh import Connection, Endpoint, ensure_keypair

IMAGE = "vastai/pytorch:@vastai-automatic-tag"
# Seconds between status checks; status() only reads memory, so this is cheap.
POLL_SECONDS = 0.01


def run_job(pool: Pool, workdir: Path, index: int) -> float:
    """Run one job to completion; return its start minus its submit time (s)."""
    output = f"started-{index}.txt"
    spec = JobSpec(
        rule="overhead",
        job_id=index,
        attempt=1,
        requirements=Requirements(image=IMAGE, disk_gb=10),
        command=f"date +%s.%N > {output}",
        inputs=(),
        outputs=(output,),
        logs=(),
        source_archive=None,
        source_checksum=None,
    )
    submitted = time.time()
    handle = pool.submit(spec)
    while (status := pool.status(handle)).state in (JobState.QUEUED, JobState.RUNNING):
        time.sleep(POLL_SECONDS)
    if status.state is not JobState.SUCCEEDED:
        raise SystemExit(f"benchmark job {index} failed: {status.message}")
    started = float((workdir / output).read_text().strip())
    return started - submitted


def time_command(connection: Connection, command: str, repeat: int) -> float:
    """Return the median wall time (s) of ``command`` run over ``connection``."""
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = connection.run(command)
        seconds.append(time.perf_counter() - started)
        if result.exit_code != 0:
            raise SystemExit(f"{command!r} failed on the instance: {result.stderr}")
    return statistics.median(seconds)


def measure_ssh(config: PoolConfig, repeat: int) -> tuple[float, float]:
    """Time ``true`` and ``python3 -m snakemake --version`` on the run's instance."""
    with db.Store(config.db_path) as store:
        records = db.list_instances(store)
    record = next(r for r in records if r.ssh_host is not None)
    private_key, _ = ensure_keypair(config.key_dir)
    connection = Connection(
        Endpoint(record.ssh_host, record.ssh_port),
        private_key,
        host_key=record.host_key,
    )
    connection.connect()
    try:
        round_trip = time_command(connection, "true", repeat)
        snakemake_version = time_command(
            connection, "python3 -m snakemake --version", repeat
        )
    finally:
        connection.close()
    return round_trip, snakemake_version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=21, help="jobs, the first cold")
    parser.add_argument(
        "--repeat-ssh", type=int, default=10, help="runs of each SSH command"
    )
    args = parser.parse_args(argv)

    print(f"machine: {describe_machine()}")
    sandbox = Sandbox(boot_seconds=0.3)
    sandbox.start()
    try:
        with tempfile.TemporaryDirectory(prefix="warm-overhead-") as scratch:
            workdir = Path(scratch) / "workdir"
            workdir.mkdir()
            config = PoolConfig(
                api_url=sandbox.url,
                api_key=sandbox.api_key,
                db_path=Path(scratch) / "pool.sqlite",
                workdir=workdir,
                logs_dir=workdir / ".snakemake" / "vastai" / "logs",
                key_dir=Path(scratch) / "keys",
                # Keep the one instance warm for the whole benchmark.
                idle_timeout=600.0,
                max_instances=1,
            )
            pool = Pool(config)
            pool.open()
            try:
                overheads = [run_job(pool, workdir, i) for i in range(args.jobs)]
                ssh_round_trip, snakemake_version = measure_ssh(config, args.repeat_ssh)
            finally:
                summary = pool.close()
    finally:
        sandbox.stop()

    cold, warm = overheads[0], overheads[1:]
    print(
        f"instances rented: {summary.instances_rented}, jobs: {summary.jobs}, "
        f"warm: {summary.warm_jobs}"
    )
    print()
    print("| measure | runs | median (s) |")
    print("| --- | ---: | ---: |")
    print(f"| first job, rent and boot included | 1 | {cold:.3f} |")
    warm_median = statistics.median(warm)
    print(f"| warm job, submit to command start | {len(warm)} | {warm_median:.3f} |")
    print(f"| one SSH round trip (`true`) | {args.repeat_ssh} | {ssh_round_trip:.3f} |")
    print(
        f"| `python3 -m snakemake --version` on the instance | {args.repeat_ssh} "
        f"| {snakemake_version:.3f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
