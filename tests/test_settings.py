"""Plugin settings: defaults, parsing, common settings and credential passing."""

from __future__ import annotations

import base64
import dataclasses
import os
import stat
import subprocess
from pathlib import Path

import configargparse
import pytest
from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry

from snakemake_executor_plugin_vastai import ExecutorSettings, common_settings
from snakemake_executor_plugin_vastai.cloud_credentials import (
    GOOGLE_CREDENTIALS_VARIABLE,
    forwarded_credentials,
    google_credentials_command,
)

# The defaults the plugin catalog page documents for each setting.
CATALOG_DEFAULTS = {
    "api_key": None,
    "gpu_name": None,
    "image": "vastai/pytorch:@vastai-automatic-tag",
    "disk": 40.0,
    "max_price": None,
    "reliability": 0.98,
    "order": "dph_total",
    "geolocation": None,
    "no_datacenter": False,
    "search_query": None,
    "boot_timeout": 1800,
    "no_forward_credentials": False,
    "keep_instances": False,
    "api_url": None,
    "idle_timeout": 300.0,
    "linger": 0.0,
    "max_instances": None,
    "budget": None,
    "pool_db": None,
    "sandbox": False,
}


def test_defaults_match_catalog() -> None:
    defaults = dataclasses.asdict(ExecutorSettings())
    assert defaults == CATALOG_DEFAULTS


@pytest.mark.parametrize(
    ("name", "unit"),
    [
        ("disk", "GB"),
        ("max_price", "US dollars per hour"),
        ("boot_timeout", "Seconds"),
        ("idle_timeout", "Seconds"),
        ("linger", "Seconds"),
        ("budget", "US dollars"),
    ],
)
def test_help_names_unit(name: str, unit: str) -> None:
    fields = {field.name: field for field in dataclasses.fields(ExecutorSettings)}
    assert unit in fields[name].metadata["help"]


def _parser_and_plugin() -> tuple[configargparse.ArgumentParser, object]:
    plugin = ExecutorPluginRegistry().get_plugin("vastai")
    parser = configargparse.ArgumentParser()
    plugin.register_cli_args(parser, "executor")
    return parser, plugin


def test_command_line_parsed_to_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/tester")
    parser, plugin = _parser_and_plugin()
    args = parser.parse_args(
        [
            "--vastai-disk",
            "80",
            "--vastai-max-price",
            "0.75",
            "--vastai-max-instances",
            "3",
            "--vastai-sandbox",
            "--vastai-no-datacenter",
            "--vastai-pool-db",
            "~/pool.sqlite",
            "--vastai-gpu-name",
            "RTX_4090",
        ]
    )
    settings = plugin.get_settings(args)
    assert settings.disk == 80.0
    assert settings.max_price == 0.75
    assert settings.max_instances == 3
    assert settings.sandbox is True
    assert settings.no_datacenter is True
    assert settings.pool_db == Path("/home/tester/pool.sqlite")
    assert settings.gpu_name == "RTX_4090"
    assert settings.idle_timeout == 300.0


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAKEMAKE_VASTAI_API_KEY", "key-from-env")
    parser, plugin = _parser_and_plugin()
    settings = plugin.get_settings(parser.parse_args([]))
    assert settings.api_key == "key-from-env"


def test_common_settings_ship_files_over_ssh() -> None:
    assert common_settings.non_local_exec is True
    assert common_settings.implies_no_shared_fs is True
    # The plugin uploads sources and inputs itself; no storage provider needed.
    assert common_settings.can_transfer_local_files is True
    assert common_settings.job_deploy_sources is False
    assert common_settings.auto_deploy_default_storage_provider is False
    # Environment variables travel in the job's environment, not its command.
    assert common_settings.pass_envvar_declarations_to_cmd is False


def test_forwarded_credentials_select_cloud_variables(tmp_path: Path) -> None:
    google_file = tmp_path / "service-account.json"
    google_file.write_text('{"type": "service_account"}')
    environ = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AZURE_STORAGE_ACCOUNT": "account",
        "AWS_EMPTY": "",
        "HOME": "/home/tester",
        "VAST_API_KEY": "vast-key",
        "GOOGLE_APPLICATION_CREDENTIALS": str(google_file),
    }
    forwarded = forwarded_credentials(environ, tmp_path)
    assert (
        forwarded.pop(GOOGLE_CREDENTIALS_VARIABLE)
        == base64.b64encode(b'{"type": "service_account"}').decode()
    )
    assert forwarded == {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AZURE_STORAGE_ACCOUNT": "account",
    }


def test_forwarded_credentials_use_gcloud_default(tmp_path: Path) -> None:
    default = tmp_path / ".config" / "gcloud" / "application_default_credentials.json"
    default.parent.mkdir(parents=True)
    default.write_text("{}")
    forwarded = forwarded_credentials({}, tmp_path)
    assert forwarded == {GOOGLE_CREDENTIALS_VARIABLE: base64.b64encode(b"{}").decode()}


def test_google_credentials_recreated_on_instance(tmp_path: Path) -> None:
    content = '{"type": "authorized_user"}'
    script = (
        google_credentials_command()
        + ' && cat "$GOOGLE_APPLICATION_CREDENTIALS"'
        + f' && echo " ${{{GOOGLE_CREDENTIALS_VARIABLE}:-unset}}"'
    )
    result = subprocess.run(
        ["sh", "-c", script],
        cwd=tmp_path,
        env={
            "PATH": os.environ["PATH"],
            GOOGLE_CREDENTIALS_VARIABLE: base64.b64encode(content.encode()).decode(),
        },
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == content + " unset\n"
    written = tmp_path / ".snakemake" / "vastai" / "google-credentials.json"
    assert written.read_text() == content
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
