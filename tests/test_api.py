"""The Vast.ai adapter, against the sandbox marketplace through the real SDK."""

from __future__ import annotations

import time

import pytest

from vastai_pool.api import (
    RemoteInstance,
    VastApi,
    VastStatus,
    hardware_from_row,
    map_status,
    parse_offer_query,
    remote_instance_from_row,
)
from vastai_pool.errors import ApiError, ConfigError, OfferUnavailable


@pytest.fixture
def api(sandbox) -> VastApi:
    return VastApi(sandbox.url, sandbox.api_key)


def wait_running(api: VastApi, instance_id: int) -> RemoteInstance:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        remote = api.show_instance(instance_id)
        if remote is not None and remote.status is VastStatus.RUNNING:
            return remote
        time.sleep(0.1)
    raise AssertionError(f"instance {instance_id} never reached running")


def test_parse_offer_query_uses_sdk_units() -> None:
    parsed = parse_offer_query("gpu_name=RTX_4090 cpu_ram>=32 dph<0.5")
    assert parsed["gpu_name"] == {"eq": "RTX 4090"}
    assert parsed["cpu_ram"] == {"gte": 32000.0}
    assert parsed["dph_total"] == {"lt": "0.5"}


def test_parse_offer_query_defaults_can_be_removed() -> None:
    parsed = parse_offer_query("verified=any num_gpus=1", with_defaults=True)
    assert "verified" not in parsed
    assert parsed["rented"] == {"eq": False}


def test_unparsable_query_raises_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_offer_query("gpu_name = RTX 4090")
    assert "'gpu_name = RTX 4090'" in str(caught.value)
    assert "Did you forget to quote" in str(caught.value)


def test_search_with_unparsable_query_raises_config_error(api: VastApi) -> None:
    with pytest.raises(ConfigError):
        api.search_offers("num_gpus in", order="dph_total", disk_gb=10)


def test_status_table_maps_null_to_provisioning() -> None:
    assert map_status(None) is VastStatus.PROVISIONING
    assert map_status("running") is VastStatus.RUNNING
    assert map_status("offline") is VastStatus.OFFLINE
    assert map_status("something new") is VastStatus.PROVISIONING


def test_hardware_from_row_reads_units() -> None:
    hardware = hardware_from_row(
        {
            "num_gpus": 2,
            "gpu_name": "RTX 4090",
            "cpu_cores_effective": 16.0,
            "cpu_ram": 64250,
            "disk_space": 40.0,
            "dph_total": 0.7,
            "reliability2": 0.99,
            "hosting_type": 1,
            "geolocation": "Mazovia, PL",
        }
    )
    assert hardware.cpu_ram_mb == 64250
    assert hardware.disk_gb == 40.0
    assert hardware.reliability == 0.99
    assert hardware.datacenter is True
    assert hardware.country == "PL"


def test_endpoint_prefers_direct_port() -> None:
    row = {
        "id": 7,
        "actual_status": "running",
        "ssh_host": "ssh4.vast.ai",
        "ssh_port": 20007,
        "public_ipaddr": "203.0.113.9",
        "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41022"}]},
    }
    remote = remote_instance_from_row(row)
    assert (remote.ssh_host, remote.ssh_port) == ("203.0.113.9", 41022)
    proxied = remote_instance_from_row({**row, "ports": None})
    assert (proxied.ssh_host, proxied.ssh_port) == ("ssh4.vast.ai", 20007)


def test_search_returns_matching_offers(api: VastApi) -> None:
    offers = api.search_offers(
        "num_gpus=1 gpu_name=RTX_4090", order="dph_total", disk_gb=10
    )
    assert offers
    assert {o.hardware.gpu_name for o in offers} == {"RTX 4090"}
    assert {o.hardware.num_gpus for o in offers} == {1}
    prices = [o.hardware.dph_total for o in offers]
    assert prices == sorted(prices)


def test_create_show_list_destroy(api: VastApi, sandbox) -> None:
    offer = api.search_offers("num_gpus=1", order="dph_total", disk_gb=10)[0]
    instance_id = api.create_instance(
        offer.id, image="python:3.11", disk_gb=10, label="vastai-pool-test-1"
    )
    remote = wait_running(api, instance_id)
    assert remote.label == "vastai-pool-test-1"
    assert remote.ssh_host == "127.0.0.1"
    assert remote.ssh_port
    assert remote.hardware is not None
    assert remote.hardware.gpu_name == offer.hardware.gpu_name
    assert instance_id in [i.id for i in api.list_instances()]

    api.destroy_instance(instance_id)
    assert api.show_instance(instance_id) is None
    assert instance_id not in [i.id for i in api.list_instances()]
    # A second destroy finds no such instance, which counts as destroyed.
    api.destroy_instance(instance_id)
    assert sandbox.ledger()["alive"] == []


def test_taken_offer_raises_offer_unavailable(api: VastApi) -> None:
    offer = api.search_offers("num_gpus=1", order="dph_total", disk_gb=10)[0]
    instance_id = api.create_instance(
        offer.id, image="python:3.11", disk_gb=10, label="vastai-pool-test-2"
    )
    try:
        with pytest.raises(OfferUnavailable) as caught:
            api.create_instance(
                offer.id, image="python:3.11", disk_gb=10, label="vastai-pool-test-3"
            )
        assert caught.value.error_code == "no_such_ask"
        assert caught.value.instance_id is None
    finally:
        api.destroy_instance(instance_id)


def test_wrong_key_raises_api_error_without_key(sandbox) -> None:
    key = "not-the-sandbox-key-0123456789"
    api = VastApi(sandbox.url, key)
    with pytest.raises(ApiError) as caught:
        api.list_instances()
    assert caught.value.status in (401, 403)
    assert key not in str(caught.value)


def test_unreachable_api_raises_api_error() -> None:
    api = VastApi("http://127.0.0.1:9", "key", retry=1)
    with pytest.raises(ApiError) as caught:
        api.search_offers("num_gpus=1", order="dph_total", disk_gb=10)
    assert caught.value.status is None
    assert "could not be reached" in str(caught.value)


def test_create_failure_with_contract_carries_id(api: VastApi, sandbox) -> None:
    from vastai_pool.sandbox import FaultHooks, Reply

    class StoppedOnCreate(FaultHooks):
        def create_reply(self, offer_id: int) -> Reply | None:
            body = {
                "success": False,
                "error": "resources_unavailable",
                "msg": "instance created but stopped",
                "new_contract": 4242,
            }
            return Reply(200, body)

    sandbox.faults = StoppedOnCreate()
    offer = api.search_offers("num_gpus=1", order="dph_total", disk_gb=10)[0]
    with pytest.raises(ApiError) as caught:
        api.create_instance(offer.id, image="python:3.11", disk_gb=10, label="x")
    assert caught.value.instance_id == 4242
    assert caught.value.error_code == "resources_unavailable"
    assert not isinstance(caught.value, OfferUnavailable)


def test_destroy_retries_server_errors(api: VastApi, sandbox, monkeypatch) -> None:
    from vastai_pool import api as api_module
    from vastai_pool.sandbox import FaultHooks, Reply

    offer = api.search_offers("num_gpus=1", order="dph_total", disk_gb=10)[0]
    instance_id = api.create_instance(
        offer.id, image="python:3.11", disk_gb=10, label="vastai-pool-test-4"
    )
    failures: list[str] = []

    class DestroyFailsTwice(FaultHooks):
        def http_reply(self, method: str, path: str) -> Reply | None:
            if method == "DELETE" and len(failures) < 2:
                failures.append(path)
                return Reply(500, {"success": False, "error": "server_error"})
            return None

    monkeypatch.setattr(api_module, "_DESTROY_BACKOFF", 0.01)
    sandbox.faults = DestroyFailsTwice()
    api.destroy_instance(instance_id)
    assert len(failures) == 2
    assert sandbox.ledger()["alive"] == []
