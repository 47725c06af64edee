"""Local cloud-storage credentials passed to jobs, so storage plugins work remotely.

The passed values are visible to the host that runs the instance, which is
why ``--vastai-no-forward-credentials`` turns this off.
"""

from __future__ import annotations

import base64
import logging
import shlex
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

FORWARDED_PREFIXES = ("AWS_", "AZURE_STORAGE_")
GOOGLE_PROJECT_VARIABLE = "GOOGLE_CLOUD_PROJECT"

# The Google credentials are a file, so its content travels base64-encoded in
# this variable and the job command writes it back to a file.
GOOGLE_CREDENTIALS_VARIABLE = "SNAKEMAKE_VASTAI_GOOGLE_CREDENTIALS_B64"
# Relative to the job's working directory on the instance.
REMOTE_GOOGLE_CREDENTIALS = ".snakemake/vastai/google-credentials.json"


def google_credentials_file(environ: Mapping[str, str], home: Path) -> Path | None:
    """Return the Google credentials file in use, as Google's client libraries find it.

    That is ``GOOGLE_APPLICATION_CREDENTIALS``, else the application default
    credentials that ``gcloud auth application-default login`` writes.
    """
    explicit = environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if explicit:
        return Path(explicit).expanduser()
    default = home / ".config" / "gcloud" / "application_default_credentials.json"
    return default if default.is_file() else None


def forwarded_credentials(environ: Mapping[str, str], home: Path) -> dict[str, str]:
    """Return the variables to pass to jobs: AWS_*, AZURE_STORAGE_* and Google's."""
    forwarded = {
        name: value
        for name, value in environ.items()
        if name.startswith(FORWARDED_PREFIXES) and value
    }
    if environ.get(GOOGLE_PROJECT_VARIABLE):
        forwarded[GOOGLE_PROJECT_VARIABLE] = environ[GOOGLE_PROJECT_VARIABLE]
    path = google_credentials_file(environ, home)
    if path is not None:
        try:
            content = path.read_bytes()
        except OSError as exc:
            logger.warning(
                "Not passing the Google credentials file %s to jobs: %s", path, exc
            )
        else:
            forwarded[GOOGLE_CREDENTIALS_VARIABLE] = base64.b64encode(content).decode()
    return forwarded


def google_credentials_command() -> str:
    """Return the shell commands that recreate the Google credentials file on
    the instance (mode 0600) and point ``GOOGLE_APPLICATION_CREDENTIALS`` at it."""
    target = shlex.quote(REMOTE_GOOGLE_CREDENTIALS)
    return (
        f'(umask 077 && mkdir -p "$(dirname {target})" && '
        f'printf %s "${GOOGLE_CREDENTIALS_VARIABLE}" | base64 -d > {target}) && '
        f'export GOOGLE_APPLICATION_CREDENTIALS="$PWD/"{target} && '
        f"unset {GOOGLE_CREDENTIALS_VARIABLE}"
    )
