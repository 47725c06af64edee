"""Snakemake's own executor test suite, run against a sandbox marketplace.

The suite's ``simple`` and ``groups`` workflows run without a shared file
system, so every input, output and log travels over SSH.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from snakemake.common.tests import TestWorkflowsLocalStorageBase
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor

from snakemake_executor_plugin_vastai import ExecutorSettings

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox


class TestWorkflows(TestWorkflowsLocalStorageBase):
    __test__ = True

    @pytest.fixture(autouse=True)
    def marketplace(self, sandbox: Sandbox, tmp_path: Path) -> Iterator[None]:
        self.sandbox = sandbox
        self.pool_db = tmp_path / "pool.sqlite"
        yield
        ledger = sandbox.ledger()
        assert ledger["alive"] == []
        assert ledger["rented"] >= 1

    def get_executor(self) -> str:
        return "vastai"

    def get_executor_settings(self) -> ExecutorSettings:
        return ExecutorSettings(
            api_url=self.sandbox.url,
            api_key=self.sandbox.api_key,
            pool_db=self.pool_db,
            idle_timeout=30.0,
        )

    def get_assume_shared_fs(self) -> bool:
        return False


def test_cli_sandbox_keeps_pool_in_workflow(tmp_path: Path) -> None:
    workdir = tmp_path / "workflow"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(
        textwrap.dedent(
            """
            rule greet:
                output: "hello.txt"
                shell: "echo hello > {output}"
            """
        )
    )
    home = tmp_path / "home"
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--executor", "vastai", "--jobs", "1"]
        + ["--vastai-sandbox"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert (workdir / "hello.txt").read_text() == "hello\n"
    assert (workdir / ".snakemake" / "vastai" / "pool.sqlite").is_file()
    assert not (home / ".local" / "share" / "snakemake-vastai").exists()
    assert "instances rented" in output


def test_failed_shutdown_step_still_destroys(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_shutdown(self: RemoteExecutor) -> None:
        # Let the status thread end anyway, so it does not outlive the test.
        with self.lock:
            self.wait = False
        raise RuntimeError("status thread did not stop")

    # The first shutdown step fails; closing the pool must still run.
    monkeypatch.setattr(RemoteExecutor, "shutdown", broken_shutdown)
    suite = TestWorkflows()
    suite.sandbox = sandbox
    suite.pool_db = tmp_path / "pool.sqlite"
    with pytest.raises(Exception) as caught:
        suite.run_workflow("simple", tmp_path)
    assert "status thread did not stop" in repr(caught.value)
    ledger = sandbox.ledger()
    assert ledger["rented"] >= 1
    assert ledger["alive"] == []
