"""A fake ``nvidia-smi`` that lists an instance's rented GPUs.

It supports what pool code and users typically run on an instance:
``nvidia-smi -L``, ``nvidia-smi --query-gpu=FIELDS --format=csv[,noheader]
[,nounits]`` and a bare ``nvidia-smi`` summary. The GPUs are idle: no
memory is used and utilisation is 0 %.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

SCRIPT_TEMPLATE = '''#!{python}
"""Fake nvidia-smi of a sandbox instance (generated)."""
import sys

GPUS = {gpus}
DRIVER = {driver!r}
CUDA = {cuda!r}

FIELDS = {{
    "index": lambda i, g: (str(i), ""),
    "name": lambda i, g: (g["name"], ""),
    "uuid": lambda i, g: (g["uuid"], ""),
    "memory.total": lambda i, g: (str(g["memory_mib"]), " MiB"),
    "memory.used": lambda i, g: ("0", " MiB"),
    "memory.free": lambda i, g: (str(g["memory_mib"]), " MiB"),
    "utilization.gpu": lambda i, g: ("0", " %"),
    "temperature.gpu": lambda i, g: ("35", ""),
    "driver_version": lambda i, g: (DRIVER, ""),
    "count": lambda i, g: (str(len(GPUS)), ""),
    "pci.bus_id": lambda i, g: ("00000000:%02X:00.0" % (i + 1), ""),
}}


def query(spec, fmt):
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in FIELDS]
    if unknown:
        sys.stderr.write('Field "%s" is not a valid field to query.\\n' % unknown[0])
        return 2
    options = [part.strip() for part in fmt.split(",")]
    if "csv" not in options:
        sys.stderr.write("Only --format=csv is supported by this fake nvidia-smi.\\n")
        return 2
    if "noheader" not in options:
        print(", ".join(names))
    for index, gpu in enumerate(GPUS):
        cells = []
        for name in names:
            value, unit = FIELDS[name](index, gpu)
            cells.append(value if "nounits" in options else value + unit)
        print(", ".join(cells))
    return 0


def main(argv):
    if "-L" in argv or "--list-gpus" in argv:
        for index, gpu in enumerate(GPUS):
            print("GPU %d: %s (UUID: %s)" % (index, gpu["name"], gpu["uuid"]))
        return 0
    spec = fmt = None
    for arg in argv:
        if arg.startswith("--query-gpu="):
            spec = arg.split("=", 1)[1]
        elif arg.startswith("--format="):
            fmt = arg.split("=", 1)[1]
    if spec is not None:
        return query(spec, fmt or "csv")
    print("NVIDIA-SMI %s  Driver Version: %s  CUDA: %s" % (DRIVER, DRIVER, CUDA))
    for index, gpu in enumerate(GPUS):
        row = (index, gpu["name"], gpu["memory_mib"])
        print("|  %d  %-28s | 0MiB / %dMiB | 0%% |" % row)
    return 0


sys.exit(main(sys.argv[1:]))
'''


def write_nvidia_smi(
    bin_dir: Path,
    *,
    smi_name: str,
    num_gpus: int,
    gpu_ram_mb: int,
    driver_version: str,
    cuda_version: float,
    seed: str,
) -> Path:
    """Write an executable ``nvidia-smi`` for ``num_gpus`` GPUs into ``bin_dir``.

    GPU UUIDs derive from ``seed`` (the instance token), so they differ
    between instances and stay the same within one.
    """
    gpus = [
        {
            "name": smi_name,
            "uuid": f"GPU-{uuid.uuid5(uuid.NAMESPACE_OID, f'{seed}/{index}')}",
            "memory_mib": gpu_ram_mb,
        }
        for index in range(num_gpus)
    ]
    script = SCRIPT_TEMPLATE.format(
        python=sys.executable,
        gpus=json.dumps(gpus),
        driver=driver_version,
        cuda=str(cuda_version),
    )
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "nvidia-smi"
    path.write_text(script)
    path.chmod(0o755)
    return path
