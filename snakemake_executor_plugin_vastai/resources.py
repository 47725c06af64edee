"""Translation of a job's resources and the settings into the pool's requirements.

Every function here is pure, so the translation can be tested without
Snakemake or a marketplace. Invalid values raise ``WorkflowError`` naming
the rule, the resource, the value and the fix, before anything is rented.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from snakemake_interface_common.exceptions import WorkflowError
from vastai.utils import _regions as SDK_REGIONS

from snakemake_executor_plugin_vastai.countries import COUNTRY_CODES
from snakemake_executor_plugin_vastai.settings import ExecutorSettings
from vastai_pool.api import parse_offer_query
from vastai_pool.errors import ConfigError
from vastai_pool.requirements import Requirements, normalize_gpu_name

# Region shortcuts expand to the country lists of the vastai SDK (1.9.1,
# ``vastai.utils._regions``), so EU means here what ``georegion`` means in
# the vastai CLI.
REGIONS: dict[str, tuple[str, ...]] = {
    region: tuple(dict.fromkeys(codes.split(",")))
    for region, codes in SDK_REGIONS.items()
}

# Characters of Vast.ai GPU model names (e.g. "RTX 4090", "A100 SXM4",
# "RTX 6000Ada"). Brackets, commas, quotes and operators would end the
# ``gpu_name`` term of the offer query.
_GPU_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._+-]*")
_COUNTRY_CODE = re.compile(r"[A-Za-z]{2}")

GPU_RESOURCES = ("gpu", "nvidia_gpu")


def requirements_from_resources(
    resources: Mapping[str, object],
    threads: int,
    rule: str,
    settings: ExecutorSettings,
    *,
    group: str | None = None,
) -> Requirements:
    """Build the requirements of one job of ``rule``, or of a group job.

    For a group job, ``rule`` lists its rules and ``group`` is the group id;
    errors name both.

    Only ``gpu``/``nvidia_gpu``, ``gpu_model``, ``mem_mb``, ``disk_mb`` and
    ``vastai_query`` are read; Snakemake's internal resources (``_cores``,
    ``_nodes``, ``tmpdir``, ``mem``, ``disk``) are ignored because ``mem_mb``
    and ``disk_mb`` already carry their values.
    """
    subject = job_subject(rule, group)
    requirements = Requirements(
        image=settings.image,
        disk_gb=_disk_gb(resources.get("disk_mb"), subject, settings.disk),
        num_gpus=_gpu_count(resources, subject),
        gpu_names=_gpu_names(resources.get("gpu_model"), subject, settings.gpu_name),
        cpu_cores=_count(threads, subject, "threads", minimum=1, fix=_THREADS_FIX),
        mem_mb=_mem_mb(resources.get("mem_mb"), subject),
        max_price=settings.max_price,
        geolocation=parse_geolocation(settings.geolocation),
        datacenter_only=not settings.no_datacenter,
        min_reliability=settings.reliability,
        extra_query=_extra_query(resources.get("vastai_query"), subject, settings),
        order=settings.order,
    )
    _check_query(requirements.offer_query(), subject)
    return requirements


def job_subject(rule: str, group: str | None = None) -> str:
    """Return how messages name a job: ``rule a`` or ``group g (rules a, b)``."""
    return f"rule {rule}" if group is None else f"group {group} (rules {rule})"


def runtime_minutes(
    resources: Mapping[str, object], rule: str, *, group: str | None = None
) -> float | None:
    """Return the ``runtime`` resource in minutes, or None when it is unset."""
    value = resources.get("runtime")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise WorkflowError(
            f"Invalid resource runtime={value!r} of {job_subject(rule, group)}. "
            "Set runtime to a "
            'positive number of minutes or a duration such as "2h", or remove it '
            "for no time limit."
        )
    return float(value)


def parse_geolocation(value: str | None) -> tuple[str, ...]:
    """Expand the geolocation setting into country codes; () means anywhere."""
    if value is None or not value.strip():
        return ()
    text = value.strip().upper()
    if text in REGIONS:
        return REGIONS[text]
    codes = tuple(code.strip() for code in text.split(","))
    if all(_COUNTRY_CODE.fullmatch(code) for code in codes):
        unknown = [code for code in codes if code not in COUNTRY_CODES]
        if unknown:
            raise WorkflowError(
                f"Invalid --vastai-geolocation {value!r}: {', '.join(unknown)} "
                "is not an ISO 3166-1 country code. Use two-letter codes such "
                "as DE,FR,PL, or a region shortcut: " + ", ".join(REGIONS) + "."
            )
        return tuple(dict.fromkeys(codes))
    shortcuts = ", ".join(REGIONS)
    raise WorkflowError(
        f"Invalid --vastai-geolocation {value!r}: it is neither a region shortcut "
        f"({shortcuts}) nor a comma-separated list of two-letter country codes. "
        "Use e.g. --vastai-geolocation EU or --vastai-geolocation DE,FR,PL."
    )


def validate_settings(settings: ExecutorSettings) -> None:
    """Raise ``WorkflowError`` for a setting no job could be placed with."""
    parse_geolocation(settings.geolocation)
    _check_positive("--vastai-disk", settings.disk, "GB, e.g. 40")
    _check_positive("--vastai-boot-timeout", settings.boot_timeout, "seconds")
    if settings.max_price is not None:
        _check_positive("--vastai-max-price", settings.max_price, "US dollars per hour")
    if settings.budget is not None:
        _check_positive("--vastai-budget", settings.budget, "US dollars")
    if settings.max_instances is not None:
        _check_positive("--vastai-max-instances", settings.max_instances, "instances")
    if not 0 <= settings.reliability <= 1:
        raise WorkflowError(
            f"Invalid --vastai-reliability {settings.reliability}: it must lie "
            "between 0 and 1. Use e.g. 0.98, or 0 to disable the filter."
        )
    for name, seconds in (
        ("--vastai-idle-timeout", settings.idle_timeout),
        ("--vastai-linger", settings.linger),
    ):
        if seconds < 0:
            raise WorkflowError(
                f"Invalid {name} {seconds}: it must be 0 or more seconds."
            )
    if settings.gpu_name:
        _gpu_names(None, "the settings", settings.gpu_name)
    if settings.search_query:
        _parse_query(
            settings.search_query,
            what="Invalid --vastai-search-query",
            fix="Fix the setting or remove it.",
        )


_THREADS_FIX = "Set threads to a positive integer."


def _gpu_count(resources: Mapping[str, object], subject: str) -> int:
    given = {name: resources[name] for name in GPU_RESOURCES if name in resources}
    if not given:
        return 1
    fix = (
        "Set it to a positive integer, e.g. gpu=1: Vast.ai rents only GPU "
        "machines, so a rule without GPUs belongs in localrules."
    )
    counts = {
        name: _count(value, subject, name, minimum=1, fix=fix)
        for name, value in given.items()
    }
    if len(set(counts.values())) > 1:
        both = " and ".join(f"{name}={value}" for name, value in counts.items())
        raise WorkflowError(
            f"The resources {both} of {subject} disagree. Set only one of gpu "
            "and nvidia_gpu."
        )
    return next(iter(counts.values()))


def _count(
    value: object, subject: str, resource: str, *, minimum: int, fix: str
) -> int:
    count: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        count = int(value)
    if count is None or count < minimum:
        raise WorkflowError(
            f"Invalid resource {resource}={value!r} of {subject}. {fix}"
        )
    return count


def _gpu_names(value: object, subject: str, default: str | None) -> tuple[str, ...]:
    if value is None or value == "":
        if not default:
            return ()
        value, source = default, f"Invalid --vastai-gpu-name {default!r}"
    else:
        source = f"Invalid resource gpu_model={value!r} of {subject}"
    if not isinstance(value, str):
        raise WorkflowError(
            f"{source}. Set gpu_model to a GPU model in Vast.ai naming, e.g. "
            'gpu_model="RTX_4090", or a comma-separated list of models.'
        )
    names = tuple(normalize_gpu_name(name) for name in value.split(","))
    for name in names:
        if not _GPU_NAME.fullmatch(name):
            raise WorkflowError(
                f"{source}: {name!r} is not a GPU model name. Use Vast.ai naming "
                'with underscores for spaces, e.g. "RTX_4090" or "H100_SXM,A100_SXM4".'
            )
    return tuple(dict.fromkeys(names))


def _mem_mb(value: object, subject: str) -> int | None:
    if value is None:
        return None
    megabytes = _megabytes(value, subject, "mem_mb", example="mem_mb=16000")
    return megabytes or None


def _disk_gb(value: object, subject: str, minimum_gb: float) -> float:
    if value is None:
        return minimum_gb
    megabytes = _megabytes(value, subject, "disk_mb", example="disk_mb=50000")
    # Snakemake's MB are 10**6 bytes, as are Vast.ai's GB 10**9 bytes; whole
    # GB keep the offer query and the instance allocation readable.
    return max(minimum_gb, float(math.ceil(megabytes / 1000)))


def _megabytes(value: object, subject: str, resource: str, *, example: str) -> int:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value >= 0 and math.isfinite(value):
            return math.ceil(value)
    raise WorkflowError(
        f"Invalid resource {resource}={value!r} of {subject}. Set {resource} to "
        f"a non-negative number of megabytes, e.g. {example}."
    )


def _extra_query(value: object, subject: str, settings: ExecutorSettings) -> str:
    parts = []
    if settings.search_query and settings.search_query.strip():
        parts.append(settings.search_query.strip())
    if value is not None and value != "":
        if not isinstance(value, str):
            raise WorkflowError(
                f"Invalid resource vastai_query={value!r} of {subject}. Set it to "
                "offer filters in vastai query syntax, e.g. "
                'vastai_query="cuda_vers>=12.4".'
            )
        _parse_query(
            value,
            what=f"Invalid resource vastai_query={value!r} of {subject}",
            fix="Fix the vastai_query resource or remove it.",
        )
        parts.append(value.strip())
    return " ".join(parts)


def _check_query(query: str, subject: str) -> None:
    _parse_query(
        query,
        what=f"The offer query {query!r} of {subject}, built from its resources "
        "and the settings, is invalid",
        fix="Check that vastai_query and --vastai-search-query do not repeat or "
        "contradict the filters the plugin sets.",
    )


def _parse_query(query: str, *, what: str, fix: str) -> None:
    try:
        parse_offer_query(query)
    except ConfigError as exc:
        raise WorkflowError(f"{what}: {exc} {fix}") from exc


def _check_positive(name: str, value: float, unit: str) -> None:
    if value <= 0:
        raise WorkflowError(
            f"Invalid {name} {value}: it must be a positive number of {unit}."
        )
