"""Settings of the plugin: ``--vastai-NAME`` options and Snakemake's common settings.

This module has no ``from __future__ import annotations``: the plugin
interface reads each field's type at run time to build its argument parser,
and a string annotation would break that. Optional fields give their type in
``metadata["type"]``, because the interface does not unpack ``X | None``.
"""

from dataclasses import dataclass, field
from pathlib import Path

from snakemake_interface_executor_plugins.settings import (
    CommonSettings,
    ExecutorSettingsBase,
)

DEFAULT_IMAGE = "vastai/pytorch:@vastai-automatic-tag"

common_settings = CommonSettings(
    non_local_exec=True,
    implies_no_shared_fs=True,
    # The pool ships the source archive itself, once per instance and
    # checksum, so Snakemake must neither upload it to a storage provider nor
    # prepend ``--deploy-sources`` to the job command.
    job_deploy_sources=False,
    can_transfer_local_files=True,
    pass_default_storage_provider_args=True,
    pass_default_resources_args=True,
    # Environment variables reach the job through the pool's job environment,
    # so secrets do not appear in the command line, the process list or logs.
    pass_envvar_declarations_to_cmd=False,
    # The pool installs storage plugins once per instance (PoolConfig.packages),
    # because a pip install in front of every job would repeat it on warm
    # instances.
    auto_deploy_default_storage_provider=False,
    # Status checks only read the pool's in-memory state, so they are cheap.
    init_seconds_before_status_checks=1,
)


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "Vast.ai API key. Without it the key comes from VAST_API_KEY "
            "or the vastai CLI's key file (~/.config/vastai/vast_api_key). It is "
            "never logged and never stored in the pool database.",
            "env_var": True,
            "type": str,
        },
    )
    gpu_name: str | None = field(
        default=None,
        metadata={
            "help": "Default GPU model for jobs without a gpu_model resource, in "
            "Vast.ai naming with underscores for spaces (e.g. RTX_4090, "
            "H100_SXM), or a comma-separated list of models. Default: any model.",
            "type": str,
        },
    )
    image: str = field(
        default=DEFAULT_IMAGE,
        metadata={
            "help": "Docker image the instances run. It needs python on PATH; "
            "Snakemake is installed at the local version when missing. The "
            "default is Vast.ai's PyTorch image with CUDA matched to each host.",
        },
    )
    disk: float = field(
        default=40.0,
        metadata={
            "help": "Disk space rented with each instance, in GB. A job's disk_mb "
            "resource raises it for that job. Default: 40.",
        },
    )
    max_price: float | None = field(
        default=None,
        metadata={
            "help": "Maximum price of one instance in US dollars per hour "
            "(Vast.ai's dph_total, GPU rental plus storage). Default: no cap.",
            "type": float,
        },
    )
    reliability: float = field(
        default=0.98,
        metadata={
            "help": "Minimum host reliability score between 0 and 1; 0 disables "
            "the filter. Default: 0.98.",
        },
    )
    order: str = field(
        default="dph_total",
        metadata={
            "help": "Order in which matching offers are tried, in vastai search "
            "syntax (a trailing '-' sorts descending, e.g. 'dlperf_usd-' for "
            "performance per dollar). The default tries the cheapest first.",
        },
    )
    geolocation: str | None = field(
        default=None,
        metadata={
            "help": "Region of the hosts: a shortcut (EU, NA, AS, AF, LC, OC) or "
            "comma-separated two-letter country codes (e.g. PL,DE,CZ). Default: "
            "anywhere.",
            "type": str,
        },
    )
    no_datacenter: bool = field(
        default=False,
        metadata={
            "help": "Also rent from hobbyist hosts. By default only datacenter "
            "hosts are rented, which cost a little more and fail less often.",
        },
    )
    search_query: str | None = field(
        default=None,
        metadata={
            "help": "Extra offer filters for every job, in vastai query syntax "
            "(e.g. 'cuda_vers>=12.4 inet_down>=500'). A job's vastai_query "
            "resource adds to it.",
            "type": str,
        },
    )
    boot_timeout: int = field(
        default=1800,
        metadata={
            "help": "Seconds a new instance may take to reach running, image "
            "pull included, before it is destroyed and the job fails. "
            "Default: 1800.",
        },
    )
    no_forward_credentials: bool = field(
        default=False,
        metadata={
            "help": "Do not pass the local AWS_* and AZURE_STORAGE_* variables and "
            "the Google application credentials file to jobs. By default they "
            "are passed, so storage plugins work on the instances.",
        },
    )
    keep_instances: bool = field(
        default=False,
        metadata={
            "help": "Leave instances running after the run for debugging. They "
            "keep billing until `vastai-pool gc --kept` or the Vast.ai console "
            "destroys them.",
        },
    )
    api_url: str | None = field(
        default=None,
        metadata={
            "help": "Base URL of the Vast.ai API. Default: VAST_URL, else "
            "https://console.vast.ai, as in the vastai SDK.",
            "type": str,
        },
    )
    idle_timeout: float = field(
        default=300.0,
        metadata={
            "help": "Seconds an idle instance stays warm during the run before "
            "it is destroyed. Default: 300.",
        },
    )
    linger: float = field(
        default=0.0,
        metadata={
            "help": "Seconds idle instances stay warm after the run ends, so that "
            "the next run with the same pool database can reuse them. "
            "Default: 0.",
        },
    )
    max_instances: int | None = field(
        default=None,
        metadata={
            "help": "Maximum number of instances rented at once; further jobs "
            "wait for a free instance. Default: no limit.",
            "type": int,
        },
    )
    budget: float | None = field(
        default=None,
        metadata={
            "help": "US dollars the run may spend on instances. When it is spent, "
            "nothing new is rented and idle instances are destroyed. Default: "
            "no limit.",
            "type": float,
        },
    )
    pool_db: Path | None = field(
        default=None,
        metadata={
            "help": "Path of the pool's SQLite database. Default: "
            "$XDG_DATA_HOME/snakemake-vastai/pool.sqlite (~/.local/share if "
            "XDG_DATA_HOME is unset).",
            "type": Path,
        },
    )
    sandbox: bool = field(
        default=False,
        metadata={
            "help": "Run against a local sandbox marketplace started for this "
            "run instead of Vast.ai: free, offline, no account needed. Its pool "
            "database and SSH key live in .snakemake/vastai/ of the workflow, "
            "and api-url and api-key are ignored.",
        },
    )
