"""Server-side offer search: pricing, filters and order, as Vast.ai applies them.

The SDK sends filters as ``{field: {op: value}}`` with most values still
strings (``"1"``, ``"0.98"``), so numbers are converted here before they
are compared. Some filter fields are not stored under their own name:
``verified`` is ``verification == "verified"`` and ``datacenter`` is
``hosting_type == 1``. ``geolocation`` compares the two-letter country code
that ends strings like ``"Texas, US"``, and ``driver_version`` compares the
packed integer that the SDK sends.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from vastai_pool.sandbox.catalog import pack_driver_version

OPERATORS = frozenset({"eq", "neq", "gt", "gte", "lt", "lte", "in", "notin"})
# Top-level search keys that are options, not filters.
OPTION_KEYS = frozenset(
    {
        "order",
        "type",
        "limit",
        "allocated_storage",
        "disable_bundling",
        "target_reliability",
        "extra_ids",
        "gpu_option",
        "show_incompatible",
        "sort_option",
        "template_id",
    }
)
# Storage GB priced when a search names none (the API's documented default).
DEFAULT_ALLOCATED_STORAGE_GB = 8.0
HOURS_PER_MONTH = 720.0


class QueryError(ValueError):
    """A search or list query is malformed (reported as 400 invalid_request)."""


def price_offer(
    offer: dict[str, Any], storage_gb: float, offer_type: str = "on-demand"
) -> dict[str, Any]:
    """Return a copy of ``offer`` priced for ``storage_gb`` of disk.

    ``storage_cost`` is $/GB per month, so the hourly storage share is
    ``storage_cost * GB / 720``. ``dph_total`` adds it to the rental price,
    which is the minimum bid for interruptible (``bid``) searches.
    """
    priced = dict(offer)
    storage_total_cost = offer["storage_cost"] * storage_gb / HOURS_PER_MONTH
    rental = offer["min_bid"] if offer_type in ("bid", "interruptible") else None
    base = rental if rental is not None else offer["dph_base"]
    dph_total = base + storage_total_cost
    priced["storage_total_cost"] = storage_total_cost
    priced["dph_total"] = dph_total
    priced["is_bid"] = rental is not None
    priced["dlperf_per_dphtotal"] = offer["dlperf"] / dph_total
    priced["flops_per_dphtotal"] = offer["total_flops"] / dph_total
    priced["vram_costperhour"] = dph_total / (offer["gpu_total_ram"] / 1000.0)
    priced["discounted_dph_total"] = dph_total
    priced["score"] = offer["dlperf"] / dph_total * offer["reliability"]
    priced["search"] = {
        "gpuCostPerHour": base,
        "diskHour": storage_total_cost,
        "totalHour": dph_total,
        "discountTotalHour": 0.0,
        "discountedTotalPerHour": dph_total,
    }
    priced["instance"] = dict(priced["search"])
    return priced


def search_offers(
    offers: Iterable[dict[str, Any]], query: dict[str, Any]
) -> list[dict[str, Any]]:
    """Price, filter, order and limit ``offers`` per a search body."""
    if not isinstance(query, dict):
        raise QueryError(f"search body must be a JSON object, got {query!r}")
    storage_gb = _to_number(
        query.get("allocated_storage", DEFAULT_ALLOCATED_STORAGE_GB)
    )
    if storage_gb is None or storage_gb < 0:
        raise QueryError(
            f"invalid allocated_storage {query.get('allocated_storage')!r}"
        )
    offer_type = str(query.get("type") or "on-demand")
    filters = {
        field: condition
        for field, condition in query.items()
        if field not in OPTION_KEYS and isinstance(condition, dict)
    }
    priced = [price_offer(offer, storage_gb, offer_type) for offer in offers]
    matches = [offer for offer in priced if offer_matches(offer, filters)]
    ordered = order_rows(matches, _parse_order(query.get("order")))
    # NOTE: Vast.ai's default limit is undocumented; without one, every match
    # is returned.
    limit = query.get("limit")
    if limit is not None:
        number = _to_number(limit)
        if number is None or number < 0:
            raise QueryError(f"invalid limit {limit!r}")
        ordered = ordered[: int(number)]
    return ordered


def offer_matches(offer: dict[str, Any], filters: dict[str, dict[str, Any]]) -> bool:
    """Return True when ``offer`` satisfies every ``{field: {op: value}}``."""
    for field, condition in filters.items():
        actual = offer_field(offer, field)
        for op, expected in condition.items():
            if op not in OPERATORS:
                raise QueryError(f"unknown operator {op!r} on field {field!r}")
            if not compare(actual, op, _normalize_operand(field, expected)):
                return False
    return True


def offer_field(offer: dict[str, Any], field: str) -> Any:
    """Return the value a filter on ``field`` compares against."""
    if field == "verified":
        return offer.get("verification") == "verified"
    if field == "datacenter":
        return offer.get("hosting_type") == 1
    if field == "external":
        return bool(offer.get("external"))
    if field == "geolocation":
        location = offer.get("geolocation") or ""
        return location[-2:].upper()
    if field == "gpu_name":
        return _normalize_name(offer.get("gpu_name"))
    if field == "driver_version":
        return offer.get("driver_vers")
    return offer.get(field)


def compare(actual: Any, op: str, expected: Any) -> bool:
    """Apply one operator; a missing value only satisfies neq and notin."""
    if op in ("in", "notin"):
        if not isinstance(expected, list):
            expected = [expected]
        found = any(_equal(actual, item) for item in expected)
        return found if op == "in" else not found
    if op == "eq":
        return _equal(actual, expected)
    if op == "neq":
        return not _equal(actual, expected)
    left, right = _to_number(actual), _to_number(expected)
    if left is None or right is None:
        return False
    if op == "gt":
        return left > right
    if op == "gte":
        return left >= right
    if op == "lt":
        return left < right
    return left <= right


def order_rows(
    rows: list[dict[str, Any]], order: list[tuple[str, bool]]
) -> list[dict[str, Any]]:
    """Sort rows by ``[(field, descending)]``; missing values sort last."""
    ordered = list(rows)
    for field, descending in reversed(order):
        present = [row for row in ordered if row.get(field) is not None]
        missing = [row for row in ordered if row.get(field) is None]
        present.sort(key=lambda row, f=field: _sort_key(row[f]), reverse=descending)
        ordered = present + missing
    return ordered


def _parse_order(order: Any) -> list[tuple[str, bool]]:
    if order is None:
        return [("score", True)]
    if not isinstance(order, list):
        raise QueryError(f"order must be a list of [field, direction], got {order!r}")
    parsed = []
    for entry in order:
        if not isinstance(entry, list | tuple) or not entry:
            raise QueryError(f"invalid order entry {entry!r}")
        direction = str(entry[1]).lower() if len(entry) > 1 else "asc"
        if direction not in ("asc", "desc"):
            raise QueryError(f"invalid order direction {entry[1]!r}; use asc or desc")
        parsed.append((str(entry[0]), direction == "desc"))
    return parsed


def _normalize_operand(field: str, value: Any) -> Any:
    if isinstance(value, list):
        return [_normalize_operand(field, item) for item in value]
    if field == "gpu_name":
        return _normalize_name(value)
    if field == "geolocation" and isinstance(value, str):
        return value.strip()[-2:].upper()
    if field == "driver_version" and isinstance(value, str) and value.count(".") == 2:
        return pack_driver_version(value)
    return value


def _normalize_name(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("_", " ").strip().casefold()
    return value


def _equal(actual: Any, expected: Any) -> bool:
    if actual is None or expected is None:
        return actual is None and expected is None
    if isinstance(actual, bool) or isinstance(expected, bool):
        return _to_bool(actual) == _to_bool(expected)
    left, right = _to_number(actual), _to_number(expected)
    if left is not None and right is not None:
        return math.isclose(left, right, rel_tol=1e-9, abs_tol=1e-12)
    return str(actual).casefold() == str(expected).casefold()


def _to_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        return None
    if isinstance(value, int | float):
        return bool(value)
    return None


def _to_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _sort_key(value: Any) -> tuple[int, Any]:
    number = _to_number(value)
    if number is not None:
        return (0, number)
    return (1, str(value))
