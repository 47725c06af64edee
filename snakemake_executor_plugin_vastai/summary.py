"""The table of a run's totals, logged when the executor shuts down."""

from __future__ import annotations

from vastai_pool.costs import RunCosts, format_costs
from vastai_pool.pool import RunSummary


def format_summary(summary: RunSummary, costs: RunCosts | None = None) -> str:
    """Return the run's totals as a two-column table, one figure per line.

    With ``costs`` (from ``vastai_pool.costs.run_costs``), the table adds
    busy and idle instance-hours, dollars per rule and idle, and the boots
    that warm instances avoided. Without it, the table has the pool's own
    totals only.
    """
    alive = ("instances still alive", str(summary.instances_alive))
    if costs is not None:
        return format_costs(costs, extra=[alive])
    rows = [
        ("instances rented", str(summary.instances_rented)),
        ("jobs run", str(summary.jobs)),
        ("jobs on a warm instance", str(summary.warm_jobs)),
        alive,
        ("billed (USD)", f"{summary.billed_usd:.4f}"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"Vast.ai pool run {summary.run_id}:"]
    lines += [f"  {label:<{width}}  {value:>10}" for label, value in rows]
    return "\n".join(lines)
