"""The official ``vastai`` CLI against the sandbox, and ``sandbox serve``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import vastai
from sandbox_helpers import KeyPair, connect, process_alive, run, wait_for, wait_running

from vastai_pool.sandbox import Sandbox

VASTAI_CLI = Path(sys.executable).parent / "vastai"
SERVE_SCRIPT = textwrap.dedent(
    """
    import argparse, sys
    from vastai_pool.sandbox import cli

    parser = argparse.ArgumentParser(prog="vastai-pool")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    sys.exit(args.func(args))
    """
)


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HOME": str(tmp_path),
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "VASTAI_NO_UPDATE_CHECK": "1",
        }
    )
    env.pop("VAST_URL", None)
    env.pop("VAST_API_KEY", None)
    return env


def vastai_cli(sandbox: Sandbox, tmp_path: Path, *args: str) -> Any:
    """Run the CLI with ``--raw``; return its JSON output (None when empty)."""
    command = [str(VASTAI_CLI), "--url", sandbox.url, "--api-key", sandbox.api_key]
    completed = subprocess.run(
        [*command, "--raw", *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr + completed.stdout
    return json.loads(completed.stdout) if completed.stdout.strip() else None


def test_cli_search_create_show_destroy(sandbox: Sandbox, tmp_path: Path) -> None:
    offers = vastai_cli(sandbox, tmp_path, "search", "offers", "num_gpus=1")
    expected = {
        o["id"]
        for o in sandbox.catalog()
        if o["num_gpus"] == 1
        and o["verification"] == "verified"
        and not o["external"]
        and o["rentable"]
    }
    assert {offer["id"] for offer in offers} == expected

    created = vastai_cli(
        sandbox,
        tmp_path,
        "create",
        "instance",
        str(offers[0]["id"]),
        "--image",
        "pytorch/pytorch",
        "--disk",
        "16",
        "--label",
        "from-cli",
    )
    assert created["success"] is True
    instance_id = created["new_contract"]

    shown = vastai_cli(sandbox, tmp_path, "show", "instances")
    assert [row["id"] for row in shown] == [instance_id]
    assert shown[0]["label"] == "from-cli"
    assert shown[0]["image_runtype"] == "ssh"

    # `destroy instance --raw` prints nothing in CLI 1.9.1; the exit code is 0.
    vastai_cli(sandbox, tmp_path, "destroy", "instance", str(instance_id), "-y")
    assert vastai_cli(sandbox, tmp_path, "show", "instances") == []
    assert sandbox.ledger()["alive"] == []


def test_cli_show_instances_table(sandbox: Sandbox, tmp_path: Path) -> None:
    client = vastai.VastAI(api_key=sandbox.api_key, server_url=sandbox.url)
    offer = client.search_offers("num_gpus=1")[0]
    instance_id = client.create_instance(offer["id"], image="img", disk=10)[
        "new_contract"
    ]

    completed = subprocess.run(
        [
            str(VASTAI_CLI),
            "--url",
            sandbox.url,
            "--api-key",
            sandbox.api_key,
            "--no-color",
            "show",
            "instances",
        ],
        capture_output=True,
        text=True,
        env={**cli_env(tmp_path), "COLUMNS": "200"},
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    assert str(instance_id) in completed.stdout
    assert offer["gpu_name"] in completed.stdout


def test_serve_prints_url_and_destroys_on_sigterm(
    tmp_path: Path, key_pair: KeyPair
) -> None:
    script = tmp_path / "serve.py"
    script.write_text(SERVE_SCRIPT)
    server = subprocess.Popen(
        [
            sys.executable,
            str(script),
            "sandbox",
            "serve",
            "--boot-seconds",
            "0.2",
            "--api-key",
            "serve-test-key",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(tmp_path),
    )
    try:
        assert server.stdout is not None
        url_line = server.stdout.readline().strip()
        key_line = server.stdout.readline().strip()
        assert url_line.startswith("VAST_URL=http://127.0.0.1:")
        assert key_line == "VAST_API_KEY=serve-test-key"
        url = url_line.split("=", 1)[1]

        client = vastai.VastAI(api_key="serve-test-key", server_url=url)
        offer = client.search_offers("num_gpus=1")[0]
        instance_id = client.create_instance(offer["id"], image="img", disk=10)[
            "new_contract"
        ]
        client.attach_ssh(instance_id, key_pair.public)
        session = connect(wait_running(client, instance_id), key_pair)
        _, out, _ = run(session, "nohup sleep 300 > /dev/null 2>&1 & echo $!")
        session.close()
        pid = int(out.strip())
        assert process_alive(pid)

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        wait_for(lambda: not process_alive(pid), what=f"process {pid} to die")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
