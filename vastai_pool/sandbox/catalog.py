"""The sandbox's fixed catalog of GPU offers.

The catalog is deterministic: the same code yields the same offers, ids and
prices on every run, so tests can compute expected search results from it.
Offers here carry no storage price yet: ``offer_query.price_offer`` adds
the storage share for the disk that a search or a rental requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

FIRST_OFFER_ID = 30001
CATALOG_SEED = 20240601
# An offer's rental window: 30 days from a fixed start, in epoch seconds.
CATALOG_START_DATE = 1767225600.0
CATALOG_DURATION_SECONDS = 30 * 86400.0


@dataclass(frozen=True)
class GpuModel:
    """One GPU model as the API names it, with per-GPU figures."""

    api_name: str
    smi_name: str
    gpu_ram_mb: int
    compute_cap: int
    tflops: float
    dlperf: float
    price_range: tuple[float, float]
    # Number of offers per GPU count (1, 2, 4 and 8 GPUs).
    offers_per_count: dict[int, int]


GPU_MODELS: tuple[GpuModel, ...] = (
    GpuModel(
        "RTX 3090",
        "NVIDIA GeForce RTX 3090",
        24576,
        860,
        35.6,
        30.0,
        (0.13, 0.30),
        {1: 10, 2: 4, 4: 3, 8: 2},
    ),
    GpuModel(
        "RTX 4090",
        "NVIDIA GeForce RTX 4090",
        24564,
        890,
        82.6,
        80.0,
        (0.28, 0.62),
        {1: 12, 2: 4, 4: 3, 8: 2},
    ),
    GpuModel(
        "L40S",
        "NVIDIA L40S",
        46068,
        890,
        91.6,
        85.0,
        (0.55, 1.05),
        {1: 5, 2: 3, 4: 2, 8: 2},
    ),
    GpuModel(
        "A100 SXM4",
        "NVIDIA A100-SXM4-80GB",
        81920,
        800,
        19.5,
        110.0,
        (0.75, 1.45),
        {1: 4, 2: 3, 4: 2, 8: 3},
    ),
    GpuModel(
        "H100 SXM",
        "NVIDIA H100 80GB HBM3",
        81559,
        900,
        66.9,
        220.0,
        (1.70, 2.90),
        {1: 4, 2: 3, 4: 2, 8: 3},
    ),
)

SMI_NAMES = {model.api_name: model.smi_name for model in GPU_MODELS}

# Regions in Vast.ai's "<region>, <country code>" spelling.
LOCATIONS: tuple[str, ...] = (
    "Mazovia, PL",
    "Hesse, DE",
    "Ile-de-France, FR",
    "North Holland, NL",
    "Stockholm County, SE",
    "Uusimaa, FI",
    "Madrid, ES",
    "Prague, CZ",
    "Texas, US",
    "California, US",
    "Virginia, US",
    "Oregon, US",
    "Quebec, CA",
    "Tokyo, JP",
    "Seoul, KR",
    "Singapore, SG",
    "New South Wales, AU",
    "Sao Paulo, BR",
    "Maharashtra, IN",
    "Taiwan, TW",
)

CPU_NAMES = (
    "AMD EPYC 7B13",
    "AMD EPYC 9554",
    "Intel Xeon Gold 6338",
    "AMD Ryzen 9 7950X",
)


def pack_driver_version(version: str) -> int:
    """Pack ``"535.86.05"`` as the SDK does, three digits per part: 535086005."""
    major, minor, patch = version.split(".")
    return int(f"{major.zfill(3)}{minor.zfill(3)}{patch.zfill(3)}")


def build_catalog() -> list[dict[str, Any]]:
    """Build every offer of the sandbox market, in id order."""
    rng = random.Random(CATALOG_SEED)
    offers: list[dict[str, Any]] = []
    for model in GPU_MODELS:
        for num_gpus, count in model.offers_per_count.items():
            for index in range(count):
                offer_id = FIRST_OFFER_ID + len(offers)
                offers.append(_build_offer(rng, model, num_gpus, index, offer_id))
    return offers


def _build_offer(
    rng: random.Random, model: GpuModel, num_gpus: int, index: int, offer_id: int
) -> dict[str, Any]:
    datacenter = index % 2 == 0
    low, high = model.price_range
    per_gpu = round(rng.uniform(low, high), 3)
    dph_base = round(per_gpu * num_gpus, 4)
    reliability = round(
        rng.uniform(0.995, 0.9995) if datacenter else rng.uniform(0.90, 0.995), 4
    )

    # Every sixth offer is unverified and every offer with index 3 of a
    # multi-GPU group is external, so the SDK's default filters have work.
    verification = "unverified" if index % 6 == 5 else "verified"
    external = num_gpus > 1 and index == 3
    location = LOCATIONS[(offer_id * 7) % len(LOCATIONS)]

    cpu_cores = rng.choice((32, 64, 128)) if datacenter else rng.choice((16, 24, 32))
    # Each offer is a share of an 8-GPU machine.
    # NOTE: every offer is its own machine, so renting one never shrinks
    # another, unlike Vast.ai bundles that split one machine's GPUs.
    share = num_gpus / 8
    cpu_cores_effective = float(max(4, int(cpu_cores * share)))
    machine_ram_mb = rng.choice((128, 256, 512, 1024)) * 1000
    cpu_ram = int(max(16000, machine_ram_mb * share))
    disk_space = float(rng.choice((100, 200, 450, 900, 1800)) * max(1, num_gpus // 2))
    storage_cost = round(rng.uniform(0.08, 0.25), 3)

    driver_version = rng.choice(("535.183.01", "550.127.05", "570.124.04"))
    cuda = {"535.183.01": 12.2, "550.127.05": 12.4, "570.124.04": 12.8}[driver_version]
    inet_down = float(rng.choice((500, 900, 2500, 8000)))
    dlperf = round(model.dlperf * num_gpus * rng.uniform(0.9, 1.05), 2)

    return {
        "id": offer_id,
        "ask_contract_id": offer_id,
        "bundle_id": 900000 + offer_id,
        "machine_id": 5000 + offer_id - FIRST_OFFER_ID,
        "host_id": 100 + (offer_id - FIRST_OFFER_ID) // 3,
        "num_gpus": num_gpus,
        "gpu_name": model.api_name,
        "gpu_ram": model.gpu_ram_mb,
        "gpu_total_ram": model.gpu_ram_mb * num_gpus,
        "gpu_frac": share,
        "gpu_arch": "nvidia",
        "gpu_display_active": False,
        "gpu_lanes": 16,
        "gpu_mem_bw": 900.0,
        "gpu_max_power": 450.0,
        "gpu_max_temp": 85.0,
        "bw_nvlink": 0.0,
        "compute_cap": model.compute_cap,
        "cuda_max_good": cuda,
        "driver_version": driver_version,
        "driver_vers": pack_driver_version(driver_version),
        "cpu_name": rng.choice(CPU_NAMES),
        "cpu_arch": "amd64",
        "cpu_cores": cpu_cores,
        "cpu_cores_effective": cpu_cores_effective,
        "cpu_ghz": round(rng.uniform(2.4, 4.5), 1),
        "cpu_ram": cpu_ram,
        "has_avx": 1,
        "disk_space": disk_space,
        "disk_bw": float(rng.choice((1500, 3100, 6000))),
        "disk_name": "nvme",
        "inet_up": round(inet_down * 0.8, 1),
        "inet_down": inet_down,
        "inet_up_cost": 0.002,
        "inet_down_cost": 0.002,
        "direct_port_count": rng.choice((8, 40, 100)),
        "pci_gen": 4.0,
        "pcie_bw": 24.5,
        "mobo_name": "sandbox board",
        "os_version": "22.04",
        "dph_base": dph_base,
        "storage_cost": storage_cost,
        "min_bid": round(dph_base * 0.55, 4),
        "is_bid": False,
        "dlperf": dlperf,
        "total_flops": round(model.tflops * num_gpus, 1),
        "score": 0.0,
        "reliability": reliability,
        "reliability2": reliability,
        "reliability_mult": 1.0,
        "verification": verification,
        "vericode": 1 if verification == "verified" else 0,
        "rentable": True,
        "rented": False,
        "external": external,
        "hosting_type": 1 if datacenter else 0,
        "geolocation": location,
        "geolocode": (offer_id * 31) % 1000,
        "public_ipaddr": "127.0.0.1",
        "static_ip": datacenter,
        "hostname": None,
        "duration": CATALOG_DURATION_SECONDS,
        "start_date": CATALOG_START_DATE,
        "end_date": CATALOG_START_DATE + CATALOG_DURATION_SECONDS,
        "vms_enabled": False,
        "cluster_id": None,
        "resource_type": "gpu",
        "credit_discount_max": 0.4,
    }
