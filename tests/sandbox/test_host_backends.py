"""Choosing the sandbox's SSH host backend: argument, environment, CLI flag."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from vastai_pool.sandbox import Sandbox, cli, openssh_host
from vastai_pool.sandbox.hosts import HOSTS_VARIABLE, HostBackendError


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vastai-pool")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_default_is_paramiko(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(HOSTS_VARIABLE, raising=False)

    sandbox = Sandbox(state_dir=tmp_path / "sb")

    assert sandbox.hosts == "paramiko"


def test_environment_variable_selects_backend(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(HOSTS_VARIABLE, "paramiko")

    sandbox = Sandbox(state_dir=tmp_path / "sb")

    assert sandbox.hosts == "paramiko"


def test_argument_overrides_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(HOSTS_VARIABLE, "no-such-backend")

    sandbox = Sandbox(state_dir=tmp_path / "sb", hosts="paramiko")

    assert sandbox.hosts == "paramiko"


def test_invalid_argument_names_value_and_choices(tmp_path: Path) -> None:
    with pytest.raises(HostBackendError) as raised:
        Sandbox(state_dir=tmp_path / "sb", hosts="dropbear")

    message = str(raised.value)
    assert "'dropbear'" in message
    assert "paramiko, openssh" in message


def test_invalid_environment_names_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(HOSTS_VARIABLE, "dropbear")

    with pytest.raises(HostBackendError) as raised:
        Sandbox(state_dir=tmp_path / "sb")

    message = str(raised.value)
    assert HOSTS_VARIABLE in message
    assert "'dropbear'" in message
    assert "paramiko, openssh" in message


def test_openssh_without_root_points_to_paramiko(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(openssh_host.os, "geteuid", lambda: 1000)

    with pytest.raises(HostBackendError) as raised:
        Sandbox(state_dir=tmp_path / "sb", hosts="openssh")

    message = str(raised.value)
    assert "needs root" in message
    assert "paramiko" in message
    assert not (tmp_path / "sb").exists()


def test_openssh_rejects_state_dir_under_root(tmp_path: Path) -> None:
    if openssh_host.openssh_unavailable_reason() is not None:
        pytest.skip("the openssh backend cannot run here, so no path is checked")

    with pytest.raises(HostBackendError, match="state directory /root/"):
        Sandbox(state_dir=Path("/root/vastai-sandbox-never-created"), hosts="openssh")

    assert not Path("/root/vastai-sandbox-never-created").exists()


def test_serve_flag_rejects_unknown_backend(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        serve_parser().parse_args(["sandbox", "serve", "--hosts", "dropbear"])

    assert raised.value.code == 2
    assert "invalid choice: 'dropbear'" in capsys.readouterr().err


def test_serve_reports_invalid_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(HOSTS_VARIABLE, "dropbear")
    args = serve_parser().parse_args(["sandbox", "serve"])

    code = args.func(args)

    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: invalid VASTAI_SANDBOX_HOSTS value 'dropbear'")
