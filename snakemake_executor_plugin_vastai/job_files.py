"""The files the pool ships to and from an instance for one job or group job."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface


@dataclass(frozen=True)
class JobFiles:
    """Paths relative to the working directory, locally and on the instance."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    logs: tuple[str, ...]


def job_files(job: JobExecutorInterface, workdir: Path, name: str) -> JobFiles:
    """Collect the files to ship for ``job`` (named ``name`` in errors).

    A group's inputs exclude what the group produces itself, but its outputs
    include every member's outputs, because Snakemake checks each member's
    outputs locally after the group ends. Benchmark files come back with the
    outputs. Files in a storage provider are left out: the job reads and
    writes those through the storage plugin on the instance.
    """
    members = list(job.jobs) if job.is_group() else [job]
    outputs = [f for member in members for f in member.output]
    benchmarks = [member.benchmark for member in members if member.benchmark]
    logs = [f for member in members for f in member.log]
    return JobFiles(
        inputs=_relative(job.input, workdir, name, "input"),
        outputs=_relative([*outputs, *benchmarks], workdir, name, "output"),
        logs=_relative(logs, workdir, name, "log"),
    )


def _relative(
    files: Iterable[object], workdir: Path, name: str, kind: str
) -> tuple[str, ...]:
    paths = []
    for file in files:
        if getattr(file, "is_storage", False):
            continue
        path = os.path.normpath(str(file))
        if os.path.isabs(path):
            path = os.path.relpath(path, workdir)
        if path == ".." or path.startswith(".." + os.sep):
            raise WorkflowError(
                f"{name}: the {kind} file {file} lies outside the working directory "
                f"{workdir}, so it cannot be copied to the instance. Move it below "
                "the working directory or read it through a storage provider "
                "(--default-storage-provider)."
            )
        paths.append(path)
    return tuple(dict.fromkeys(paths))
