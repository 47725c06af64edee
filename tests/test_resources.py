"""Translation of Snakemake resources and plugin settings into pool requirements."""

from __future__ import annotations

import dataclasses

import pytest
from snakemake_interface_common.exceptions import WorkflowError

from snakemake_executor_plugin_vastai.resources import (
    parse_geolocation,
    requirements_from_resources,
    runtime_minutes,
    validate_settings,
)
from snakemake_executor_plugin_vastai.settings import ExecutorSettings
from vastai_pool.requirements import Requirements

IMAGE = "vastai/pytorch:@vastai-automatic-tag"

# What every job gets from the default settings, written out by hand.
DEFAULT = Requirements(
    image=IMAGE,
    disk_gb=40.0,
    num_gpus=1,
    gpu_names=(),
    cpu_cores=1,
    mem_mb=None,
    max_price=None,
    geolocation=(),
    datacenter_only=True,
    min_reliability=0.98,
    extra_query="",
    order="dph_total",
)

TRANSLATIONS = [
    pytest.param({}, 1, {}, DEFAULT, id="defaults"),
    pytest.param(
        {"gpu": 2, "gpu_model": "RTX_4090", "mem_mb": 16000, "disk_mb": 50000},
        8,
        {},
        dataclasses.replace(
            DEFAULT,
            num_gpus=2,
            gpu_names=("RTX 4090",),
            cpu_cores=8,
            mem_mb=16000,
            disk_gb=50.0,
        ),
        id="gpu-model-memory-disk",
    ),
    pytest.param(
        {"nvidia_gpu": 4, "gpu_model": "H100_SXM, A100_SXM4"},
        1,
        {},
        dataclasses.replace(DEFAULT, num_gpus=4, gpu_names=("H100 SXM", "A100 SXM4")),
        id="nvidia-gpu-model-list",
    ),
    pytest.param(
        {"gpu": 2, "nvidia_gpu": 2},
        1,
        {},
        dataclasses.replace(DEFAULT, num_gpus=2),
        id="gpu-and-nvidia-gpu-agree",
    ),
    pytest.param(
        {"gpu": "3"},
        1,
        {},
        dataclasses.replace(DEFAULT, num_gpus=3),
        id="gpu-count-as-string",
    ),
    pytest.param({"disk_mb": 1000}, 1, {}, DEFAULT, id="small-disk-keeps-setting"),
    pytest.param(
        {"disk_mb": 40001},
        1,
        {},
        dataclasses.replace(DEFAULT, disk_gb=41.0),
        id="disk-rounds-up-to-whole-gb",
    ),
    pytest.param(
        {"disk_mb": 60000},
        1,
        {"disk": 100.0},
        dataclasses.replace(DEFAULT, disk_gb=100.0),
        id="disk-setting-is-minimum",
    ),
    pytest.param({"mem_mb": 0}, 1, {}, DEFAULT, id="zero-memory-means-no-bound"),
    pytest.param(
        {"mem_mb": 1500.2},
        1,
        {},
        dataclasses.replace(DEFAULT, mem_mb=1501),
        id="fractional-memory-rounds-up",
    ),
    pytest.param(
        {},
        1,
        {"gpu_name": "RTX_3090"},
        dataclasses.replace(DEFAULT, gpu_names=("RTX 3090",)),
        id="gpu-name-setting-as-default",
    ),
    pytest.param(
        {"gpu_model": "A100_PCIE"},
        1,
        {"gpu_name": "RTX_3090"},
        dataclasses.replace(DEFAULT, gpu_names=("A100 PCIE",)),
        id="gpu-model-overrides-setting",
    ),
    pytest.param(
        {},
        1,
        {"geolocation": "de, fr"},
        dataclasses.replace(DEFAULT, geolocation=("DE", "FR")),
        id="country-codes",
    ),
    pytest.param(
        {},
        1,
        {"geolocation": "na"},
        dataclasses.replace(DEFAULT, geolocation=("CA", "US")),
        id="region-shortcut",
    ),
    pytest.param(
        {},
        2,
        {
            "no_datacenter": True,
            "reliability": 0.0,
            "max_price": 0.5,
            "order": "dlperf_usd-",
            "image": "pytorch/pytorch:latest",
        },
        dataclasses.replace(
            DEFAULT,
            cpu_cores=2,
            datacenter_only=False,
            min_reliability=0.0,
            max_price=0.5,
            order="dlperf_usd-",
            image="pytorch/pytorch:latest",
        ),
        id="price-reliability-datacenter-order-image",
    ),
    pytest.param(
        {"vastai_query": "inet_down>=500"},
        1,
        {"search_query": "cuda_vers>=12.4"},
        dataclasses.replace(DEFAULT, extra_query="cuda_vers>=12.4 inet_down>=500"),
        id="search-query-then-vastai-query",
    ),
    pytest.param(
        {
            "_cores": 4,
            "_nodes": 1,
            "tmpdir": "/tmp",
            "mem": "5MB",
            "disk": "1GB",
            "mem_mib": 5,
            "runtime": 30,
        },
        1,
        {},
        DEFAULT,
        id="snakemake-internal-resources-ignored",
    ),
]


@pytest.mark.parametrize(("resources", "threads", "settings", "expected"), TRANSLATIONS)
def test_translation(
    resources: dict, threads: int, settings: dict, expected: Requirements
) -> None:
    actual = requirements_from_resources(
        resources, threads, "train", ExecutorSettings(**settings)
    )
    assert actual == expected


def test_offer_query_of_translation() -> None:
    requirements = requirements_from_resources(
        {"gpu": 2, "gpu_model": "RTX_4090", "mem_mb": 16000, "disk_mb": 50000},
        8,
        "train",
        ExecutorSettings(max_price=1.5),
    )
    assert requirements.offer_query() == (
        "num_gpus>=2 gpu_name=RTX_4090 cpu_cores_effective>=8 cpu_ram>=16 "
        "disk_space>=50 dph_total<=1.5 datacenter=true reliability>=0.98"
    )


def test_runtime_in_minutes() -> None:
    assert runtime_minutes({"runtime": 90}, "train") == 90.0
    assert runtime_minutes({}, "train") is None


@pytest.mark.parametrize("value", [0, -5, "soon"])
def test_runtime_invalid(value: object) -> None:
    with pytest.raises(WorkflowError) as caught:
        runtime_minutes({"runtime": value}, "train")
    message = str(caught.value)
    assert "rule train" in message
    assert f"runtime={value!r}" in message
    assert "positive number of minutes" in message


# (resources, the text naming the value, a phrase of the fix)
INVALID = [
    pytest.param({"gpu": "two"}, "gpu='two'", "positive integer", id="gpu-word"),
    pytest.param({"gpu": 1.5}, "gpu=1.5", "positive integer", id="gpu-fraction"),
    pytest.param({"gpu": 0}, "gpu=0", "only GPU machines", id="gpu-zero"),
    pytest.param({"gpu": -1}, "gpu=-1", "positive integer", id="gpu-negative"),
    pytest.param({"gpu": True}, "gpu=True", "positive integer", id="gpu-bool"),
    pytest.param(
        {"nvidia_gpu": "x"}, "nvidia_gpu='x'", "positive integer", id="nvidia-gpu"
    ),
    pytest.param(
        {"gpu": 1, "nvidia_gpu": 2},
        "gpu=1 and nvidia_gpu=2",
        "Set only one",
        id="gpu-counts-disagree",
    ),
    pytest.param(
        {"disk_mb": -1},
        "disk_mb=-1",
        "non-negative number of megabytes",
        id="disk-negative",
    ),
    pytest.param(
        {"disk_mb": "big"}, "disk_mb='big'", "e.g. disk_mb=50000", id="disk-word"
    ),
    pytest.param(
        {"mem_mb": -5},
        "mem_mb=-5",
        "non-negative number of megabytes",
        id="memory-negative",
    ),
    pytest.param(
        {"gpu_model": "RTX[4090]"},
        "gpu_model='RTX[4090]'",
        "underscores for spaces",
        id="gpu-model-brackets",
    ),
    pytest.param(
        {"gpu_model": 4090}, "gpu_model=4090", "Vast.ai naming", id="gpu-model-int"
    ),
    pytest.param(
        {"vastai_query": "gpu_name = RTX 4090"},
        "vastai_query='gpu_name = RTX 4090'",
        "underscores for spaces",
        id="query-unquoted-space",
    ),
    pytest.param(
        {"vastai_query": "cuda_vers>>12"},
        "vastai_query='cuda_vers>>12'",
        "field op value",
        id="query-bad-operator",
    ),
]


@pytest.mark.parametrize(("resources", "value_text", "fix"), INVALID)
def test_invalid_resource(resources: dict, value_text: str, fix: str) -> None:
    with pytest.raises(WorkflowError) as caught:
        requirements_from_resources(resources, 1, "train", ExecutorSettings())
    message = str(caught.value)
    assert "rule train" in message
    assert value_text in message
    assert fix in message


def test_invalid_threads() -> None:
    with pytest.raises(WorkflowError) as caught:
        requirements_from_resources({}, 0, "train", ExecutorSettings())
    assert "threads=0 of rule train" in str(caught.value)


def test_invalid_group_names_group() -> None:
    with pytest.raises(WorkflowError) as caught:
        requirements_from_resources(
            {"gpu": "many"}, 1, "a, b", ExecutorSettings(), group="prep"
        )
    assert "gpu='many' of group prep (rules a, b)" in str(caught.value)


def test_region_expands_to_sdk_countries() -> None:
    europe = parse_geolocation("EU")
    assert "DE" in europe
    assert "PL" in europe
    assert "US" not in europe
    assert parse_geolocation(None) == ()
    assert parse_geolocation(" ") == ()


@pytest.mark.parametrize("value", ["Europe", "DE,Germany", "D", "DE;FR"])
def test_geolocation_unknown(value: str) -> None:
    with pytest.raises(WorkflowError) as caught:
        parse_geolocation(value)
    message = str(caught.value)
    assert "--vastai-geolocation" in message
    assert repr(value) in message
    assert "EU, " in message
    assert "two-letter country codes" in message


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"geolocation": "Europe"}, "--vastai-geolocation 'Europe'"),
        ({"reliability": 1.5}, "--vastai-reliability 1.5"),
        ({"max_price": 0.0}, "--vastai-max-price 0.0"),
        ({"disk": -1.0}, "--vastai-disk -1.0"),
        ({"budget": -2.0}, "--vastai-budget -2.0"),
        ({"max_instances": 0}, "--vastai-max-instances 0"),
        ({"idle_timeout": -1.0}, "--vastai-idle-timeout -1.0"),
        ({"boot_timeout": 0}, "--vastai-boot-timeout 0"),
        ({"gpu_name": "RTX 4090]"}, "--vastai-gpu-name 'RTX 4090]'"),
        ({"search_query": "gpu_ram>>24"}, "--vastai-search-query"),
    ],
)
def test_invalid_setting(settings: dict, expected: str) -> None:
    with pytest.raises(WorkflowError) as caught:
        validate_settings(ExecutorSettings(**settings))
    assert expected in str(caught.value)


def test_default_settings_valid() -> None:
    validate_settings(ExecutorSettings())
