"""Resolution of the Vast.ai API URL and key, shared by the plugin and the CLI.

The order follows the official ``vastai`` SDK (1.9.1, ``vastai/_base.py``):
an explicit value, then the environment, then the key files the SDK reads.
"""

from __future__ import annotations

import os
from pathlib import Path

from vastai_pool.errors import ConfigError

DEFAULT_API_URL = "https://console.vast.ai"

# Checked before VAST_API_KEY, so a workflow can use another key than the CLI.
PLUGIN_KEY_VARIABLE = "SNAKEMAKE_VASTAI_API_KEY"
SDK_KEY_VARIABLE = "VAST_API_KEY"


def resolve_api_url(explicit: str | None) -> str:
    """Return the API URL: ``explicit``, else ``$VAST_URL``, else the SDK default.

    A trailing ``/`` is stripped because the SDK appends paths that start
    with ``/`` and would send ``//api/v0/...``.
    """
    for candidate in (explicit, os.environ.get("VAST_URL")):
        if candidate and candidate.strip():
            return candidate.strip().rstrip("/")
    return DEFAULT_API_URL


def api_key_files() -> list[Path]:
    """Return the key files the SDK reads, in the order it reads them."""
    files = []
    xdg_config = os.environ.get("XDG_CONFIG_HOME")
    if xdg_config:
        files.append(Path(xdg_config) / "vastai" / "vast_api_key")
    files.append(Path.home() / ".config" / "vastai" / "vast_api_key")
    files.append(Path.home() / ".vast_api_key")
    return list(dict.fromkeys(files))


def resolve_api_key(explicit: str | None) -> str:
    """Return the API key from ``explicit``, the environment or a key file.

    Raises ``ConfigError`` saying how to set a key when none is found.
    """
    if explicit and explicit.strip():
        return explicit.strip()
    for variable in (PLUGIN_KEY_VARIABLE, SDK_KEY_VARIABLE):
        value = os.environ.get(variable, "").strip()
        if value:
            return value
    for path in api_key_files():
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
        except OSError as exc:
            raise ConfigError(
                f"Cannot read the Vast.ai API key file {path}: {exc}. "
                "Fix its permissions or pass --vastai-api-key."
            ) from exc
        if value:
            return value
    searched = ", ".join(str(path) for path in api_key_files())
    raise ConfigError(
        "No Vast.ai API key found. Pass --vastai-api-key (--api-key for "
        f"vastai-pool), set {SDK_KEY_VARIABLE}, or run `vastai set api-key KEY` "
        f"(searched {PLUGIN_KEY_VARIABLE}, {SDK_KEY_VARIABLE} and {searched}). "
        "To try the plugin without an account, --vastai-sandbox runs against a "
        "free local sandbox marketplace instead."
    )
