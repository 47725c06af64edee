"""Sandbox instances served by the system's OpenSSH sshd (``hosts="openssh"``).

The official SDK rents; the pool's own ``Connection`` logs in, as it does
against Vast.ai.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vastai
from sandbox_helpers import IMAGE, KeyPair, connect, process_alive, wait_for

from vastai_pool.errors import SshError
from vastai_pool.sandbox import FaultHooks, FaultScriptError, Sandbox
from vastai_pool.sandbox.hosts import HOSTS_VARIABLE
from vastai_pool.sandbox.openssh_host import SSHD, openssh_unavailable_reason
from vastai_pool.sandbox.processes import find_tagged_pids
from vastai_pool.ssh import Connection, Endpoint, ensure_keypair

UNAVAILABLE = openssh_unavailable_reason()
pytestmark = pytest.mark.skipif(
    UNAVAILABLE is not None,
    reason=f"the openssh host backend cannot run here: {UNAVAILABLE}",
)


class SwitchableHost(FaultHooks):
    """Fault hooks whose host goes offline when ``offline`` is set."""

    def __init__(self) -> None:
        self.offline = threading.Event()

    def host_online(self, instance_id: int) -> bool:
        return not self.offline.is_set()

    def accept_ssh(self, instance_id: int) -> bool:
        return not self.offline.is_set()


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    with Sandbox(
        boot_seconds=0.3, state_dir=tmp_path / "sandbox", hosts="openssh"
    ) as sb:
        yield sb


@pytest.fixture
def client(sandbox: Sandbox) -> vastai.VastAI:
    return vastai.VastAI(api_key=sandbox.api_key, server_url=sandbox.url)


@pytest.fixture
def pool_key(tmp_path: Path) -> tuple[Path, str]:
    return ensure_keypair(tmp_path / "pool-keys")


def rent(client: vastai.VastAI, public_key: str, query: str = "num_gpus=2") -> int:
    offer = client.search_offers(query, order="dph+")[0]
    instance_id = client.create_instance(offer["id"], image=IMAGE, disk=10)[
        "new_contract"
    ]
    client.attach_ssh(instance_id, public_key)
    return instance_id


def wait_status(client: vastai.VastAI, instance_id: int, status: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        row = client.show_instance(instance_id)
        return row if row and row["actual_status"] == status else None

    return wait_for(probe, what=f"instance {instance_id} to be {status}")


def open_connection(
    row: dict[str, Any], key_path: Path, host_key: str | None = None
) -> Connection:
    connection = Connection(
        Endpoint(host=row["ssh_host"], port=row["ssh_port"]),
        key_path,
        host_key=host_key,
        connect_timeout=10,
    )
    connection.connect(attempts=3, delay=0.5)
    return connection


def output(connection: Connection, command: str) -> str:
    result = connection.run(command, timeout=30)
    assert result.exit_code == 0, result.stderr
    return result.stdout


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


@pytest.fixture
def instance(client: vastai.VastAI, pool_key: tuple[Path, str]) -> dict[str, Any]:
    """A running 2-GPU instance that accepts the pool key."""
    return wait_status(client, rent(client, pool_key[1]), "running")


@pytest.fixture
def connection(
    instance: dict[str, Any], pool_key: tuple[Path, str]
) -> Iterator[Connection]:
    opened = open_connection(instance, pool_key[0])
    yield opened
    opened.close()


def test_login_is_root_with_instance_home(
    sandbox: Sandbox, instance: dict[str, Any], connection: Connection
) -> None:
    home = sandbox.instance_dir(instance["id"])
    (home / "marker.txt").write_text("instance file\n")

    fields = output(connection, 'echo "$(id -un)|$HOME|$(pwd)"').strip().split("|")
    listing = output(connection, "ls -A /root").split()
    device_inode = output(connection, "stat -c '%d %i' /root").split()

    assert fields == ["root", "/root", "/root"]
    assert "marker.txt" in listing
    assert sorted(listing) == sorted(os.listdir(home))
    assert device_inode == [str(home.stat().st_dev), str(home.stat().st_ino)]


def test_real_root_files_are_hidden(
    sandbox: Sandbox, instance: dict[str, Any], connection: Connection
) -> None:
    home_entries = set(os.listdir(sandbox.instance_dir(instance["id"])))
    host_only = set(os.listdir("/root")) - home_entries
    if not host_only:
        pytest.skip("the real /root has no entry that the instance home lacks")

    listing = set(output(connection, "ls -A /root").split())

    assert not listing & host_only


def directory_state(path: Path) -> dict[str, float]:
    if not path.is_dir():
        return {}
    return {entry.name: entry.stat().st_mtime for entry in path.iterdir()}


def test_sshd_files_stay_in_instance_dir(
    sandbox: Sandbox, client: vastai.VastAI, pool_key: tuple[Path, str]
) -> None:
    etc_ssh = directory_state(Path("/etc/ssh"))

    row = wait_status(client, rent(client, pool_key[1]), "running")
    connection = open_connection(row, pool_key[0])
    output(connection, "touch /root/made-by-a-session")
    connection.close()

    work_dir = sandbox.state_dir / "instances" / str(row["id"]) / "sshd"
    assert (work_dir / "sshd_config").is_file()
    assert (work_dir / "sshd.pid").is_file()
    assert (work_dir / "sshd.log").is_file()
    assert (work_dir / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert (sandbox.instance_dir(row["id"]) / "made-by-a-session").is_file()
    assert directory_state(Path("/etc/ssh")) == etc_ssh
    assert "made-by-a-session" not in os.listdir("/root")


def test_nvidia_smi_and_python_on_path(connection: Connection) -> None:
    gpus = output(connection, "nvidia-smi -L").splitlines()
    snakemake = output(connection, "python -c 'import snakemake; print(\"ok\")'")

    assert len(gpus) == 2
    assert gpus[0].startswith("GPU 0: NVIDIA ")
    assert snakemake.strip() == "ok"


def test_upload_download_round_trip(
    sandbox: Sandbox,
    instance: dict[str, Any],
    connection: Connection,
    tmp_path: Path,
) -> None:
    source = tmp_path / "input.bin"
    source.write_bytes(os.urandom(300_000))
    back = tmp_path / "back.bin"

    connection.upload(source, "data/input.bin")
    connection.download("/root/data/input.bin", back)

    on_disk = sandbox.instance_dir(instance["id"]) / "data" / "input.bin"
    assert on_disk.read_bytes() == source.read_bytes()
    assert back.read_bytes() == source.read_bytes()


def start_sleeper(connection: Connection, job_dir: str) -> int:
    connection.start_detached("exec sleep 600", job_dir=job_dir)
    pid_text = wait_for(
        lambda: output(connection, f"cat {job_dir}/pid 2>/dev/null || true").strip(),
        what="the detached job's pid file",
    )
    pid = int(pid_text)
    assert process_alive(pid)
    return pid


def test_detached_job_killed_on_destroy(
    client: vastai.VastAI, instance: dict[str, Any], connection: Connection
) -> None:
    pid = start_sleeper(connection, "jobs/1")

    assert client.destroy_instance(instance["id"])["success"] is True

    wait_for(lambda: not process_alive(pid), what=f"detached job {pid} to die")
    assert refuses_connections(instance["ssh_port"])


def test_host_key_stable_across_stop_start(
    client: vastai.VastAI,
    instance: dict[str, Any],
    connection: Connection,
    pool_key: tuple[Path, str],
) -> None:
    pinned = connection.host_key
    pid = start_sleeper(connection, "jobs/stopped")

    client.stop_instance(instance["id"])
    wait_status(client, instance["id"], "stopped")
    wait_for(lambda: not process_alive(pid), what=f"detached job {pid} to die")
    wait_for(
        lambda: refuses_connections(instance["ssh_port"]),
        what="sshd to stop listening",
    )
    client.start_instance(instance["id"])
    row = wait_status(client, instance["id"], "running")
    again = open_connection(row, pool_key[0], host_key=pinned)

    assert again.host_key == pinned
    assert output(again, "echo back").strip() == "back"
    again.close()


def test_key_attached_later_logs_in(
    sandbox: Sandbox,
    client: vastai.VastAI,
    instance: dict[str, Any],
    tmp_path: Path,
) -> None:
    second_path, second_public = ensure_keypair(tmp_path / "second-keys")
    pid_file = sandbox.state_dir / "instances" / str(instance["id"]) / "sshd/sshd.pid"
    listener = pid_file.read_text()
    with pytest.raises(SshError):
        open_connection(instance, second_path)

    client.attach_ssh(instance["id"], second_public)
    second = open_connection(instance, second_path)

    assert output(second, "echo second").strip() == "second"
    assert pid_file.read_text() == listener
    second.close()


def test_host_offline_cuts_connection(
    sandbox: Sandbox, client: vastai.VastAI, tmp_path: Path
) -> None:
    hooks = SwitchableHost()
    sandbox.faults = hooks
    key = KeyPair(tmp_path, "raw_key")
    row = wait_status(client, rent(client, key.public), "running")
    ssh = connect(row, key)
    transport = ssh.get_transport()
    assert transport is not None
    _, stdout, _ = ssh.exec_command("echo up", timeout=30)
    assert stdout.read().strip() == b"up"

    hooks.offline.set()

    wait_for(lambda: not transport.is_active(), what="the connection to be cut")
    assert client.show_instance(row["id"])["actual_status"] == "offline"
    wait_for(lambda: refuses_connections(row["ssh_port"]), what="sshd to stop")
    ssh.close()


def test_ssh_drop_cuts_connections_only(
    sandbox: Sandbox,
    client: vastai.VastAI,
    instance: dict[str, Any],
    connection: Connection,
    tmp_path: Path,
) -> None:
    pid = start_sleeper(connection, "jobs/survivor")
    key = KeyPair(tmp_path, "raw_key")
    client.attach_ssh(instance["id"], key.public)
    ssh = connect(instance, key)
    transport = ssh.get_transport()
    assert transport is not None
    host = sandbox.market.get(instance["id"])
    assert host is not None

    dropped = host.ssh.drop_connections()

    assert dropped >= 1
    wait_for(lambda: not transport.is_active(), what="the connection to be cut")
    assert process_alive(pid)
    assert output(connection, "echo reconnected").strip() == "reconnected"
    ssh.close()


def test_sftp_drop_rule_rejected(tmp_path: Path) -> None:
    script = {"rules": [{"kind": "ssh_drop", "during": "sftp"}]}

    with pytest.raises(FaultScriptError, match="paramiko") as raised:
        Sandbox(state_dir=tmp_path / "sb", hosts="openssh", faults=script)

    assert "fault rule 0" in str(raised.value)


def sshd_pids() -> set[int]:
    pids = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/exe") == str(SSHD):
                pids.add(int(name))
        except OSError:
            continue
    return pids


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    before = sshd_pids()
    sandbox = Sandbox(
        boot_seconds=0.3, state_dir=tmp_path / "sandbox", hosts="openssh"
    ).start()
    client = vastai.VastAI(api_key=sandbox.api_key, server_url=sandbox.url)
    key_path, public = ensure_keypair(tmp_path / "keys")
    rows = [wait_status(client, rent(client, public), "running") for _ in range(2)]
    connections = [open_connection(row, key_path) for row in rows]
    sleepers = [start_sleeper(c, "jobs/left") for c in connections]
    instances = [sandbox.market.get(row["id"]) for row in rows]
    tokens = [instance.token for instance in instances if instance is not None]
    started = sshd_pids() - before

    sandbox.stop()

    assert len(started) >= 2
    assert not sshd_pids() & started
    for pid in sleepers:
        assert not process_alive(pid)
    for token in tokens:
        assert find_tagged_pids(token) == []
    for connection in connections:
        connection.close()


def test_raw_paramiko_client_sees_instance_home(
    sandbox: Sandbox, instance: dict[str, Any], tmp_path: Path, client: vastai.VastAI
) -> None:
    key = KeyPair(tmp_path, "raw_key")
    client.attach_ssh(instance["id"], key.public)
    ssh = connect(instance, key)
    sftp = ssh.open_sftp()
    with sftp.open("written-over-sftp.txt", "w") as remote:
        remote.write("over sftp\n")
    sftp.close()
    ssh.close()

    written = sandbox.instance_dir(instance["id"]) / "written-over-sftp.txt"
    assert written.read_text() == "over sftp\n"


SERVE_SCRIPT = (
    "import argparse, sys\n"
    "from vastai_pool.sandbox import cli\n"
    "parser = argparse.ArgumentParser(prog='vastai-pool')\n"
    "cli.add_parser(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args()\n"
    "sys.exit(args.func(args))\n"
)


def test_serve_with_openssh_flag(tmp_path: Path, pool_key: tuple[Path, str]) -> None:
    before = sshd_pids()
    env = {key: value for key, value in os.environ.items() if key != HOSTS_VARIABLE}
    command = [sys.executable, "-c", SERVE_SCRIPT, "sandbox", "serve"]
    server = subprocess.Popen(
        [*command, "--hosts", "openssh", "--boot-seconds", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip().removeprefix("VAST_URL=")
        api_key = server.stdout.readline().strip().removeprefix("VAST_API_KEY=")
        client = vastai.VastAI(api_key=api_key, server_url=url)
        row = wait_status(client, rent(client, pool_key[1]), "running")
        connection = open_connection(row, pool_key[0])
        home = output(connection, "echo $HOME").strip()
        connection.close()
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)

    assert home == "/root"
    assert code == 0
    assert sshd_pids() <= before
