"""The Vast.ai API key stays on the submitting machine.

A real ``snakemake --executor vastai`` run against a sandbox started here,
with the key exported as ``VAST_API_KEY`` and also named in ``--envvars``.
Afterwards the key must appear in no log, no pool database byte, no
instance record the sandbox stored and no file of an instance.
"""

from __future__ import annotations

import secrets
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vastai

from tests.test_bad_input import isolated_env
from vastai_pool.sandbox import FaultHooks, Sandbox
from vastai_pool.sandbox.instance import Instance

RUN_TIMEOUT = 300
SNAKEFILE = """
rule all:
    input: "env_a.txt", "env_b.txt"

rule dump_env:
    output: "env_{name}.txt"
    shell: "env > {output}; cat $HOME/.bash_history 2>/dev/null >> {output} || true"
"""


class RecordingHooks(FaultHooks):
    """No faults; remembers every instance the sandbox boots."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.instances: dict[int, Instance] = {}

    def boot_fault(self, instance_id: int) -> None:
        instance = self.sandbox.market.get(instance_id)
        if instance is not None:
            self.instances.setdefault(instance_id, instance)
        return None


@pytest.fixture
def secret_sandbox(tmp_path: Path) -> Iterator[tuple[Sandbox, RecordingHooks]]:
    key = f"vastsecret{secrets.token_hex(20)}"
    sandbox = Sandbox(api_key=key, boot_seconds=0.3, state_dir=tmp_path / "sandbox")
    hooks = RecordingHooks(sandbox)
    sandbox.faults = hooks
    sandbox.start()
    try:
        yield sandbox, hooks
    finally:
        sandbox.stop()


def files_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


def holders(paths: list[Path], secret: bytes) -> list[str]:
    return [str(path) for path in paths if secret in path.read_bytes()]


def stored_records(hooks: RecordingHooks) -> list[dict[str, Any]]:
    """The sandbox's record of each instance: its API row and launch spec."""
    records = []
    for instance in hooks.instances.values():
        spec = instance.spec
        records.append(
            {
                "row": instance.row(time.time()),
                "label": instance.label,
                "env": spec.env,
                "onstart": spec.onstart,
                "args": spec.args,
                "extra": spec.extra,
            }
        )
    return records


def run_workflow(
    sandbox: Sandbox, tmp_path: Path, *, key_option: bool
) -> tuple[Path, Path]:
    """Run the workflow; return its directory and the pool database path."""
    secret = sandbox.api_key
    workdir = tmp_path / "workflow"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(textwrap.dedent(SNAKEFILE))
    pool_db = tmp_path / "pool" / "pool.sqlite"
    pool_db.parent.mkdir()
    env = isolated_env(tmp_path)
    env["VAST_API_KEY"] = secret
    key_args = ["--vastai-api-key", secret] if key_option else []
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--executor",
            "vastai",
            "--jobs",
            "2",
            "--vastai-api-url",
            sandbox.url,
            *key_args,
            "--vastai-pool-db",
            str(pool_db),
            "--envvars",
            "VAST_API_KEY",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert (workdir / "env_a.txt").exists()
    if not key_option:
        assert secret not in output
    return workdir, pool_db


def test_api_key_reaches_no_log_label_record_or_instance(
    secret_sandbox: tuple[Sandbox, RecordingHooks], tmp_path: Path
) -> None:
    sandbox, hooks = secret_sandbox
    secret = sandbox.api_key
    workdir, pool_db = run_workflow(sandbox, tmp_path, key_option=False)
    client = vastai.VastAI(api_key=secret, server_url=sandbox.url)

    secret_bytes = secret.encode()
    assert hooks.instances, "the run rented no instance"
    job_outputs = [workdir / "env_a.txt", workdir / "env_b.txt"]
    assert holders(job_outputs, secret_bytes) == []

    snakemake_dir = workdir / ".snakemake"
    logs = files_under(snakemake_dir / "log") + files_under(
        snakemake_dir / "vastai" / "logs"
    )
    assert logs, "the run left no log file"
    assert holders(logs, secret_bytes) == []
    # Every other file Snakemake or the pool keeps for the workflow.
    assert holders(files_under(snakemake_dir), secret_bytes) == []

    database_files = [
        path for path in pool_db.parent.iterdir() if path.name.startswith("pool")
    ]
    assert pool_db in database_files
    assert holders(database_files, secret_bytes) == []

    for row in client.show_instances() or []:
        assert secret not in repr(row)
    for record in stored_records(hooks):
        assert secret not in repr(record), record["row"]["id"]

    for instance_id in hooks.instances:
        home = sandbox.instance_dir(instance_id)
        assert home.exists()
        assert holders(files_under(home.parent), secret_bytes) == []

    private_keys = [
        path
        for path in pool_db.parent.iterdir()
        if path.is_file() and b"PRIVATE KEY" in path.read_bytes()
    ]
    assert private_keys, f"no SSH private key next to {pool_db}"
    for path in private_keys:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_api_key_option_warns_about_snakemake_log(
    secret_sandbox: tuple[Sandbox, RecordingHooks], tmp_path: Path
) -> None:
    # Snakemake writes its command line, the key included, to .snakemake/log,
    # which the plugin cannot redact, so it logs a warning naming the safe way.
    sandbox, _ = secret_sandbox
    workdir, _ = run_workflow(sandbox, tmp_path, key_option=True)
    logs = files_under(workdir / ".snakemake" / "log")
    text = b"".join(path.read_bytes() for path in logs).decode(errors="replace")
    assert "--vastai-api-key on the command line ends up in" in text
    assert "set VAST_API_KEY" in text
