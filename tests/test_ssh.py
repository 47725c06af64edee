"""Connection and ensure_keypair against a real OpenSSH server."""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.sshd import SSHD, SshdHost
from vastai_pool.errors import ConfigError, HostKeyMismatch, SshError
from vastai_pool.ssh import Connection, Endpoint, ensure_keypair

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

# tests/conftest.py registers tests.sshd, whose sshd_host fixture skips the
# tests that take it when /usr/sbin/sshd is missing.

POLL_TIMEOUT = 30.0


def wait_for(condition: Callable[[], object], description: str) -> object:
    """Poll ``condition`` until it returns a truthy value."""
    deadline = time.monotonic() + POLL_TIMEOUT
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {description}")


def fingerprint(key_line: str) -> str:
    blob = base64.b64decode(key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip(
        "="
    )


def group_alive(connection: Connection, pgid: int) -> bool:
    """Return whether the process group has a member that is not a zombie."""
    # PID 1 of a container may reap orphans late, and `kill -0` counts zombies.
    listing = connection.run("ps -e -o pgid= -o stat=").stdout
    return any(
        line.split()[0] == str(pgid) and not line.split()[1].startswith("Z")
        for line in listing.splitlines()
        if line.strip()
    )


@pytest.fixture
def connection(
    sshd_host: SshdHost, pool_keypair: tuple[Path, str]
) -> Iterator[Connection]:
    conn = Connection(sshd_host.endpoint, pool_keypair[0])
    conn.connect()
    yield conn
    conn.close()


# -- key pair ----------------------------------------------------------------


def test_keypair_private_key_has_mode_0600(tmp_path: Path) -> None:
    private_path, public_line = ensure_keypair(tmp_path / "keys")

    assert private_path == tmp_path / "keys" / "id_ed25519"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert public_line.startswith("ssh-ed25519 AAAA")
    assert public_line.endswith(" vastai-pool")
    assert (tmp_path / "keys" / "id_ed25519.pub").read_text() == public_line + "\n"
    assert private_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")


def test_keypair_reused_on_second_call(tmp_path: Path) -> None:
    first = ensure_keypair(tmp_path)
    key_bytes = first[0].read_bytes()

    second = ensure_keypair(tmp_path)

    assert second == first
    assert second[0].read_bytes() == key_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "id_ed25519",
        "id_ed25519.pub",
    ]


def test_keypair_rewrites_missing_public_key(tmp_path: Path) -> None:
    _, public_line = ensure_keypair(tmp_path)
    (tmp_path / "id_ed25519.pub").unlink()

    assert ensure_keypair(tmp_path)[1] == public_line
    assert (tmp_path / "id_ed25519.pub").read_text() == public_line + "\n"


# -- connecting --------------------------------------------------------------


def test_connect_pins_host_key_at_first_contact(
    sshd_host: SshdHost, pool_keypair: tuple[Path, str]
) -> None:
    conn = Connection(sshd_host.endpoint, pool_keypair[0])
    assert conn.host_key is None

    try:
        host_key = conn.connect()
    finally:
        conn.close()

    assert host_key == sshd_host.host_key
    assert conn.host_key == sshd_host.host_key


def test_connect_with_matching_pinned_key(
    sshd_host: SshdHost, pool_keypair: tuple[Path, str]
) -> None:
    conn = Connection(
        sshd_host.endpoint, pool_keypair[0], host_key=sshd_host.host_key + " comment"
    )
    try:
        assert conn.connect() == sshd_host.host_key
        assert conn.run("true").exit_code == 0
    finally:
        conn.close()


def test_pinned_host_key_mismatch_raises(
    sshd_host: SshdHost, pool_keypair: tuple[Path, str]
) -> None:
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    other_line = other.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    conn = Connection(sshd_host.endpoint, pool_keypair[0], host_key=other_line)

    with pytest.raises(HostKeyMismatch) as caught:
        conn.connect(attempts=3, delay=0)

    message = str(caught.value)
    assert f"127.0.0.1:{sshd_host.port}" in message
    assert fingerprint(other_line) in message
    assert fingerprint(sshd_host.host_key) in message
    assert "vastai-pool gc" in message
    assert conn.host_key == other_line


def test_connect_to_closed_port_names_endpoint(pool_keypair: tuple[Path, str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conn = Connection(Endpoint("127.0.0.1", port), pool_keypair[0], connect_timeout=5)

    with pytest.raises(SshError) as caught:
        conn.connect(attempts=2, delay=0)

    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "2 attempt(s)" in str(caught.value)
    assert "ConnectionRefusedError" in str(caught.value)


def test_connect_retries_until_sshd_starts(
    pool_keypair: tuple[Path, str], tmp_path: Path
) -> None:
    if not SSHD.exists():
        pytest.skip(f"OpenSSH server missing at {SSHD}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conn = Connection(Endpoint("127.0.0.1", port, getpass.getuser()), pool_keypair[0])
    outcome: list[object] = []

    def connect() -> None:
        try:
            outcome.append(conn.connect(attempts=200, delay=0.05))
        except SshError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=connect)
    thread.start()
    try:
        with SshdHost(tmp_path / "late", [pool_keypair[1]], port=port) as host:
            thread.join()
            assert outcome == [host.host_key]
    finally:
        thread.join()
        conn.close()


def test_keypair_created_once_by_racing_threads(tmp_path: Path) -> None:
    results: list[tuple[Path, str]] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_keypair(tmp_path)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 8
    assert len(set(results)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "id_ed25519",
        "id_ed25519.pub",
    ]


def test_keypair_tightens_open_mode(tmp_path: Path) -> None:
    private_path, public_line = ensure_keypair(tmp_path)
    private_path.chmod(0o644)

    assert ensure_keypair(tmp_path) == (private_path, public_line)
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600


def test_keypair_rejects_invalid_key_file(tmp_path: Path) -> None:
    (tmp_path / "id_ed25519").write_text("not a key\n")

    with pytest.raises(ConfigError) as caught:
        ensure_keypair(tmp_path)

    assert str(tmp_path / "id_ed25519") in str(caught.value)


def test_connect_with_unknown_key_explains_rejection(
    sshd_host: SshdHost, tmp_path: Path
) -> None:
    stranger_key, _ = ensure_keypair(tmp_path)
    conn = Connection(sshd_host.endpoint, stranger_key)

    with pytest.raises(SshError) as caught:
        conn.connect()

    assert "rejected the key" in str(caught.value)
    assert str(stranger_key) in str(caught.value)


def test_reconnect_after_server_drops_connection(
    connection: Connection, sshd_host: SshdHost, remote_dir: str
) -> None:
    first_key = connection.host_key
    # The command's parent is sshd's session process; killing it drops the
    # TCP connection from the server side.
    with pytest.raises(SshError):
        # The loop ends at its first write after the connection is gone.
        connection.run(
            "kill -TERM $PPID; while echo x; do sleep 0.1; done", timeout=POLL_TIMEOUT
        )

    result = connection.run("echo back")

    assert result.stdout == "back\n"
    assert connection.host_key == first_key


def test_drop_observer_stops_reconnecting_to_a_dead_host(
    connection: Connection, sshd_host: SshdHost, remote_dir: str
) -> None:
    (sshd_host.home / remote_dir).mkdir()
    calls: list[str] = []

    def host_is_gone() -> str:
        calls.append("dropped")
        return "the API no longer lists the host"

    connection.drop_observer = host_is_gone
    with pytest.raises(SshError):
        connection.run(
            "kill -TERM $PPID; while echo x; do sleep 0.1; done", timeout=POLL_TIMEOUT
        )

    with pytest.raises(SshError) as caught:
        connection.exists(remote_dir)

    assert "the API no longer lists the host" in str(caught.value)
    assert "not reopened" in str(caught.value)
    assert calls == ["dropped"]


def test_drop_observer_returning_none_lets_it_reconnect(
    connection: Connection, sshd_host: SshdHost, remote_dir: str
) -> None:
    (sshd_host.home / remote_dir).mkdir()
    calls: list[str] = []
    connection.drop_observer = lambda: calls.append("dropped") or None
    with pytest.raises(SshError):
        connection.run(
            "kill -TERM $PPID; while echo x; do sleep 0.1; done", timeout=POLL_TIMEOUT
        )

    assert connection.exists(remote_dir)
    assert calls == ["dropped"]


def test_reconnect_after_client_closes_transport(
    connection: Connection, sshd_host: SshdHost, remote_dir: str
) -> None:
    (sshd_host.home / remote_dir).mkdir()
    connection.close()

    assert connection.exists(remote_dir)
    assert connection.run("echo again").stdout == "again\n"


# -- commands ----------------------------------------------------------------


def test_run_returns_exit_code_and_streams(connection: Connection) -> None:
    result = connection.run("echo out; echo err >&2; exit 3")

    assert result.exit_code == 3
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


def test_run_starts_in_home_directory(
    connection: Connection, sshd_host: SshdHost
) -> None:
    assert connection.run("pwd").stdout.strip() == str(sshd_host.home)


def test_run_passes_stdin(connection: Connection) -> None:
    data = os.urandom(3 * 1024 * 1024)

    result = connection.run("sha256sum", stdin=data)

    assert result.exit_code == 0
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_run_without_stdin_sees_eof(connection: Connection) -> None:
    assert connection.run("cat; echo done", timeout=POLL_TIMEOUT).stdout == "done\n"


def test_run_large_output_on_both_streams(connection: Connection) -> None:
    command = "head -c 2000000 /dev/zero | tr '\\0' a; head -c 2000000 /dev/zero >&2"

    result = connection.run(command)

    assert result.exit_code == 0
    assert result.stdout == "a" * 2_000_000
    assert len(result.stderr) == 2_000_000


def test_run_decodes_invalid_utf8_with_replacement(connection: Connection) -> None:
    result = connection.run("printf 'a\\377b'")

    assert result.stdout == "a\ufffdb"


def test_run_timeout_names_command(connection: Connection) -> None:
    with pytest.raises(SshError) as caught:
        # The loop ends at its first write after the channel is closed.
        connection.run("while echo x; do sleep 0.1; done # slow-marker", timeout=0.5)

    assert "timed out" in str(caught.value)
    assert "slow-marker" in str(caught.value)
    assert connection.run("echo still usable").exit_code == 0


def test_parallel_commands_and_transfers_share_connection(
    connection: Connection, sshd_host: SshdHost, remote_dir: str, tmp_path: Path
) -> None:
    # More threads than OpenSSH's default MaxSessions of 10.
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            source = tmp_path / f"in-{index}"
            source.write_bytes(os.urandom(200_000))
            connection.upload(source, f"{remote_dir}/file-{index}")
            result = connection.run(f"sha256sum {remote_dir}/file-{index}")
            assert (
                result.stdout.split()[0]
                == hashlib.sha256(source.read_bytes()).hexdigest()
            )
            connection.download(f"{remote_dir}/file-{index}", tmp_path / f"out-{index}")
            assert (tmp_path / f"out-{index}").read_bytes() == source.read_bytes()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []


# -- detached commands -------------------------------------------------------


def test_detached_command_outlives_connection(
    connection: Connection, sshd_host: SshdHost, remote_dir: str
) -> None:
    job_dir = f"{remote_dir}/job"
    script = f"echo started; while [ ! -e {remote_dir}/go ]; do sleep 0.05; done\n"
    script += "echo finished; exit 7\n"

    connection.start_detached(script, job_dir=job_dir)
    connection.close()

    log = f"{job_dir}/log"
    first = wait_for(lambda: connection.read_from(log, 0), "the first log line")
    assert first == b"started\n"
    assert connection.read_exit_code(job_dir) is None
    assert (sshd_host.home / job_dir / "cmd.sh").read_text() == script

    connection.run(f"touch {remote_dir}/go")
    exit_code = wait_for(
        lambda: connection.read_exit_code(job_dir) is not None, "the exit file"
    )
    assert exit_code

    assert connection.read_exit_code(job_dir) == 7
    assert connection.read_from(log, len(first)) == b"finished\n"
    assert connection.read_from(log, 10_000) == b""
    assert not (sshd_host.home / job_dir / "exit.tmp").exists()


def test_detached_command_runs_in_new_session_from_home(
    connection: Connection, sshd_host: SshdHost, remote_dir: str
) -> None:
    job_dir = f"{remote_dir}/job"
    script = "pwd; ps -o pgid= -o sid= -p $$; cat; echo stdin-done"

    connection.start_detached(script, job_dir=job_dir)

    wait_for(lambda: connection.read_exit_code(job_dir) is not None, "the exit")
    lines = connection.read_from(f"{job_dir}/log", 0).decode().splitlines()
    pid = int(connection.read_from(f"{job_dir}/pid", 0))
    assert lines[0] == str(sshd_host.home)
    assert lines[1].split() == [str(pid), str(pid)]
    assert lines[2] == "stdin-done"


def test_detached_log_is_appended_and_old_exit_removed(
    connection: Connection, remote_dir: str
) -> None:
    job_dir = f"{remote_dir}/job"
    connection.start_detached("echo one", job_dir=job_dir)
    wait_for(lambda: connection.read_exit_code(job_dir) == 0, "the first exit")

    connection.start_detached(
        f"while [ ! -e {remote_dir}/go ]; do sleep 0.05; done", job_dir=job_dir
    )
    assert connection.read_exit_code(job_dir) is None
    connection.run(f"touch {remote_dir}/go; echo two >> {job_dir}/log")
    wait_for(lambda: connection.read_exit_code(job_dir) == 0, "the second exit")

    assert connection.read_from(f"{job_dir}/log", 0) == b"one\ntwo\n"


def test_kill_detached_terminates_process_group(
    connection: Connection, remote_dir: str
) -> None:
    job_dir = f"{remote_dir}/job"
    connection.start_detached("sleep 300 & sleep 300; wait", job_dir=job_dir)
    pgid = int(connection.read_from(f"{job_dir}/pid", 0))
    assert group_alive(connection, pgid)

    connection.kill_detached(job_dir)

    assert not group_alive(connection, pgid)
    assert connection.read_exit_code(job_dir) == 143


def test_kill_detached_escalates_to_sigkill(
    connection: Connection, remote_dir: str
) -> None:
    job_dir = f"{remote_dir}/job"
    script = f"trap '' TERM; touch {remote_dir}/ready; while :; do sleep 1; done"
    connection.start_detached(script, job_dir=job_dir)
    wait_for(lambda: connection.exists(f"{remote_dir}/ready"), "the TERM trap")
    pgid = int(connection.read_from(f"{job_dir}/pid", 0))

    connection.kill_detached(job_dir, grace=0.5)

    assert not group_alive(connection, pgid)
    assert connection.read_exit_code(job_dir) is None


def test_kill_detached_after_exit_does_nothing(
    connection: Connection, remote_dir: str
) -> None:
    job_dir = f"{remote_dir}/job"
    connection.start_detached("exit 4", job_dir=job_dir)
    wait_for(lambda: connection.read_exit_code(job_dir) is not None, "the exit")

    connection.kill_detached(job_dir)

    assert connection.read_exit_code(job_dir) == 4


def test_kill_detached_rejects_invalid_pid_file(
    connection: Connection, sshd_host: SshdHost, remote_dir: str
) -> None:
    job_dir = sshd_host.home / remote_dir / "job"
    job_dir.mkdir(parents=True)
    (job_dir / "pid").write_text("1\n")

    with pytest.raises(SshError) as caught:
        connection.kill_detached(f"{remote_dir}/job")

    assert "invalid pid file" in str(caught.value)


def test_read_from_missing_file_is_empty(
    connection: Connection, remote_dir: str
) -> None:
    assert connection.read_from(f"{remote_dir}/absent", 0) == b""
    assert connection.read_exit_code(f"{remote_dir}/absent") is None


# -- transfers ---------------------------------------------------------------


def make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o750)
    (root / "sub" / "secret").write_bytes(os.urandom(70_000))
    (root / "sub" / "secret").chmod(0o600)
    (root / "sub" / "deeper" / "name with 'quote'").write_text("x")
    (root / "sub" / "deeper").chmod(0o711)


def tree_listing(root: Path) -> dict[str, tuple[int, bytes | None]]:
    listing: dict[str, tuple[int, bytes | None]] = {}
    for path in sorted(root.rglob("*")):
        mode = stat.S_IMODE(path.stat().st_mode)
        content = path.read_bytes() if path.is_file() else None
        listing[str(path.relative_to(root))] = (mode, content)
    return listing


def test_upload_file_creates_parents_and_keeps_mode(
    connection: Connection, sshd_host: SshdHost, remote_dir: str, tmp_path: Path
) -> None:
    source = tmp_path / "tool"
    source.write_bytes(b"#!/bin/sh\n")
    source.chmod(0o751)

    connection.upload(source, f"{remote_dir}/a/b/tool")

    target = sshd_host.home / remote_dir / "a" / "b" / "tool"
    assert target.read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o751
    assert sorted(p.name for p in target.parent.iterdir()) == ["tool"]


def test_upload_replaces_existing_file(
    connection: Connection, sshd_host: SshdHost, remote_dir: str, tmp_path: Path
) -> None:
    source = tmp_path / "data"
    source.write_text("old")
    connection.upload(source, f"{remote_dir}/data")
    source.write_text("new")

    connection.upload(source, f"{remote_dir}/data")

    assert (sshd_host.home / remote_dir / "data").read_text() == "new"


def test_upload_and_download_tree_keep_modes(
    connection: Connection, sshd_host: SshdHost, remote_dir: str, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    make_tree(source)

    connection.upload(source, f"{remote_dir}/tree")
    connection.download(f"{remote_dir}/tree", tmp_path / "back")

    assert tree_listing(sshd_host.home / remote_dir / "tree") == tree_listing(source)
    assert tree_listing(tmp_path / "back") == tree_listing(source)


def test_tree_into_existing_directory_keeps_its_mode(
    connection: Connection, sshd_host: SshdHost, remote_dir: str, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    make_tree(source)
    source.chmod(0o755)
    existing = sshd_host.home / remote_dir
    existing.mkdir(mode=0o700)
    existing.chmod(0o700)
    back = tmp_path / "back"
    back.mkdir()
    back.chmod(0o750)

    connection.upload(source, remote_dir)
    connection.download(remote_dir, back)

    assert stat.S_IMODE(existing.stat().st_mode) == 0o700
    assert stat.S_IMODE(back.stat().st_mode) == 0o750
    assert tree_listing(existing) == tree_listing(source)
    assert tree_listing(back) == tree_listing(source)


def test_upload_to_directory_name_raises(
    connection: Connection, remote_dir: str, tmp_path: Path
) -> None:
    source = tmp_path / "file"
    source.write_text("x")

    with pytest.raises(SshError) as caught:
        connection.upload(source, f"{remote_dir}/")

    assert "name the file" in str(caught.value)


def test_download_file_creates_parents_and_keeps_mode(
    connection: Connection, sshd_host: SshdHost, remote_dir: str, tmp_path: Path
) -> None:
    remote = sshd_host.home / remote_dir / "result.bin"
    remote.parent.mkdir()
    remote.write_bytes(b"result")
    remote.chmod(0o640)

    connection.download(f"{remote_dir}/result.bin", tmp_path / "x" / "y" / "out")

    local = tmp_path / "x" / "y" / "out"
    assert local.read_bytes() == b"result"
    assert stat.S_IMODE(local.stat().st_mode) == 0o640
    assert [p.name for p in local.parent.iterdir()] == ["out"]


def test_download_missing_file_names_path(
    connection: Connection, remote_dir: str, tmp_path: Path
) -> None:
    with pytest.raises(SshError) as caught:
        connection.download(f"{remote_dir}/nothing", tmp_path / "nothing")

    assert f"{remote_dir}/nothing" in str(caught.value)
    assert "not found" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


# paramiko's prefetch thread raises EOFError when the transport closes under it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_interrupted_download_leaves_no_file(
    connection: Connection, sshd_host: SshdHost, remote_dir: str, tmp_path: Path
) -> None:
    remote = sshd_host.home / remote_dir / "big"
    remote.parent.mkdir()
    remote.write_bytes(os.urandom(8 * 1024 * 1024))
    local = tmp_path / "big"
    local_dir_before = sorted(tmp_path.iterdir())

    # Drops the connection at the first chunk of every attempt; at most
    # 2 MiB of the 8 MiB are requested by then.
    def drop_connection(received: int, total: int) -> None:
        connection._transport.close()  # type: ignore[union-attr]

    with pytest.raises(SshError) as caught:
        connection.download(f"{remote_dir}/big", local, progress=drop_connection)

    assert f"{remote_dir}/big" in str(caught.value)
    assert "after reconnecting" in str(caught.value)
    assert not local.exists()
    assert sorted(tmp_path.iterdir()) == local_dir_before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_download_retries_once_after_drop(
    connection: Connection, sshd_host: SshdHost, remote_dir: str, tmp_path: Path
) -> None:
    remote = sshd_host.home / remote_dir / "big"
    remote.parent.mkdir()
    remote.write_bytes(os.urandom(8 * 1024 * 1024))
    drops: list[int] = []

    def drop_once(received: int, total: int) -> None:
        if not drops:
            drops.append(received)
            connection._transport.close()  # type: ignore[union-attr]

    connection.download(f"{remote_dir}/big", tmp_path / "big", progress=drop_once)

    assert drops
    assert (tmp_path / "big").read_bytes() == remote.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]


def test_interrupted_upload_leaves_no_remote_file(
    connection: Connection, sshd_host: SshdHost, remote_dir: str, tmp_path: Path
) -> None:
    source = tmp_path / "big"
    source.write_bytes(os.urandom(8 * 1024 * 1024))

    def drop_connection(sent: int, total: int) -> None:
        connection._transport.close()  # type: ignore[union-attr]

    with pytest.raises(SshError) as caught:
        connection.upload(source, f"{remote_dir}/big", progress=drop_connection)

    assert str(source) in str(caught.value)
    remote_parent = sshd_host.home / remote_dir
    assert not (remote_parent / "big").exists()
    # The second attempt removes the first one's temporary file, and its own
    # is left only if the connection was gone before it could remove it.
    assert len(list(remote_parent.iterdir())) <= 1


def test_upload_missing_local_path_raises(
    connection: Connection, remote_dir: str, tmp_path: Path
) -> None:
    with pytest.raises(SshError) as caught:
        connection.upload(tmp_path / "absent", f"{remote_dir}/absent")

    assert str(tmp_path / "absent") in str(caught.value)


def test_exists(connection: Connection, sshd_host: SshdHost, remote_dir: str) -> None:
    (sshd_host.home / remote_dir).mkdir()
    (sshd_host.home / remote_dir / "file").write_text("x")

    assert connection.exists(f"{remote_dir}/file")
    assert connection.exists(remote_dir)
    assert not connection.exists(f"{remote_dir}/absent")


def test_sha256_of_many_paths_skips_missing(
    connection: Connection, sshd_host: SshdHost, remote_dir: str
) -> None:
    base = sshd_host.home / remote_dir
    (base / "dir").mkdir(parents=True)
    names = ["plain", "with space", "it's", "-dash", "back\\slash", "new\nline"]
    expected = {}
    for name in names:
        data = os.urandom(1000)
        (base / name).write_bytes(data)
        expected[f"{remote_dir}/{name}"] = hashlib.sha256(data).hexdigest()

    paths = [*expected, f"{remote_dir}/missing", f"{remote_dir}/dir", "-dash"]
    digests = connection.sha256(paths)

    assert digests == expected
    assert connection.sha256([]) == {}


# -- sandbox instance ----------------------------------------------------------


@pytest.fixture
def sandbox_instance(
    sandbox: Sandbox, pool_keypair: tuple[Path, str]
) -> Iterator[tuple[Connection, Path]]:
    """A Connection to a running sandbox instance, and the instance's home."""
    from vastai import VastAI

    sdk = VastAI(api_key=sandbox.api_key, server_url=sandbox.url)
    offer = sdk.search_offers(query="num_gpus>=1")[0]
    created = sdk.create_instance(
        id=offer["id"], image="pytorch/pytorch", disk=10, label="test-ssh"
    )
    instance_id = created["new_contract"]
    sdk.attach_ssh(instance_id=instance_id, ssh_key=pool_keypair[1])

    def ssh_port() -> int | None:
        row = sdk.show_instance(id=instance_id)
        if row and row.get("actual_status") == "running":
            return row.get("ssh_port")
        return None

    port = wait_for(ssh_port, "the sandbox instance to run")
    conn = Connection(Endpoint("127.0.0.1", int(port)), pool_keypair[0])
    conn.connect(attempts=10, delay=0.2)
    yield conn, sandbox.instance_dir(instance_id)
    conn.close()


def test_sandbox_instance_supports_every_operation(
    sandbox_instance: tuple[Connection, Path], tmp_path: Path
) -> None:
    conn, home = sandbox_instance

    result = conn.run("pwd; echo err >&2; exit 5")
    assert result.exit_code == 5
    assert result.stdout == f"{home}\n"
    assert result.stderr == "err\n"
    assert conn.run("cat", stdin=b"piped").stdout == "piped"

    conn.start_detached(
        "echo started; while [ ! -e go ]; do sleep 0.05; done; exit 9", job_dir="jobs/a"
    )
    conn.close()
    assert wait_for(lambda: conn.read_from("jobs/a/log", 0), "the log") == b"started\n"
    conn.run("touch go")
    wait_for(lambda: conn.read_exit_code("jobs/a") is not None, "the exit file")
    assert conn.read_exit_code("jobs/a") == 9

    conn.start_detached("sleep 300", job_dir="jobs/b")
    pgid = int(conn.read_from("jobs/b/pid", 0))
    conn.kill_detached("jobs/b")
    assert conn.read_exit_code("jobs/b") == 143
    assert not group_alive(conn, pgid)

    source = tmp_path / "source"
    make_tree(source)
    conn.upload(source, "tree")
    conn.download("tree", tmp_path / "back")
    assert tree_listing(home / "tree") == tree_listing(source)
    assert tree_listing(tmp_path / "back") == tree_listing(source)

    digest = hashlib.sha256((source / "run.sh").read_bytes()).hexdigest()
    assert conn.sha256(["tree/run.sh", "tree/missing"]) == {"tree/run.sh": digest}
    assert conn.exists("tree/sub")
    assert not conn.exists("tree/missing")
