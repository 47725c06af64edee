"""Scripted faults: each kind fires as scripted, is counted, and can be targeted.

The tests drive a real ``Sandbox`` with the official ``vastai`` SDK (one
attempt per call, so each injected reply is seen) and paramiko.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
import requests
import vastai
from sandbox_helpers import IMAGE, KeyPair, connect, run, wait_for, wait_running

from vastai_pool.sandbox import Sandbox
from vastai_pool.sandbox.fault_script import FaultScriptError, ScriptedFaults

VASTAI_POOL = Path(sys.executable).parent / "vastai-pool"


@pytest.fixture
def make_sandbox(tmp_path: Path) -> Iterator[Any]:
    started: list[Sandbox] = []

    def make(script: Any) -> Sandbox:
        state = tmp_path / f"sandbox-{len(started)}"
        sandbox = Sandbox(boot_seconds=0.3, state_dir=state, faults=script)
        started.append(sandbox.start())
        return sandbox

    yield make
    for sandbox in started:
        sandbox.stop()


def sdk(sandbox: Sandbox) -> vastai.VastAI:
    return vastai.VastAI(api_key=sandbox.api_key, server_url=sandbox.url, retry=1)


def injected(sandbox: Sandbox) -> dict[str, int]:
    hooks = sandbox.faults
    assert isinstance(hooks, ScriptedFaults)
    return hooks.injected


def offers(client: vastai.VastAI, query: str = "num_gpus=1") -> list[dict[str, Any]]:
    found = client.search_offers(query, order="dph+")
    assert found, f"no offer for {query!r}"
    return found


def create(client: vastai.VastAI, offer_id: int) -> dict[str, Any]:
    return client.create_instance(id=offer_id, image=IMAGE, disk=10)


def http_status(call: Any) -> requests.Response:
    with pytest.raises(requests.HTTPError) as caught:
        call()
    assert caught.value.response is not None
    return caught.value.response


def rented(client: vastai.VastAI, key: KeyPair, sandbox: Sandbox) -> int:
    client.create_ssh_key(ssh_key=key.public)
    reply = create(client, offers(client)[0]["id"])
    assert reply["success"], reply
    return int(reply["new_contract"])


def test_offer_taken_answers_no_such_ask_once(make_sandbox: Any) -> None:
    sandbox = make_sandbox({"seed": 1, "rules": [{"kind": "offer_taken", "count": 1}]})
    client = sdk(sandbox)
    offer_id = offers(client)[0]["id"]
    response = http_status(lambda: create(client, offer_id))
    assert response.status_code == 404
    assert response.json()["error"] == "no_such_ask"
    assert create(client, offer_id)["success"]
    assert injected(sandbox) == {"offer_taken": 1}


def test_create_fails_only_on_the_targeted_gpu(make_sandbox: Any) -> None:
    client_offers = offers(sdk(make_sandbox([])), "num_gpus=1")
    names = sorted({offer["gpu_name"] for offer in client_offers})
    assert len(names) >= 2
    target, other = names[0], names[1]
    sandbox = make_sandbox(
        {"seed": 2, "rules": [{"kind": "create_fails", "gpu_name": target}]}
    )
    client = sdk(sandbox)
    by_name = {offer["gpu_name"]: offer["id"] for offer in offers(client)}
    reply = create(client, by_name[target])
    assert reply["success"] is False
    assert create(client, by_name[other])["success"]
    assert injected(sandbox) == {"create_fails": 1}
    assert sandbox.ledger()["rented"] == 1


def test_boot_stuck_stays_loading_while_others_run(
    make_sandbox: Any, key_pair: KeyPair
) -> None:
    sandbox = make_sandbox({"seed": 3, "rules": [{"kind": "boot_stuck", "count": 1}]})
    client = sdk(sandbox)
    first, second = (offer["id"] for offer in offers(client)[:2])
    stuck = create(client, first)["new_contract"]
    wait_for(
        lambda: client.show_instance(id=stuck)["actual_status"] == "loading",
        what="the stuck instance to load",
    )
    running = create(client, second)["new_contract"]
    wait_running(client, running)
    assert client.show_instance(id=stuck)["actual_status"] == "loading"
    assert injected(sandbox) == {"boot_stuck": 1}


@pytest.mark.parametrize(
    "message",
    [
        "pull rate limit",
        "manifest unknown",
        "OCI runtime create failed",
        "no space left on device",
    ],
)
def test_boot_fatal_hits_one_machine_only(make_sandbox: Any, message: str) -> None:
    probe = offers(sdk(make_sandbox([])))
    machines = {offer["machine_id"]: offer["id"] for offer in probe}
    assert len(machines) >= 2
    (bad_machine, bad_offer), (_, good_offer) = list(machines.items())[:2]
    rule = {"kind": "boot_fatal", "machine": bad_machine, "message": message}
    sandbox = make_sandbox({"seed": 4, "rules": [rule]})
    client = sdk(sandbox)
    bad = create(client, bad_offer)["new_contract"]
    good = create(client, good_offer)["new_contract"]
    wait_running(client, good)
    row = wait_for(
        lambda: (
            (found := client.show_instance(id=bad))
            and message in (found["status_msg"] or "")
            and found
        ),
        what=f"the fatal boot message {message!r}",
    )
    assert row["actual_status"] != "running"
    assert injected(sandbox) == {"boot_fatal": 1}


@pytest.mark.parametrize(("kind", "status"), [("http_502", 502), ("http_503", 503)])
def test_gateway_burst_answers_n_requests_then_recovers(
    make_sandbox: Any, kind: str, status: int
) -> None:
    rule = {"kind": kind, "count": 1, "burst": 2, "route": "/users/current$"}
    sandbox = make_sandbox({"seed": 5, "rules": [rule]})
    client = sdk(sandbox)
    assert client.search_offers("num_gpus=1")
    for _ in range(2):
        assert http_status(client.show_user).status_code == status
    assert client.show_user()["username"] == "sandbox"
    assert injected(sandbox) == {kind: 2}


def test_rate_limit_is_plain_text_without_retry_after(make_sandbox: Any) -> None:
    sandbox = make_sandbox({"seed": 6, "rules": [{"kind": "http_429", "count": 1}]})
    response = http_status(sdk(sandbox).show_user)
    assert response.status_code == 429
    assert response.text == "API requests too frequent"
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "Retry-After" not in response.headers
    ledger = requests.get(f"{sandbox.url}/sandbox/ledger", timeout=10).json()
    assert ledger["faults"] == {"http_429": 1}
    assert {"rented", "destroyed", "alive", "billed_usd"} <= set(ledger)


def test_count_limited_rule_stops_after_n(make_sandbox: Any) -> None:
    sandbox = make_sandbox({"seed": 7, "rules": [{"kind": "http_504", "count": 2}]})
    client = sdk(sandbox)
    statuses = []
    for _ in range(5):
        try:
            client.show_user()
            statuses.append(200)
        except requests.HTTPError as error:
            assert error.response is not None
            statuses.append(error.response.status_code)
    assert statuses == [504, 504, 200, 200, 200]
    assert injected(sandbox) == {"http_504": 2}


def failure_pattern(sandbox: Sandbox, calls: int) -> list[bool]:
    client = sdk(sandbox)
    pattern = []
    for _ in range(calls):
        try:
            client.show_user()
            pattern.append(False)
        except requests.HTTPError:
            pattern.append(True)
    return pattern


def test_same_seed_repeats_the_same_faults(make_sandbox: Any) -> None:
    def script(seed: int) -> dict[str, Any]:
        return {"seed": seed, "rules": [{"kind": "http_503", "rate": 0.5}]}

    first = failure_pattern(make_sandbox(script(11)), 24)
    again = failure_pattern(make_sandbox(script(11)), 24)
    other = failure_pattern(make_sandbox(script(12)), 24)
    assert first == again
    assert any(first)
    assert not all(first)
    assert first != other


def test_host_offline_drops_ssh_then_disappears(
    make_sandbox: Any, key_pair: KeyPair
) -> None:
    rule = {"kind": "host_offline", "after_seconds": 0.5, "gone_after_seconds": 1.0}
    sandbox = make_sandbox({"seed": 8, "rules": [rule]})
    client = sdk(sandbox)
    instance_id = rented(client, key_pair, sandbox)
    ssh = connect(wait_running(client, instance_id), key_pair)
    try:
        assert run(ssh, "echo up")[1] == "up\n"
        transport = ssh.get_transport()
        assert transport is not None
        wait_for(lambda: not transport.is_active(), what="the SSH drop")
    finally:
        ssh.close()
    wait_for(
        lambda: client.show_instance(id=instance_id) is None,
        what="the offline instance to disappear",
    )
    assert injected(sandbox) == {"host_offline": 1}
    assert client.show_instances() == []
    assert sandbox.ledger()["alive"] == []


def test_host_offline_reports_offline_and_refuses_ssh(
    make_sandbox: Any, key_pair: KeyPair
) -> None:
    rule = {"kind": "host_offline", "gone_after_seconds": 600}
    sandbox = make_sandbox({"seed": 9, "rules": [rule]})
    client = sdk(sandbox)
    instance_id = rented(client, key_pair, sandbox)
    port = wait_running(client, instance_id)["ssh_port"]
    row = wait_for(
        lambda: (
            (found := client.show_instance(id=instance_id))
            and found["actual_status"] == "offline"
            and found
        ),
        what="the host to go offline",
    )
    assert row["ssh_port"] is None
    with pytest.raises((paramiko.SSHException, OSError, EOFError)):
        connect({"ssh_host": "127.0.0.1", "ssh_port": port}, key_pair)


def test_ssh_drop_closes_open_connections(make_sandbox: Any, key_pair: KeyPair) -> None:
    sandbox = make_sandbox(
        {"seed": 10, "rules": [{"kind": "ssh_drop", "after_seconds": 1.0}]}
    )
    client = sdk(sandbox)
    instance_id = rented(client, key_pair, sandbox)
    row = wait_running(client, instance_id)
    ssh = connect(row, key_pair)
    try:
        transport = ssh.get_transport()
        assert transport is not None
        wait_for(lambda: not transport.is_active(), what="the SSH drop")
    finally:
        ssh.close()
    assert injected(sandbox) == {"ssh_drop": 1}
    again = connect(row, key_pair)
    try:
        assert run(again, "echo back")[1] == "back\n"
    finally:
        again.close()


def test_ssh_drop_during_sftp_upload(
    make_sandbox: Any, key_pair: KeyPair, tmp_path: Path
) -> None:
    rule = {"kind": "ssh_drop", "during": "sftp", "count": 1}
    sandbox = make_sandbox({"seed": 11, "rules": [rule]})
    client = sdk(sandbox)
    instance_id = rented(client, key_pair, sandbox)
    row = wait_running(client, instance_id)
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"x" * 200_000)
    ssh = connect(row, key_pair)
    try:
        sftp = ssh.open_sftp()
        with pytest.raises((paramiko.SSHException, OSError, EOFError)):
            sftp.put(str(payload), "payload.bin")
    finally:
        ssh.close()
    assert injected(sandbox) == {"ssh_drop": 1}
    again = connect(row, key_pair)
    try:
        again.open_sftp().put(str(payload), "payload.bin")
    finally:
        again.close()
    assert (sandbox.instance_dir(instance_id) / "payload.bin").stat().st_size == (
        200_000
    )


def test_destroyed_outside_vanishes_from_the_list(
    make_sandbox: Any, key_pair: KeyPair
) -> None:
    rule = {"kind": "destroyed_outside", "after_seconds": 0.2}
    sandbox = make_sandbox({"seed": 12, "rules": [rule]})
    client = sdk(sandbox)
    instance_id = rented(client, key_pair, sandbox)
    wait_for(
        lambda: client.show_instance(id=instance_id) is None,
        what="the instance to be destroyed outside",
    )
    assert injected(sandbox) == {"destroyed_outside": 1}
    assert sandbox.ledger()["alive"] == []


def test_destroy_answers_504_once_then_succeeds(
    make_sandbox: Any, key_pair: KeyPair
) -> None:
    sandbox = make_sandbox({"seed": 13, "rules": [{"kind": "destroy_504_once"}]})
    client = sdk(sandbox)
    instance_id = rented(client, key_pair, sandbox)
    response = http_status(lambda: client.destroy_instance(id=instance_id))
    assert response.status_code == 504
    assert sandbox.ledger()["alive"] == [instance_id]
    assert client.destroy_instance(id=instance_id)["success"]
    assert sandbox.ledger()["alive"] == []
    assert injected(sandbox) == {"destroy_504_once": 1}


def test_instance_target_spares_other_instances(
    make_sandbox: Any, key_pair: KeyPair
) -> None:
    # Instance ids start at 7000001, so the second rental is 7000002.
    rule = {"kind": "destroy_504_once", "instance": 7000002}
    sandbox = make_sandbox({"seed": 14, "rules": [rule]})
    client = sdk(sandbox)
    client.create_ssh_key(ssh_key=key_pair.public)
    first, second = (offer["id"] for offer in offers(client)[:2])
    spared = create(client, first)["new_contract"]
    target = create(client, second)["new_contract"]
    assert target == 7000002
    assert client.destroy_instance(id=spared)["success"]
    assert http_status(lambda: client.destroy_instance(id=target)).status_code == 504
    assert injected(sandbox) == {"destroy_504_once": 1}


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"kind": "offer_tekan"}, "fault rule 1: unknown kind 'offer_tekan'"),
        ({"kind": "http_503", "rate": 1.5}, "fault rule 1: rate 1.5 is outside [0, 1]"),
        ({"kind": "http_429", "route": "(bundles"}, "fault rule 1: route '(bundles'"),
        ({"kind": "boot_fatal", "message": "oops"}, "fault rule 1: message 'oops'"),
        ({"kind": "http_502", "count": -1}, "fault rule 1: count -1"),
        (
            {"kind": "http_503", "machine": 5000},
            "fault rule 1: kind http_503 cannot be narrowed by machine",
        ),
        (
            {"kind": "offer_taken", "route": "asks"},
            "fault rule 1: kind offer_taken cannot be narrowed by route",
        ),
        (
            {"kind": "host_offline", "method": "GET"},
            "fault rule 1: kind host_offline cannot be narrowed by method",
        ),
    ],
)
def test_bad_script_names_rule_and_value(rule: dict[str, Any], expected: str) -> None:
    script = {"seed": 1, "rules": [{"kind": "http_429", "count": 1}, rule]}
    with pytest.raises(FaultScriptError, match=None) as caught:
        ScriptedFaults(script)
    assert expected in str(caught.value)


def test_serve_command_replays_a_fault_file(tmp_path: Path) -> None:
    script = tmp_path / "faults.json"
    script.write_text(
        json.dumps(
            {"seed": 3, "rules": [{"kind": "http_503", "count": 1, "route": "users"}]}
        )
    )
    server = subprocess.Popen(
        [str(VASTAI_POOL), "sandbox", "serve", "--faults", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip().removeprefix("VAST_URL=")
        key = server.stdout.readline().strip().removeprefix("VAST_API_KEY=")
        client = vastai.VastAI(api_key=key, server_url=url, retry=1)
        assert http_status(client.show_user).status_code == 503
        assert client.show_user()["username"] == "sandbox"
        ledger = requests.get(f"{url}/sandbox/ledger", timeout=10).json()
        assert ledger["faults"] == {"http_503": 1}
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
    assert server.returncode == 0


def test_serve_command_rejects_a_bad_fault_file(tmp_path: Path) -> None:
    script = tmp_path / "faults.json"
    script.write_text(json.dumps([{"kind": "http_503", "rate": 2}]))
    completed = subprocess.run(
        [str(VASTAI_POOL), "sandbox", "serve", "--faults", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "fault rule 0: rate 2 is outside [0, 1]" in completed.stderr
    assert str(script) in completed.stderr
