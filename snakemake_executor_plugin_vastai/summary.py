"""The table of a run's totals, logged when the executor shuts down."""

from __future__ import annotations

from vastai_pool.pool import RunSummary


def format_summary(summary: RunSummary) -> str:
    """Return the run's totals as a two-column table, one figure per line."""
    rows = [
        ("instances rented", str(summary.instances_rented)),
        ("jobs run", str(summary.jobs)),
        ("jobs on a warm instance", str(summary.warm_jobs)),
        ("instances still alive", str(summary.instances_alive)),
        ("billed (USD)", f"{summary.billed_usd:.4f}"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"Vast.ai pool run {summary.run_id}:"]
    lines += [f"  {label:<{width}}  {value:>10}" for label, value in rows]
    return "\n".join(lines)
