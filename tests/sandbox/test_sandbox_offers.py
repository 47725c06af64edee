"""Offer search through the official SDK, checked against the raw catalog."""

from __future__ import annotations

from typing import Any

import pytest
import requests
import vastai
from sandbox_helpers import IMAGE

from vastai_pool.sandbox import Sandbox

STORAGE_GB = 5.0  # the SDK's default allocated_storage


def dph_total(offer: dict[str, Any], storage_gb: float = STORAGE_GB) -> float:
    return offer["dph_base"] + offer["storage_cost"] * storage_gb / 720


def default_visible(offer: dict[str, Any]) -> bool:
    """The SDK's default filters: verified, not external, rentable."""
    return (
        offer["verification"] == "verified"
        and not offer["external"]
        and offer["rentable"]
    )


def expected_ids(sandbox: Sandbox, predicate: Any) -> set[int]:
    return {
        offer["id"]
        for offer in sandbox.catalog()
        if default_visible(offer) and predicate(offer)
    }


def returned_ids(offers: list[dict[str, Any]]) -> set[int]:
    return {offer["id"] for offer in offers}


CASES = [
    ("gpu_name=RTX_4090", lambda o: o["gpu_name"] == "RTX 4090"),
    (
        "gpu_name=H100_SXM num_gpus=8",
        lambda o: o["gpu_name"] == "H100 SXM" and o["num_gpus"] == 8,
    ),
    ("num_gpus>=4", lambda o: o["num_gpus"] >= 4),
    ("num_gpus in [1,2]", lambda o: o["num_gpus"] in (1, 2)),
    ("datacenter=true", lambda o: o["hosting_type"] == 1),
    ("datacenter=false", lambda o: o["hosting_type"] != 1),
    (
        "geolocation in [PL,DE,FR]",
        lambda o: o["geolocation"][-2:] in ("PL", "DE", "FR"),
    ),
    ("geolocation notin [US]", lambda o: not o["geolocation"].endswith("US")),
    ("reliability>0.99", lambda o: o["reliability"] > 0.99),
    ("dph_total<=0.5", lambda o: dph_total(o) <= 0.5),
    ("dph<0.3", lambda o: dph_total(o) < 0.3),
    (
        "cpu_ram>=64 disk_space>=400",
        lambda o: o["cpu_ram"] >= 64000 and o["disk_space"] >= 400,
    ),
    ("gpu_ram>=40", lambda o: o["gpu_ram"] >= 40000),
    (
        "gpu_name in [RTX_3090,RTX_4090] num_gpus=1 reliability>0.98",
        lambda o: (
            o["gpu_name"] in ("RTX 3090", "RTX 4090")
            and o["num_gpus"] == 1
            and o["reliability"] > 0.98
        ),
    ),
    ("gpu_name neq L40S", lambda o: o["gpu_name"] != "L40S"),
    ("driver_version>=550.0.0", lambda o: o["driver_vers"] >= 550000000),
]


@pytest.mark.parametrize(("query", "predicate"), CASES, ids=[c[0] for c in CASES])
def test_search_filters_match_catalog(
    sandbox: Sandbox, client: vastai.VastAI, query: str, predicate: Any
) -> None:
    offers = client.search_offers(query)

    expected = expected_ids(sandbox, predicate)
    assert expected, f"catalog has no offer for {query!r}; the case tests nothing"
    assert returned_ids(offers) == expected


def test_search_without_defaults_shows_unverified(
    sandbox: Sandbox, client: vastai.VastAI
) -> None:
    offers = client.search_offers("verified=false", no_default=True)

    expected = {o["id"] for o in sandbox.catalog() if o["verification"] != "verified"}
    assert expected
    assert returned_ids(offers) == expected


def test_search_orders_and_limits(client: vastai.VastAI) -> None:
    offers = client.search_offers("num_gpus=1", order="dph+", limit=5)

    prices = [offer["dph_total"] for offer in offers]
    assert len(offers) == 5
    assert prices == sorted(prices)
    cheapest = client.search_offers("num_gpus=1", order="dph+")
    assert offers[0]["id"] == cheapest[0]["id"]


def test_search_orders_descending(client: vastai.VastAI) -> None:
    offers = client.search_offers("gpu_name=A100_SXM4", order="reliability-")

    values = [offer["reliability"] for offer in offers]
    assert values == sorted(values, reverse=True)


def test_search_prices_allocated_storage(
    sandbox: Sandbox, client: vastai.VastAI
) -> None:
    offers = client.search_offers("gpu_name=L40S", storage=100.0)

    catalog = {offer["id"]: offer for offer in sandbox.catalog()}
    for offer in offers:
        raw = catalog[offer["id"]]
        assert offer["storage_total_cost"] == pytest.approx(
            raw["storage_cost"] * 100 / 720
        )
        assert offer["dph_total"] == pytest.approx(dph_total(raw, 100.0))


def test_search_offers_carry_sdk_fields(client: vastai.VastAI) -> None:
    offer = client.search_offers("num_gpus=2")[0]

    for field in (
        "hosting_type",
        "cpu_cores_effective",
        "cpu_ram",
        "disk_space",
        "gpu_ram",
        "verification",
        "rentable",
        "rented",
        "external",
        "geolocation",
        "reliability",
        "dph_total",
        "min_bid",
    ):
        assert field in offer, field
    assert offer["datacenter"] == (offer["hosting_type"] == 1)
    assert isinstance(offer["cpu_ram"], int)


def test_catalog_has_models_and_sizes(sandbox: Sandbox) -> None:
    catalog = sandbox.catalog()

    models = {offer["gpu_name"] for offer in catalog}
    assert {"RTX 3090", "RTX 4090", "L40S", "A100 SXM4", "H100 SXM"} <= models
    for model in models:
        sizes = {o["num_gpus"] for o in catalog if o["gpu_name"] == model}
        assert sizes == {1, 2, 4, 8}, model
    countries = {offer["geolocation"][-2:] for offer in catalog}
    assert {"PL", "DE", "US"} <= countries
    assert {offer["hosting_type"] for offer in catalog} == {0, 1}
    for model in ("RTX 3090", "RTX 4090"):
        singles = [
            o
            for o in catalog
            if o["gpu_name"] == model and o["num_gpus"] == 1 and default_visible(o)
        ]
        assert len(singles) >= 8, model


def test_search_new_path_matches_bundles(client: vastai.VastAI) -> None:
    old = client.search_offers("gpu_name=RTX_3090")
    new = client.search_offers_new({"gpu_name": {"eq": "RTX 3090"}})

    assert returned_ids(new) == returned_ids(old)


def test_search_by_get_needs_no_key(sandbox: Sandbox) -> None:
    query = '{"gpu_name": {"eq": "RTX_4090"}, "num_gpus": {"eq": "1"}}'
    reply = requests.get(f"{sandbox.url}/api/v0/bundles/", params={"q": query})

    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "application/json"
    offers = reply.json()["offers"]
    expected = {
        o["id"]
        for o in sandbox.catalog()
        if o["gpu_name"] == "RTX 4090" and o["num_gpus"] == 1
    }
    assert returned_ids(offers) == expected


def test_request_without_key_is_401(sandbox: Sandbox) -> None:
    reply = requests.post(f"{sandbox.url}/api/v0/bundles/", json={})

    assert reply.status_code == 401
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json() == {
        "success": False,
        "error": "auth_error",
        "msg": "Invalid user key",
    }


def test_sdk_with_wrong_key_gets_401(sandbox: Sandbox) -> None:
    wrong = vastai.VastAI(api_key="not-the-key", server_url=sandbox.url)

    with pytest.raises(requests.HTTPError) as raised:
        wrong.search_offers("num_gpus=1")
    assert raised.value.response.status_code == 401


@pytest.mark.parametrize(
    "path",
    ["/api/v0/users/current", "/api/v0/users/current/", "//api/v0/users/current"],
)
def test_paths_match_with_and_without_slash(sandbox: Sandbox, path: str) -> None:
    headers = {"Authorization": f"Bearer {sandbox.api_key}"}
    reply = requests.get(f"{sandbox.url}{path}", headers=headers)

    assert reply.status_code == 200
    assert isinstance(reply.json()["id"], int)


def test_api_key_query_parameter_authenticates(sandbox: Sandbox) -> None:
    reply = requests.get(
        f"{sandbox.url}/api/v0/users/current", params={"api_key": sandbox.api_key}
    )

    assert reply.status_code == 200


def test_invalid_json_body_is_400(sandbox: Sandbox) -> None:
    reply = requests.post(
        f"{sandbox.url}/api/v0/bundles/",
        data="{not json",
        headers={
            "Authorization": f"Bearer {sandbox.api_key}",
            "Content-Type": "application/json",
        },
    )

    assert reply.status_code == 400
    assert reply.json()["error"] == "invalid_request"


def test_rented_offer_leaves_market_until_destroyed(client: vastai.VastAI) -> None:
    offer = client.search_offers("gpu_name=RTX_4090 num_gpus=1", order="dph+")[0]
    created = client.create_instance(offer["id"], image=IMAGE, disk=10)
    instance_id = created["new_contract"]

    during = returned_ids(client.search_offers("gpu_name=RTX_4090 num_gpus=1"))
    assert offer["id"] not in during
    with pytest.raises(requests.HTTPError) as raised:
        client.create_instance(offer["id"], image=IMAGE, disk=10)
    assert raised.value.response.status_code == 404
    assert raised.value.response.json()["error"] == "no_such_ask"

    client.destroy_instance(instance_id)
    after = returned_ids(client.search_offers("gpu_name=RTX_4090 num_gpus=1"))
    assert offer["id"] in after


def test_create_unknown_offer_is_no_such_ask(client: vastai.VastAI) -> None:
    with pytest.raises(requests.HTTPError) as raised:
        client.create_instance(999, image=IMAGE, disk=10)

    assert raised.value.response.status_code == 404
    assert raised.value.response.json()["error"] == "no_such_ask"


def test_create_without_image_is_invalid(client: vastai.VastAI) -> None:
    offer = client.search_offers("num_gpus=1")[0]

    with pytest.raises(requests.HTTPError) as raised:
        client.create_instance(offer["id"], disk=10)
    assert raised.value.response.status_code == 400
    assert raised.value.response.json()["error"] == "invalid_args"


def test_eight_rtx_rentals_at_once(client: vastai.VastAI) -> None:
    offers = client.search_offers("gpu_name=RTX_4090 num_gpus=1", order="dph+")
    assert len(offers) >= 8

    ids = [
        client.create_instance(o["id"], image=IMAGE, disk=10)["new_contract"]
        for o in offers[:8]
    ]
    assert len(set(ids)) == 8
    left = returned_ids(client.search_offers("gpu_name=RTX_4090 num_gpus=1"))
    assert left == returned_ids(offers[8:])
