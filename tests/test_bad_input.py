"""Invalid resources and settings fail a real Snakemake run before anything is rented.

Each test runs ``snakemake --executor vastai`` in a subprocess against a
sandbox marketplace started by the test, then reads the sandbox's ledger.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from vastai_pool.sandbox import Sandbox

# Seconds one Snakemake run may take; these runs stop before any rental.
RUN_TIMEOUT = 120


def isolated_env(tmp_path: Path) -> dict[str, str]:
    """Return an environment in which no Vast.ai key or pool file of the user is
    visible: HOME and the XDG directories point into ``tmp_path``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("VAST", "SNAKEMAKE_VASTAI", "XDG_"))
    }
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    env["XDG_DATA_HOME"] = str(home / ".local" / "share")
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    return env


def run_snakemake(
    tmp_path: Path, snakefile: str, *args: str
) -> subprocess.CompletedProcess[str]:
    workdir = tmp_path / "workflow"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(textwrap.dedent(snakefile))
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--executor",
        "vastai",
        "--jobs",
        "1",
        "--vastai-pool-db",
        str(tmp_path / "pool.sqlite"),
        *args,
    ]
    return subprocess.run(
        command,
        cwd=workdir,
        env=isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def run_against(
    sandbox: Sandbox, tmp_path: Path, resources: str
) -> subprocess.CompletedProcess[str]:
    snakefile = f"""
        rule train:
            output: "model.pt"
            resources: {resources}
            shell: "touch {{output}}"
        """
    return run_snakemake(
        tmp_path,
        snakefile,
        "--vastai-api-url",
        sandbox.url,
        "--vastai-api-key",
        sandbox.api_key,
    )


def rented(sandbox: Sandbox) -> int:
    return sandbox.ledger()["rented"]


def output_of(result: subprocess.CompletedProcess[str]) -> str:
    # Snakemake prints its errors to stderr; the join keeps the assert
    # messages readable when a test fails.
    return result.stdout + result.stderr


def test_gpu_not_integer(sandbox: Sandbox, tmp_path: Path) -> None:
    result = run_against(sandbox, tmp_path, 'gpu="two"')
    output = output_of(result)
    assert result.returncode != 0, output
    assert "Invalid resource gpu='two' of rule train" in output
    assert "positive integer" in output
    assert rented(sandbox) == 0


def test_gpu_negative(sandbox: Sandbox, tmp_path: Path) -> None:
    result = run_against(sandbox, tmp_path, "gpu=-1")
    output = output_of(result)
    assert result.returncode != 0, output
    assert "gpu=-1 of rule train" in output
    assert "positive integer" in output
    assert rented(sandbox) == 0


def test_disk_negative(sandbox: Sandbox, tmp_path: Path) -> None:
    result = run_against(sandbox, tmp_path, "disk_mb=-1000")
    output = output_of(result)
    assert result.returncode != 0, output
    assert "disk_mb=-1000 of rule train" in output
    assert "non-negative number of megabytes" in output
    assert rented(sandbox) == 0


def test_query_unparsable(sandbox: Sandbox, tmp_path: Path) -> None:
    result = run_against(sandbox, tmp_path, 'vastai_query="gpu_name = RTX 4090"')
    output = output_of(result)
    assert result.returncode != 0, output
    assert "vastai_query='gpu_name = RTX 4090' of rule train" in output
    assert "underscores for spaces" in output
    assert rented(sandbox) == 0


def test_gpu_model_not_on_market(sandbox: Sandbox, tmp_path: Path) -> None:
    result = run_against(sandbox, tmp_path, 'gpu_model="Imaginary_GPU_9000"')
    output = output_of(result)
    assert result.returncode != 0, output
    assert "No Vast.ai offer for rule train" in output
    assert "gpu_name=Imaginary_GPU_9000" in output
    assert "Check the GPU model (Imaginary GPU 9000)" in output
    assert rented(sandbox) == 0


def test_api_key_missing(tmp_path: Path) -> None:
    snakefile = """
        rule train:
            output: "model.pt"
            shell: "touch {output}"
        """
    # The URL is never contacted: the key is checked first.
    result = run_snakemake(
        tmp_path, snakefile, "--vastai-api-url", "http://127.0.0.1:9"
    )
    output = output_of(result)
    assert result.returncode != 0, output
    assert "No Vast.ai API key found" in output
    assert "--vastai-api-key" in output
    assert "VAST_API_KEY" in output
    assert "--vastai-sandbox" in output
    assert not (tmp_path / "workflow" / "model.pt").exists()


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--vastai-geolocation", "Europe", "--vastai-geolocation 'Europe'"),
        ("--vastai-reliability", "2", "--vastai-reliability 2.0"),
    ],
)
def test_setting_invalid(
    sandbox: Sandbox, tmp_path: Path, option: str, value: str, expected: str
) -> None:
    snakefile = """
        rule train:
            output: "model.pt"
            shell: "touch {output}"
        """
    result = run_snakemake(
        tmp_path,
        snakefile,
        "--vastai-api-url",
        sandbox.url,
        "--vastai-api-key",
        sandbox.api_key,
        option,
        value,
    )
    output = output_of(result)
    assert result.returncode != 0, output
    assert expected in output
    assert rented(sandbox) == 0


def test_downstream_bad_resource_rents_nothing(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    snakefile = """
        rule all:
            input: "model.pt"

        rule prepare:
            output: "data.txt"
            resources: gpu=1
            shell: "echo data > {output}"

        rule train:
            input: "data.txt"
            output: "model.pt"
            resources: gpu=-1
            shell: "cp {input} {output}"
        """
    result = run_snakemake(
        tmp_path,
        snakefile,
        "--vastai-api-url",
        sandbox.url,
        "--vastai-api-key",
        sandbox.api_key,
    )
    output = output_of(result)
    assert result.returncode != 0, output
    assert "gpu=-1 of rule train" in output
    assert rented(sandbox) == 0
    assert not (tmp_path / "workflow" / "data.txt").exists()


def test_unknown_country_code(sandbox: Sandbox, tmp_path: Path) -> None:
    result = run_snakemake(
        tmp_path,
        """
        rule train:
            output: "model.pt"
            resources: gpu=1
            shell: "touch {output}"
        """,
        "--vastai-api-url",
        sandbox.url,
        "--vastai-api-key",
        sandbox.api_key,
        "--vastai-geolocation",
        "DE,XX",
    )
    output = output_of(result)
    assert result.returncode != 0, output
    assert "Invalid --vastai-geolocation 'DE,XX'" in output
    assert "XX is not an ISO 3166-1 country code" in output
    assert rented(sandbox) == 0
