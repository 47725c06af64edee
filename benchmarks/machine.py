"""Describe the machine a benchmark ran on, for the tables in docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """Return the first ``model name`` in /proc/cpuinfo, or the platform's guess."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def ram_gib() -> float | None:
    """Return MemTotal from /proc/meminfo in GiB, or None where it is absent."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            kib = int(line.split()[1])
            return kib / 1024**2
    return None


def usable_cpus() -> int:
    """Return the CPUs this process may run on, as ``nproc`` counts them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe_machine() -> str:
    ram = ram_gib()
    ram_text = f"{ram:.1f} GiB RAM" if ram is not None else "RAM unknown"
    return (
        f"{usable_cpus()} CPUs ({cpu_model()}), {ram_text}, "
        f"Python {platform.python_version()}, {platform.system()}"
    )


if __name__ == "__main__":
    print(describe_machine())
