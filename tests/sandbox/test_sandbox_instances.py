"""Instance lifecycle through the official SDK: create, show, list, change, destroy."""

from __future__ import annotations

import pytest
import requests
import vastai
from sandbox_helpers import IMAGE, KeyPair, cheapest_offer, wait_for, wait_running

from vastai_pool.sandbox import FaultHooks, Reply, Sandbox


def test_create_show_list_destroy(client: vastai.VastAI) -> None:
    offer = cheapest_offer(client, "gpu_name=RTX_3090 num_gpus=1")

    created = client.create_instance(
        offer["id"], image=IMAGE, disk=20, label="pool-1", env="-e FOO=bar"
    )
    assert created["success"] is True
    instance_id = created["new_contract"]
    row = wait_running(client, instance_id)
    assert row["id"] == instance_id
    assert row["label"] == "pool-1"
    assert row["gpu_name"] == "RTX 3090"
    assert row["num_gpus"] == 1
    assert row["extra_env"] == {"FOO": "bar"}
    assert row["ssh_host"] == "127.0.0.1"
    assert row["public_ipaddr"] == "127.0.0.1"
    assert row["ports"]["22/tcp"][0]["HostPort"] == str(row["ssh_port"])
    assert row["disk_space"] == 20
    assert row["dph_total"] == pytest.approx(
        offer["dph_base"] + offer["storage_cost"] * 20 / 720
    )
    assert [r["id"] for r in client.show_instances()] == [instance_id]

    assert client.destroy_instance(instance_id)["success"] is True
    assert client.show_instance(instance_id) is None
    assert client.show_instances() == []


def test_boot_walks_statuses_to_running(tmp_path, key_pair: KeyPair) -> None:
    seen: list[str | None] = []
    with Sandbox(boot_seconds=1.5, state_dir=tmp_path / "sb") as sandbox:
        client = vastai.VastAI(api_key=sandbox.api_key, server_url=sandbox.url)
        instance_id = client.create_instance(
            cheapest_offer(client)["id"], image=IMAGE, disk=10
        )["new_contract"]
        first = client.show_instance(instance_id)
        assert first["ports"] in ({}, None)
        assert first["ssh_host"] is None

        def probe() -> bool:
            row = client.show_instance(instance_id)
            if not seen or seen[-1] != row["actual_status"]:
                seen.append(row["actual_status"])
            return row["actual_status"] == "running"

        wait_for(probe, what="the instance to run")
    assert seen[-1] == "running"
    assert "loading" in seen
    order = [None, "created", "loading", "running"]
    positions = [order.index(status) for status in seen]
    assert positions == sorted(positions)


def test_show_unknown_instance_is_none(sandbox: Sandbox, client: vastai.VastAI) -> None:
    assert client.show_instance(123) is None
    reply = requests.get(
        f"{sandbox.url}/api/v0/instances/123/",
        headers={"Authorization": f"Bearer {sandbox.api_key}"},
    )
    assert reply.json() == {"instances": None}


def test_show_non_integer_id_is_400(sandbox: Sandbox) -> None:
    reply = requests.get(
        f"{sandbox.url}/api/v0/instances/abc/",
        headers={"Authorization": f"Bearer {sandbox.api_key}"},
    )

    assert reply.status_code == 400
    assert reply.json()["error"] == "invalid_args"


def test_destroy_unknown_instance_is_404(client: vastai.VastAI) -> None:
    with pytest.raises(requests.HTTPError) as raised:
        client.destroy_instance(4711)

    assert raised.value.response.status_code == 404
    assert raised.value.response.json()["error"] == "no_such_instance"


def test_v1_list_pages_over_25_instances(
    sandbox: Sandbox, client: vastai.VastAI
) -> None:
    offers = client.search_offers("", order="dph+")[:27]
    assert len(offers) == 27
    ids = []
    for index, offer in enumerate(offers):
        label = "even" if index % 2 == 0 else None
        created = client.create_instance(offer["id"], image=IMAGE, disk=10, label=label)
        ids.append(created["new_contract"])

    rows = client.show_instances()
    assert [row["id"] for row in rows] == sorted(ids)

    params = {
        "select_filters": {},
        "order_by": [{"col": "id", "dir": "asc"}],
        "limit": 25,
    }
    first = client.show_instances_v1(params)
    assert first["instances_found"] == 25
    assert first["total_instances"] == 27
    assert first["label_counts"] == {"even": 14, "": 13}
    assert first["next_token"]
    second = client.show_instances_v1({**params, "after_token": first["next_token"]})
    assert second["instances_found"] == 2
    assert second["next_token"] is None
    paged = [row["id"] for row in first["instances"] + second["instances"]]
    assert paged == sorted(ids)


def test_v1_list_filters_and_orders(client: vastai.VastAI) -> None:
    offers = client.search_offers("num_gpus=1", order="dph+")[:3]
    ids = [
        client.create_instance(o["id"], image=IMAGE, disk=10, label=f"l{i}")[
            "new_contract"
        ]
        for i, o in enumerate(offers)
    ]

    page = client.show_instances_v1(
        {
            "select_filters": {"label": {"in": ["l0", "l2"]}},
            "order_by": [{"col": "id", "dir": "desc"}],
            "limit": 25,
        }
    )
    assert [row["id"] for row in page["instances"]] == [ids[2], ids[0]]


def test_v1_list_rejects_bad_token(client: vastai.VastAI) -> None:
    with pytest.raises(requests.HTTPError) as raised:
        client.show_instances_v1({"limit": 25, "after_token": "garbage!"})

    assert raised.value.response.status_code == 400
    assert raised.value.response.json()["error"] == "invalid_token"


def test_v0_list_returns_instances(sandbox: Sandbox, client: vastai.VastAI) -> None:
    instance_id = client.create_instance(
        cheapest_offer(client)["id"], image=IMAGE, disk=10
    )["new_contract"]

    reply = requests.get(
        f"{sandbox.url}/api/v0/instances",
        params={"owner": "me", "api_key": sandbox.api_key},
    )
    body = reply.json()
    assert body["instances_found"] == 1
    assert body["instances"][0]["id"] == instance_id


def test_label_stop_start_and_reboot(client: vastai.VastAI) -> None:
    instance_id = client.create_instance(
        cheapest_offer(client)["id"], image=IMAGE, disk=10
    )["new_contract"]
    wait_running(client, instance_id)

    assert client.label_instance(instance_id, "renamed")["success"] is True
    assert client.show_instance(instance_id)["label"] == "renamed"

    assert client.stop_instance(instance_id)["success"] is True
    stopped = client.show_instance(instance_id)
    assert stopped["actual_status"] == "stopped"
    assert stopped["intended_status"] == "stopped"
    assert stopped["ssh_port"] is None
    reboot_stopped = client.reboot_instance(instance_id)
    assert reboot_stopped["success"] is False

    assert client.start_instance(instance_id)["success"] is True
    wait_running(client, instance_id)
    assert client.reboot_instance(instance_id)["success"] is True
    assert client.show_instance(instance_id)["actual_status"] in (
        "rebooting",
        "running",
    )
    wait_running(client, instance_id)


def test_logs_come_through_result_url(client: vastai.VastAI) -> None:
    instance_id = client.create_instance(
        cheapest_offer(client)["id"],
        image=IMAGE,
        disk=10,
        onstart_cmd="echo onstart-ran-here",
    )["new_contract"]
    wait_running(client, instance_id)

    def onstart_output() -> str | None:
        text = client.logs(instance_id)
        return text if "onstart-ran-here" in text else None

    text = wait_for(onstart_output, what="the onstart output in the logs")
    assert "container started" in text


def test_log_result_is_404_until_ready(sandbox: Sandbox, client: vastai.VastAI) -> None:
    instance_id = client.create_instance(
        cheapest_offer(client)["id"], image=IMAGE, disk=10
    )["new_contract"]
    reply = requests.put(
        f"{sandbox.url}/api/v0/instances/request_logs/{instance_id}/",
        json={"tail": "10"},
        headers={"Authorization": f"Bearer {sandbox.api_key}"},
    )
    url = reply.json()["result_url"]

    assert url.startswith(sandbox.url)
    assert requests.get(url).status_code == 404

    def fetch() -> requests.Response | None:
        result = requests.get(url)
        return result if result.status_code == 200 else None

    ready = wait_for(fetch, what="the log result")
    assert ready.headers["Content-Type"].startswith("text/plain")
    assert "created from offer" in ready.text


def test_user_and_account_keys(client: vastai.VastAI, key_pair: KeyPair) -> None:
    assert isinstance(client.show_user()["id"], int)

    client.create_ssh_key(key_pair.public)
    keys = client.show_ssh_keys()
    assert [entry["public_key"] for entry in keys] == [key_pair.public]


def test_account_key_reaches_new_instance(
    sandbox: Sandbox, client: vastai.VastAI, key_pair: KeyPair
) -> None:
    client.create_ssh_key(key_pair.public)
    instance_id = client.create_instance(
        cheapest_offer(client)["id"], image=IMAGE, disk=10
    )["new_contract"]

    authorized = sandbox.instance_dir(instance_id) / ".ssh" / "authorized_keys"
    assert key_pair.public in authorized.read_text()


def test_attach_key_twice_reports_duplicate(
    client: vastai.VastAI, key_pair: KeyPair
) -> None:
    instance_id = client.create_instance(
        cheapest_offer(client)["id"], image=IMAGE, disk=10
    )["new_contract"]

    assert client.attach_ssh(instance_id, key_pair.public)["success"] is True
    assert client.attach_ssh(instance_id, key_pair.public)["success"] is False


def test_attach_invalid_key_is_400(client: vastai.VastAI) -> None:
    instance_id = client.create_instance(
        cheapest_offer(client)["id"], image=IMAGE, disk=10
    )["new_contract"]

    with pytest.raises(requests.HTTPError) as raised:
        client.attach_ssh(instance_id, "not a key")
    assert raised.value.response.status_code == 400


def test_args_runtype_runs_entrypoint_then_exits(client: vastai.VastAI) -> None:
    instance_id = client.create_instance(
        cheapest_offer(client)["id"],
        image=IMAGE,
        disk=10,
        onstart_cmd="/bin/sh",
        args=["-c", "echo entrypoint-ran; exit 3"],
    )["new_contract"]

    def exited() -> dict | None:
        row = client.show_instance(instance_id)
        return row if row["actual_status"] == "exited" else None

    row = wait_for(exited, what="the args entrypoint to exit")
    assert row["image_runtype"] == "args"
    assert row["ssh_host"] is None
    assert "code 3" in row["status_msg"]
    assert "entrypoint-ran" in client.logs(instance_id)


class BusyThenTaken(FaultHooks):
    """Replies 429 to the first two searches and reports every offer taken."""

    def __init__(self) -> None:
        self.searches = 0

    def http_reply(self, method: str, path: str) -> Reply | None:
        if path == "/api/v0/bundles" and self.searches < 2:
            self.searches += 1
            return Reply(429, "API requests too frequent", {"Retry-After": "0"})
        return None

    def create_reply(self, offer_id: int) -> Reply | None:
        return Reply(404, {"success": False, "error": "no_such_ask", "msg": "taken"})


def test_fault_hooks_change_replies(sandbox: Sandbox, client: vastai.VastAI) -> None:
    hooks = BusyThenTaken()
    sandbox.faults = hooks

    offers = client.search_offers("num_gpus=1")
    assert offers
    assert hooks.searches == 2
    with pytest.raises(requests.HTTPError) as raised:
        client.create_instance(offers[0]["id"], image=IMAGE, disk=10)
    assert raised.value.response.status_code == 404
    assert sandbox.ledger()["rented"] == 0


def test_bulk_create_stop_destroy(client: vastai.VastAI) -> None:
    offers = client.search_offers("num_gpus=1", order="dph+")[:3]
    taken = offers[0]["id"]
    client.create_instance(taken, image=IMAGE, disk=10)

    reply = client.create_instances([o["id"] for o in offers], image=IMAGE, disk=10)
    assert reply["failed"] == [taken]
    created = reply["created"]
    assert len(created) == 2

    assert client.stop_instances(created)["success"] is True
    for instance_id in created:
        assert client.show_instance(instance_id)["actual_status"] == "stopped"
    assert client.destroy_instances(created)["success"] is True
    assert [row["id"] for row in client.show_instances()] != created
    for instance_id in created:
        assert client.show_instance(instance_id) is None
