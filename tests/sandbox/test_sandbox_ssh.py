"""SSH and SFTP on sandbox instances, through a real paramiko client."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
import vastai
from sandbox_helpers import (
    IMAGE,
    KeyPair,
    cheapest_offer,
    connect,
    process_alive,
    run,
    wait_for,
    wait_running,
)

from vastai_pool.sandbox import Sandbox


@pytest.fixture
def instance(client: vastai.VastAI, key_pair: KeyPair) -> dict[str, Any]:
    """A running 2-GPU RTX 4090 instance with ``key_pair`` attached."""
    offer = cheapest_offer(client, "gpu_name=RTX_4090 num_gpus=2")
    instance_id = client.create_instance(offer["id"], image=IMAGE, disk=10)[
        "new_contract"
    ]
    client.attach_ssh(instance_id, key_pair.public)
    return wait_running(client, instance_id)


@pytest.fixture
def ssh(instance: dict[str, Any], key_pair: KeyPair) -> Iterator[paramiko.SSHClient]:
    session = connect(instance, key_pair)
    yield session
    session.close()


def test_nvidia_smi_lists_rented_gpus(ssh: paramiko.SSHClient) -> None:
    code, out, _ = run(ssh, "nvidia-smi -L")

    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-")
    assert lines[1].startswith("GPU 1: NVIDIA GeForce RTX 4090 (UUID: GPU-")


def test_nvidia_smi_query_csv(ssh: paramiko.SSHClient) -> None:
    code, out, _ = run(
        ssh, "nvidia-smi --query-gpu=name,memory.total --format=csv,noheader"
    )

    assert code == 0
    assert out.splitlines() == ["NVIDIA GeForce RTX 4090, 24564 MiB"] * 2


def test_session_environment(
    sandbox: Sandbox, instance: dict[str, Any], ssh: paramiko.SSHClient
) -> None:
    _, out, _ = run(
        ssh, 'echo "$CONTAINER_ID|$VAST_CONTAINERLABEL|$HOME|$PUBLIC_IPADDR|$(pwd)"'
    )

    home = str(sandbox.instance_dir(instance["id"]))
    assert out.strip().split("|") == [
        str(instance["id"]),
        f"C.{instance['id']}",
        home,
        "127.0.0.1",
        home,
    ]


def test_exec_wires_stdin_stderr_and_exit_status(ssh: paramiko.SSHClient) -> None:
    stdin, stdout, stderr = ssh.exec_command("cat; echo oops >&2; exit 7")
    stdin.write(b"piped input")
    stdin.channel.shutdown_write()

    assert stdout.read() == b"piped input"
    assert stderr.read() == b"oops\n"
    assert stdout.channel.recv_exit_status() == 7


def test_python_of_the_test_run_is_on_path(ssh: paramiko.SSHClient) -> None:
    code, out, _ = run(ssh, "python -c 'import sys; print(sys.prefix)'")

    assert code == 0
    assert out.strip()


def test_concurrent_channels_on_one_connection(ssh: paramiko.SSHClient) -> None:
    results: dict[int, tuple[int, str, str]] = {}

    def worker(index: int) -> None:
        results[index] = run(ssh, f"sleep 0.2; echo channel-{index}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(results) == list(range(6))
    for index, (code, out, _) in results.items():
        assert code == 0
        assert out.strip() == f"channel-{index}"


def test_several_connections_at_once(
    instance: dict[str, Any], key_pair: KeyPair
) -> None:
    sessions = [connect(instance, key_pair) for _ in range(4)]
    try:
        outputs = [
            run(session, "echo $CONTAINER_ID")[1].strip() for session in sessions
        ]
    finally:
        for session in sessions:
            session.close()

    assert outputs == [str(instance["id"])] * 4


def test_sftp_round_trip(
    sandbox: Sandbox,
    instance: dict[str, Any],
    ssh: paramiko.SSHClient,
    tmp_path: Path,
) -> None:
    payload = os.urandom(300_000)
    local = tmp_path / "upload.bin"
    local.write_bytes(payload)
    sftp = ssh.open_sftp()

    sftp.mkdir("work")
    sftp.put(str(local), "work/data.bin.tmp")
    sftp.posix_rename("work/data.bin.tmp", "work/data.bin")
    sftp.chmod("work/data.bin", 0o640)
    sftp.utime("work/data.bin", (1_700_000_000, 1_700_000_000))
    back = tmp_path / "download.bin"
    sftp.get("work/data.bin", str(back))

    assert back.read_bytes() == payload
    on_instance = sandbox.instance_dir(instance["id"]) / "work" / "data.bin"
    assert on_instance.read_bytes() == payload
    attributes = sftp.stat("work/data.bin")
    assert attributes.st_mode & 0o777 == 0o640
    assert attributes.st_mtime == 1_700_000_000
    assert sftp.listdir("work") == ["data.bin"]
    assert sftp.normalize(".") == str(sandbox.instance_dir(instance["id"]))
    sftp.remove("work/data.bin")
    sftp.rmdir("work")
    assert "work" not in sftp.listdir(".")
    sftp.close()


def test_sftp_rename_does_not_replace(ssh: paramiko.SSHClient) -> None:
    sftp = ssh.open_sftp()
    with sftp.open("a.txt", "w") as handle:
        handle.write(b"a")
    with sftp.open("b.txt", "w") as handle:
        handle.write(b"b")

    with pytest.raises(OSError):
        sftp.rename("a.txt", "b.txt")
    with sftp.open("b.txt") as handle:
        assert handle.read() == b"b"
    with pytest.raises(FileNotFoundError):
        sftp.stat("missing.txt")
    sftp.close()


def test_wrong_key_is_rejected(instance: dict[str, Any], tmp_path: Path) -> None:
    stranger = KeyPair(tmp_path, "stranger")

    with pytest.raises(paramiko.AuthenticationException):
        connect(instance, stranger)


def test_other_user_is_rejected(instance: dict[str, Any], key_pair: KeyPair) -> None:
    session = paramiko.SSHClient()
    session.set_missing_host_key_policy(paramiko.AutoAddPolicy())

    with pytest.raises(paramiko.AuthenticationException):
        session.connect(
            instance["ssh_host"],
            port=instance["ssh_port"],
            username="ubuntu",
            pkey=key_pair.pkey,
            allow_agent=False,
            look_for_keys=False,
        )
    session.close()


def test_instances_have_distinct_host_keys(
    client: vastai.VastAI, key_pair: KeyPair, instance: dict[str, Any]
) -> None:
    other_id = client.create_instance(
        cheapest_offer(client, "gpu_name=RTX_3090 num_gpus=1")["id"],
        image=IMAGE,
        disk=10,
    )["new_contract"]
    client.attach_ssh(other_id, key_pair.public)
    other = wait_running(client, other_id)

    keys = []
    for row in (instance, other):
        session = connect(row, key_pair)
        keys.append(session.get_transport().get_remote_server_key().get_base64())
        session.close()
    assert keys[0] != keys[1]


@pytest.mark.parametrize("detach", ["nohup", "setsid nohup"])
def test_detached_process_survives_channel_and_dies_on_destroy(
    client: vastai.VastAI,
    instance: dict[str, Any],
    ssh: paramiko.SSHClient,
    detach: str,
) -> None:
    code, out, _ = run(
        ssh, f"{detach} sleep 300 > /dev/null 2>&1 < /dev/null & echo $!"
    )
    assert code == 0
    pid = int(out.strip())

    ssh.close()
    assert process_alive(pid)

    client.destroy_instance(instance["id"])
    wait_for(lambda: not process_alive(pid), what=f"process {pid} to die")


def test_stop_kills_processes_and_refuses_ssh(
    client: vastai.VastAI,
    instance: dict[str, Any],
    ssh: paramiko.SSHClient,
    key_pair: KeyPair,
) -> None:
    _, out, _ = run(ssh, "nohup sleep 300 > /dev/null 2>&1 & echo $!")
    pid = int(out.strip())

    client.stop_instance(instance["id"])

    wait_for(lambda: not process_alive(pid), what=f"process {pid} to die")
    with pytest.raises((paramiko.SSHException, OSError, EOFError)):
        connect(instance, key_pair)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no OpenSSH client")
def test_openssh_client_exec_and_scp(
    sandbox: Sandbox, instance: dict[str, Any], key_pair: KeyPair, tmp_path: Path
) -> None:
    options = [
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-i",
        str(key_pair.path),
    ]
    target = f"root@{instance['ssh_host']}"
    port = str(instance["ssh_port"])

    ssh = subprocess.run(
        ["ssh", *options, "-p", port, target, "echo $CONTAINER_ID; exit 4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ssh.returncode == 4
    assert ssh.stdout.strip() == str(instance["id"])

    local = tmp_path / "local.txt"
    local.write_text("over scp")
    scp = subprocess.run(
        ["scp", *options, "-P", port, str(local), f"{target}:copied.txt"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert scp.returncode == 0, scp.stderr
    copied = sandbox.instance_dir(instance["id"]) / "copied.txt"
    assert copied.read_text() == "over scp"
