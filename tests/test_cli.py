"""The ``vastai-pool`` command and the credential resolution it shares."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from vastai_pool import store as pool_store
from vastai_pool.cli import iso_time, main
from vastai_pool.credentials import DEFAULT_API_URL, resolve_api_key, resolve_api_url
from vastai_pool.errors import ConfigError
from vastai_pool.models import DestroyReason, InstanceState
from vastai_pool.requirements import Hardware
from vastai_pool.store import Store, account_id

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

API_KEY = "test-key"
HARDWARE = Hardware(
    num_gpus=2,
    gpu_name="RTX 4090",
    cpu_cores_effective=16.0,
    cpu_ram_mb=64000.0,
    disk_gb=50.0,
    dph_total=0.75,
    reliability=0.99,
    datacenter=True,
    country="US",
)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("VAST_API_KEY", "SNAKEMAKE_VASTAI_API_KEY", "VAST_URL"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))


@pytest.fixture
def closed_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "pool.sqlite"


def add_instance(
    store: Store,
    run_id: str,
    account: str,
    *,
    label: str,
    vast_id: int,
    state: InstanceState = InstanceState.IDLE,
    keep: bool = False,
) -> int:
    pk = pool_store.record_rental(
        store,
        run_id=run_id,
        account=account,
        label=label,
        offer_id=vast_id + 100,
        machine_id=None,
        image="python:3.11",
        extra_query="",
        hardware=HARDWARE,
        keep=keep,
    )
    pool_store.transition(
        store, pk, InstanceState.BOOTING, why="created", vast_id=vast_id
    )
    pool_store.transition(store, pk, InstanceState.IDLE, why="prepared")
    if state is not InstanceState.IDLE:
        pool_store.transition(store, pk, state, why="test setup")
    return pk


def fill_pool(db_path: Path, api_url: str, api_key: str = API_KEY) -> dict[str, int]:
    """Write an ended run's idle instance, a live run's idle instance, a kept
    instance and a destroyed one; return their pks by name."""
    account = account_id(api_url, api_key)
    with Store(db_path) as store:
        ended = pool_store.start_run(
            store, account=account, workdir="/w", budget_usd=None, linger_seconds=0
        )
        live = pool_store.start_run(
            store,
            account=account,
            workdir="/w",
            budget_usd=None,
            linger_seconds=0,
            idle_timeout=300,
        )
        pks = {
            "orphan": add_instance(store, ended, account, label="orphan", vast_id=11),
            "live": add_instance(store, live, account, label="live", vast_id=12),
            "kept": add_instance(
                store,
                ended,
                account,
                label="kept",
                vast_id=13,
                state=InstanceState.KEPT,
                keep=True,
            ),
            "gone": add_instance(
                store,
                ended,
                account,
                label="gone",
                vast_id=14,
                state=InstanceState.DESTROYED,
            ),
        }
        pool_store.end_run(store, ended)
    return pks


def states(db_path: Path) -> dict[str, InstanceState]:
    with Store(db_path) as store:
        records = pool_store.list_instances(store, include_destroyed=True)
    return {record.label: record.state for record in records}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# Credentials -----------------------------------------------------------------


def test_api_url_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_api_url(None) == DEFAULT_API_URL
    monkeypatch.setenv("VAST_URL", "http://127.0.0.1:5000/")
    assert resolve_api_url(None) == "http://127.0.0.1:5000"
    assert resolve_api_url("http://localhost:1/") == "http://localhost:1"


def test_api_key_resolution_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    legacy = tmp_path / "home" / ".vast_api_key"
    legacy.parent.mkdir(parents=True)
    legacy.write_text("from-legacy\n")
    assert resolve_api_key(None) == "from-legacy"

    xdg = tmp_path / "config" / "vastai" / "vast_api_key"
    xdg.parent.mkdir(parents=True)
    xdg.write_text("from-xdg\n")
    assert resolve_api_key(None) == "from-xdg"

    monkeypatch.setenv("VAST_API_KEY", "from-vast-env")
    assert resolve_api_key(None) == "from-vast-env"
    monkeypatch.setenv("SNAKEMAKE_VASTAI_API_KEY", "from-plugin-env")
    assert resolve_api_key(None) == "from-plugin-env"
    assert resolve_api_key("explicit") == "explicit"


def test_missing_api_key_explains_fix() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_api_key(None)
    message = str(caught.value)
    assert "--vastai-api-key" in message
    assert "VAST_API_KEY" in message
    assert "vastai set api-key" in message
    assert "--vastai-sandbox" in message


# Help and errors ---------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["ls"], ["gc"], ["sandbox"]])
def test_help_exits_zero(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main([*command, "--help"])
    assert caught.value.code == 0
    assert "usage: vastai-pool" in capsys.readouterr().out


def test_corrupt_db_is_one_line_error(
    db_path: Path, closed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path.write_bytes(b"not a database" * 100)

    code, out, err = run_cli(
        capsys, "ls", "--db", str(db_path), "--api-url", closed_url
    )

    assert code == 1
    assert out == ""
    assert err.startswith("vastai-pool: error: Pool database ")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert db_path.read_bytes() == b"not a database" * 100


# ls ---------------------------------------------------------------------------


def test_ls_json_without_reachable_api(
    db_path: Path, closed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_pool(db_path, closed_url)

    code, out, err = run_cli(
        capsys,
        "ls",
        "--json",
        "--db",
        str(db_path),
        "--api-url",
        closed_url,
        "--api-key",
        API_KEY,
    )

    assert code == 0
    assert err.count("\n") == 1
    assert "states are from the database only" in err
    rows = {row["label"]: row for row in json.loads(out)}
    assert set(rows) == {"orphan", "live", "kept"}
    live = rows["live"]
    assert live["id"] == 12
    assert live["state"] == "idle"
    assert live["gpu_name"] == "RTX 4090"
    assert live["num_gpus"] == 2
    assert live["dph_total"] == 0.75
    assert live["jobs"] == 0
    assert live["rented_at"].endswith("Z")
    assert live["destroyed_at"] is None
    assert live["kept"] is False
    assert live["deadline"] is not None
    assert rows["kept"]["kept"] is True
    assert rows["orphan"]["deadline"] is None
    assert states(db_path)["live"] is InstanceState.IDLE


def test_ls_all_includes_destroyed(
    db_path: Path, closed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_pool(db_path, closed_url)

    code, out, _ = run_cli(
        capsys,
        "ls",
        "--all",
        "--json",
        "--db",
        str(db_path),
        "--api-url",
        closed_url,
        "--api-key",
        API_KEY,
    )

    assert code == 0
    rows = {row["label"]: row for row in json.loads(out)}
    assert rows["gone"]["state"] == "destroyed"
    assert rows["gone"]["destroyed_at"] is not None


def test_ls_without_key_lists_every_account(
    db_path: Path, closed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_pool(db_path, closed_url, api_key="key-one")
    with Store(db_path) as store:
        other = account_id(closed_url, "key-two")
        run_id = pool_store.start_run(
            store, account=other, workdir="/w", budget_usd=None, linger_seconds=0
        )
        add_instance(store, run_id, other, label="other-account", vast_id=21)

    code, out, err = run_cli(capsys, "ls", "--db", str(db_path))

    assert code == 0
    assert "no API key found" in err
    assert "other-account" not in out  # the table shows ids, not labels
    lines = out.splitlines()
    assert lines[0].split() == [
        "id",
        "state",
        "gpu",
        "$/h",
        "jobs",
        "rented",
        "destroyed",
        "kept",
        "deadline",
    ]
    assert sorted(line.split()[0] for line in lines[1:]) == ["11", "12", "13", "21"]
    assert "2x RTX 4090" in lines[1]


def test_ls_keyed_shows_only_its_account(
    db_path: Path, closed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_pool(db_path, closed_url, api_key="key-one")

    code, out, _ = run_cli(
        capsys,
        "ls",
        "--json",
        "--db",
        str(db_path),
        "--api-url",
        closed_url,
        "--api-key",
        "key-two",
    )

    assert code == 0
    assert json.loads(out) == []


# gc ---------------------------------------------------------------------------


def test_gc_dry_run_lists_orphans_only(
    db_path: Path, closed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_pool(db_path, closed_url)
    before = states(db_path)

    code, out, err = run_cli(
        capsys,
        "gc",
        "--dry-run",
        "--db",
        str(db_path),
        "--api-url",
        closed_url,
        "--api-key",
        API_KEY,
    )

    assert code == 0
    assert "database only" in err
    assert out.splitlines() == [
        "would destroy instance 11 orphan (2x RTX 4090, $0.750/h): "
        "idle, and its run is over"
    ]
    assert states(db_path) == before


def test_gc_dry_run_kept(
    db_path: Path, closed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_pool(db_path, closed_url)

    code, out, _ = run_cli(
        capsys,
        "gc",
        "--dry-run",
        "--kept",
        "--db",
        str(db_path),
        "--api-url",
        closed_url,
        "--api-key",
        API_KEY,
    )

    assert code == 0
    destroyed = sorted(line.split()[4] for line in out.splitlines())
    assert destroyed == ["kept", "orphan"]


def test_gc_without_reachable_api_changes_nothing(
    db_path: Path, closed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_pool(db_path, closed_url)
    before = states(db_path)

    code, out, err = run_cli(
        capsys,
        "gc",
        "--db",
        str(db_path),
        "--api-url",
        closed_url,
        "--api-key",
        API_KEY,
    )

    assert code == 1
    assert out == ""
    assert err.startswith("vastai-pool: error: Cannot list the account's instances")
    assert err.count("\n") == 1
    assert states(db_path) == before


def test_gc_without_key_fails(
    db_path: Path, closed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "gc", "--db", str(db_path))

    assert code == 1
    assert "No Vast.ai API key found" in err
    assert err.count("\n") == 1


def test_gc_nothing_to_do(
    db_path: Path, closed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(
        capsys,
        "gc",
        "--dry-run",
        "--db",
        str(db_path),
        "--api-url",
        closed_url,
        "--api-key",
        API_KEY,
    )

    assert code == 0
    assert out == "Nothing to destroy.\n"


# Against the sandbox marketplace ------------------------------------------------


def rent_in_sandbox(sandbox: Sandbox, label: str) -> int:
    import vastai

    client = vastai.VastAI(api_key=sandbox.api_key, server_url=sandbox.url)
    offer = client.search_offers("num_gpus=1", order="dph_total")[0]
    created = client.create_instance(
        offer["id"], image="python:3.11", disk=10, label=label
    )
    return int(created["new_contract"])


def record_sandbox_instance(
    store: Store, sandbox: Sandbox, run_id: str, label: str, vast_id: int, **kw: object
) -> int:
    account = account_id(sandbox.url, sandbox.api_key)
    return add_instance(store, run_id, account, label=label, vast_id=vast_id, **kw)


def test_gc_destroys_sandbox_orphans(
    sandbox: Sandbox, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    account = account_id(sandbox.url, sandbox.api_key)
    orphan_id = rent_in_sandbox(sandbox, "orphan")
    live_id = rent_in_sandbox(sandbox, "live")
    kept_id = rent_in_sandbox(sandbox, "kept")
    with Store(db_path) as store:
        ended = pool_store.start_run(
            store, account=account, workdir="/w", budget_usd=None, linger_seconds=0
        )
        live = pool_store.start_run(
            store, account=account, workdir="/w", budget_usd=None, linger_seconds=0
        )
        record_sandbox_instance(store, sandbox, ended, "orphan", orphan_id)
        record_sandbox_instance(store, sandbox, live, "live", live_id)
        record_sandbox_instance(
            store, sandbox, ended, "kept", kept_id, state=InstanceState.KEPT, keep=True
        )
        pool_store.end_run(store, ended)
    cli_args = [
        "--db",
        str(db_path),
        "--api-url",
        sandbox.url,
        "--api-key",
        sandbox.api_key,
    ]

    code, out, err = run_cli(capsys, "gc", *cli_args)

    assert code == 0, err
    assert out.startswith(f"destroyed instance {orphan_id} orphan ")
    assert out.count("\n") == 1
    assert sorted(sandbox.ledger()["alive"]) == sorted([live_id, kept_id])
    assert sandbox.ledger()["destroyed"] == 1
    with Store(db_path) as store:
        records = {
            record.label: record
            for record in pool_store.list_instances(store, include_destroyed=True)
        }
        events = pool_store.instance_events(store, records["orphan"].pk)
    assert records["orphan"].state is InstanceState.DESTROYED
    assert records["orphan"].destroy_reason is DestroyReason.GC
    assert [event.kind for event in events][-2:] == ["destroying", "destroyed"]
    assert records["live"].state is InstanceState.IDLE

    code, out, err = run_cli(capsys, "gc", "--kept", *cli_args)

    assert code == 0, err
    assert out.startswith(f"destroyed instance {kept_id} kept ")
    assert sandbox.ledger()["alive"] == [live_id]
    assert states(db_path)["kept"] is InstanceState.DESTROYED


def test_ls_marks_instance_destroyed_outside_lost(
    sandbox: Sandbox, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import vastai

    account = account_id(sandbox.url, sandbox.api_key)
    vanished_id = rent_in_sandbox(sandbox, "vanished")
    staying_id = rent_in_sandbox(sandbox, "staying")
    with Store(db_path) as store:
        run_id = pool_store.start_run(
            store, account=account, workdir="/w", budget_usd=None, linger_seconds=0
        )
        record_sandbox_instance(store, sandbox, run_id, "vanished", vanished_id)
        record_sandbox_instance(store, sandbox, run_id, "staying", staying_id)
    client = vastai.VastAI(api_key=sandbox.api_key, server_url=sandbox.url)
    client.destroy_instance(id=vanished_id)

    code, out, err = run_cli(
        capsys,
        "ls",
        "--all",
        "--json",
        "--db",
        str(db_path),
        "--api-url",
        sandbox.url,
        "--api-key",
        sandbox.api_key,
    )

    assert code == 0, err
    assert "database only" not in err
    rows = {row["id"]: row for row in json.loads(out)}
    assert rows[vanished_id]["state"] == "lost"
    assert rows[vanished_id]["destroy_reason"] == "gone"
    assert rows[staying_id]["state"] == "idle"
    assert rows[staying_id]["api_status"] is not None


def test_gc_skips_run_alive_on_this_host(db_path: Path) -> None:
    # A run of this very process is alive; one of a dead pid is over.
    with Store(db_path) as store:
        run_id = pool_store.start_run(
            store, account="a#1", workdir="/w", budget_usd=None, linger_seconds=0
        )
        assert run_id in pool_store.live_run_ids(store)
        run = pool_store.get_run(store, run_id)
    assert run.pid == os.getpid()
    assert not pool_store.run_is_over(run, time.time())


def test_gc_retries_failed_destroy(
    sandbox: Sandbox, db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vastai_pool.sandbox import FaultHooks, Reply

    class RejectDestroy(FaultHooks):
        def http_reply(self, method: str, path: str) -> Reply | None:
            if method == "DELETE":
                body = {"success": False, "error": "not_authorized", "msg": "no"}
                return Reply(403, body)
            return None

    account = account_id(sandbox.url, sandbox.api_key)
    orphan_id = rent_in_sandbox(sandbox, "orphan")
    with Store(db_path) as store:
        ended = pool_store.start_run(
            store, account=account, workdir="/w", budget_usd=None, linger_seconds=0
        )
        record_sandbox_instance(store, sandbox, ended, "orphan", orphan_id)
        pool_store.end_run(store, ended)
    cli_args = [
        "--db",
        str(db_path),
        "--api-url",
        sandbox.url,
        "--api-key",
        sandbox.api_key,
    ]
    sandbox.faults = RejectDestroy()

    code, out, err = run_cli(capsys, "gc", *cli_args)

    assert code == 1
    assert f"destroying instance {orphan_id} orphan" in err
    assert "failed" in err
    assert states(db_path)["orphan"] is InstanceState.DESTROYING
    assert sandbox.ledger()["alive"] == [orphan_id]

    sandbox.faults = FaultHooks()
    code, out, err = run_cli(capsys, "gc", *cli_args)

    assert code == 0, err
    assert out.startswith(f"destroyed instance {orphan_id} orphan ")
    assert states(db_path)["orphan"] is InstanceState.DESTROYED
    assert sandbox.ledger()["alive"] == []


def test_ls_deadline_of_lingering_instance_is_its_linger_deadline(
    db_path: Path, closed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fill_pool(db_path, closed_url)
    until = time.time() + 3600
    with Store(db_path) as store:
        (orphan,) = [r for r in pool_store.list_instances(store) if r.label == "orphan"]
        assert pool_store.set_linger(store, orphan, until, why="test") is not None

    code, out, _ = run_cli(
        capsys, "ls", "--json", "--db", str(db_path), "--api-url", closed_url
    )

    assert code == 0
    rows = {row["label"]: row for row in json.loads(out)}
    assert rows["orphan"]["deadline"] == iso_time(until)


def test_reap_without_pool_file_explains_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(
        capsys, "reap", "--db", str(tmp_path / "none.sqlite"), "--api-key", API_KEY
    )
    assert code == 1
    assert "No pool database at" in err
    assert "--db" in err


def test_ls_missing_db_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo" / "pool.sqlite"
    code, out, err = run_cli(capsys, "ls", "--json", "--db", str(missing))

    assert code == 0
    assert json.loads(out) == []
    assert f"no pool database at {missing}" in err
    assert not (tmp_path / "typo").exists()


def test_ls_points_busy_orphan_to_gc(
    db_path: Path, closed_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    account = account_id(closed_url, API_KEY)
    with Store(db_path) as store:
        crashed = pool_store.start_run(
            store, account=account, workdir="/w", budget_usd=None, linger_seconds=0
        )
        live = pool_store.start_run(
            store, account=account, workdir="/w", budget_usd=None, linger_seconds=0
        )
        add_instance(
            store, crashed, account, label="a", vast_id=21, state=InstanceState.BUSY
        )
        add_instance(
            store, live, account, label="b", vast_id=22, state=InstanceState.BUSY
        )
        # An ended run replaces a crash here, because either way no process tends it.
        pool_store.end_run(store, crashed)

    code, _, err = run_cli(
        capsys,
        "ls",
        "--db",
        str(db_path),
        "--api-url",
        closed_url,
        "--api-key",
        API_KEY,
    )

    assert code == 0
    assert "1 instance(s) belong to a run that is over" in err
    assert f"gc --db {db_path}" in err
