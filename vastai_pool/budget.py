"""A run's budget: what its instances have cost so far and what they commit.

Money is in US dollars, prices (``dph_total``) in dollars per hour and
times in epoch seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from vastai_pool.errors import PoolError
from vastai_pool.models import ALIVE_STATES, InstanceState
from vastai_pool.store import InstanceRecord

logger = logging.getLogger(__name__)

_instance_spend: Callable[[InstanceRecord, float], float] | None
try:
    from vastai_pool.costs import instance_spend as _instance_spend
except ImportError:  # the cost module is optional for the budget
    _instance_spend = None


class BudgetSpent(PoolError):
    """The run's budget does not cover another rental."""


@dataclass(frozen=True)
class Hold:
    """The share of the budget that one placed job commits.

    ``started_at`` is when the job got its instance (None while its rental
    boots) and ``pk`` the instance row, once known.
    """

    dph_total: float
    runtime_seconds: float | None
    started_at: float | None = None
    pk: int | None = None

    def horizon(self, now: float, interval: float) -> float:
        """Return the seconds of billing this job commits from ``now`` on."""
        if self.runtime_seconds is None:
            return interval
        elapsed = 0.0 if self.started_at is None else now - self.started_at
        return max(self.runtime_seconds - elapsed, interval)


@dataclass(frozen=True)
class BudgetView:
    """The run's money at one moment: ``spent`` so far, ``committed`` by what
    runs, and ``rate``, the dollars per hour its alive instances bill."""

    budget: float
    spent: float
    committed: float
    rate: float

    @property
    def projected(self) -> float:
        return self.spent + self.committed

    def message(self, detail: str = "", *, more: float = 0.0) -> str:
        """Return the error a job gets when the budget keeps it from running.

        ``more`` is the cost (USD) that ``detail`` describes, on top of what
        is spent and committed; the message gives the total and the excess.
        """
        total = self.spent + self.committed + more
        excess = total - self.budget
        parts = [
            f"${self.spent:.6f} spent so far",
            f"${self.committed:.6f} committed by running jobs",
        ]
        if detail:
            parts.append(detail)
        outcome = (
            f"exceeded by ${excess:.6f}"
            if excess > 0
            else f"reached (${total:.6f} of it)"
        )
        return (
            f"the budget of ${self.budget:.6f} would be {outcome}: "
            + ", ".join(parts)
            + "; raise --vastai-budget, or lower --vastai-max-price or the jobs' "
            "runtime resource so that running jobs commit less"
        )


def instance_spend(record: InstanceRecord, now: float) -> float:
    """Return what an instance has cost from its rental to its end (or ``now``).

    Uses ``vastai_pool.costs.instance_spend`` when that module is installed,
    else ``dph_total`` times the lifetime, which is an upper bound on
    Vast.ai's bill because rental is not charged while the image loads.
    """
    if _instance_spend is not None:
        return _instance_spend(record, now)
    end = record.destroyed_at if record.destroyed_at is not None else now
    return record.hardware.dph_total * max(0.0, end - record.rented_at) / 3600


def spend_in_run(record: InstanceRecord, run_started_at: float, now: float) -> float:
    """Return the part of an instance's cost that falls in its owning run.

    An instance adopted from an earlier run was rented before this run
    started; only the share of its lifetime since the start counts.
    """
    total = instance_spend(record, now)
    if record.rented_at >= run_started_at:
        return total
    end = record.destroyed_at if record.destroyed_at is not None else now
    lifetime = end - record.rented_at
    if lifetime <= 0:
        return 0.0
    return total * max(0.0, end - run_started_at) / lifetime


def assess(
    records: Iterable[InstanceRecord],
    holds: Mapping[str, Hold],
    *,
    run_id: str,
    budget: float,
    run_started_at: float,
    now: float,
    interval: float,
) -> BudgetView:
    """Sum the run's spend and commitments.

    A job with a ``runtime`` commits its instance's ``dph_total`` for the rest
    of that runtime. Any other alive instance of the run commits one budget
    timer ``interval``, the time the timer needs to notice and destroy it.
    A booting rental is counted both by its hold and by its row, which
    overstates the commitment by one interval.
    """
    spent = 0.0
    committed = 0.0
    rate = 0.0
    held = {hold.pk for hold in holds.values() if hold.pk is not None}
    for record in records:
        if record.run_id != run_id:
            continue
        if record.vast_id is None and record.state is not InstanceState.RENTING:
            # A create that failed without renting anything.
            continue
        spent += spend_in_run(record, run_started_at, now)
        if record.state in ALIVE_STATES and record.state is not InstanceState.KEPT:
            rate += record.hardware.dph_total
            if record.pk not in held:
                committed += record.hardware.dph_total * interval / 3600
    for hold in holds.values():
        committed += hold.dph_total * hold.horizon(now, interval) / 3600
    return BudgetView(budget=budget, spent=spent, committed=committed, rate=rate)
