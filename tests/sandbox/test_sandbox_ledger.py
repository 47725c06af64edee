"""The sandbox ledger: rentals, destroys, alive ids and the running bill."""

from __future__ import annotations

from pathlib import Path

import vastai
from sandbox_helpers import IMAGE, cheapest_offer, wait_for, wait_running

from vastai_pool.sandbox import Sandbox


def test_billing_grows_while_instance_exists(
    sandbox: Sandbox, client: vastai.VastAI
) -> None:
    instance_id = client.create_instance(
        cheapest_offer(client)["id"], image=IMAGE, disk=10
    )["new_contract"]
    wait_running(client, instance_id)

    first = sandbox.ledger()["billed_usd"]
    assert first > 0
    wait_for(lambda: sandbox.ledger()["billed_usd"] > first, what="the bill to grow")


def test_destroyed_instance_stops_billing(
    sandbox: Sandbox, client: vastai.VastAI
) -> None:
    instance_id = client.create_instance(
        cheapest_offer(client)["id"], image=IMAGE, disk=10
    )["new_contract"]
    wait_running(client, instance_id)
    client.destroy_instance(instance_id)

    settled = sandbox.ledger()
    assert settled["rented"] == 1
    assert settled["destroyed"] == 1
    assert settled["alive"] == []
    assert settled["billed_usd"] > 0
    assert sandbox.ledger()["billed_usd"] == settled["billed_usd"]


def test_ledger_endpoint_matches_python_api(sandbox: Sandbox, client: vastai.VastAI):
    import requests

    instance_id = client.create_instance(
        cheapest_offer(client)["id"], image=IMAGE, disk=10
    )["new_contract"]

    body = requests.get(f"{sandbox.url}/sandbox/ledger").json()
    assert body["rented"] == 1
    assert body["alive"] == [instance_id]
    assert set(body) == {"rented", "destroyed", "alive", "billed_usd"}


def test_stop_destroys_everything(tmp_path: Path) -> None:
    sandbox = Sandbox(boot_seconds=0.0, state_dir=tmp_path / "sb").start()
    client = vastai.VastAI(api_key=sandbox.api_key, server_url=sandbox.url)
    offers = client.search_offers("num_gpus=1", order="dph+")[:3]
    for offer in offers:
        client.create_instance(offer["id"], image=IMAGE, disk=10)

    sandbox.stop()
    sandbox.stop()

    ledger = sandbox.ledger()
    assert ledger["alive"] == []
    assert ledger["rented"] == 3
    assert ledger["destroyed"] == 3
