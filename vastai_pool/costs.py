"""Cost accounting of instances, jobs and runs, and ``vastai-pool report``.

Vast.ai bills by the second. Storage of the allocated disk
(``storage_cost`` $/GB/month x disk / 720, stored as ``storage_dph``) is
billed from creation until destroy, in every state, and the rental price
(``dph_base``) only while the instance runs. ``dph_total`` is their sum.
Bandwidth is billed apart and is not counted here.

A run pays for an instance while it owns it: from the rental (or from the
lease that adopted it) until another run adopts it or it is destroyed. So
the time a lingering instance waits after its run ended is charged to that
run, and the runs of one pool add up to what the instances cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from vastai_pool.errors import PoolError
from vastai_pool.models import Event, Instance, InstanceState, Lease
from vastai_pool.store import (
    InstanceRecord,
    Store,
    count_jobs,
    default_db_path,
    list_runs,
)

logger = logging.getLogger(__name__)

SECONDS_PER_HOUR = 3600.0
# Vast.ai prices storage per GB and month of 30 days.
HOURS_PER_MONTH = 720.0


# Spend of one instance ------------------------------------------------------


@dataclass(frozen=True)
class Pricing:
    """The price and timestamps of one instance that its bill depends on.

    ``dph_base`` and ``storage_dph`` are None on rows written before they
    were recorded; such an instance is charged ``dph_total`` throughout.
    """

    rented_at: float
    destroyed_at: float | None
    dph_total: float
    dph_base: float | None = None
    storage_dph: float | None = None
    running_at: float | None = None
    ready_at: float | None = None

    def spend_between(self, start: float, end: float, *, now: float) -> float:
        """Return the USD the instance cost between ``start`` and ``end``,
        clipped to its lifetime (rental to destroy, or to ``now``)."""
        lifetime_end = self.destroyed_at if self.destroyed_at is not None else now
        start = max(start, self.rented_at)
        end = min(end, lifetime_end, now)
        if end <= start:
            return 0.0
        if self.dph_base is None or self.storage_dph is None:
            return self.dph_total * (end - start) / SECONDS_PER_HOUR

        spend = self.storage_dph * (end - start) / SECONDS_PER_HOUR
        # An instance is running by the time it is prepared, so ready_at
        # bounds a missing running_at from above.
        running_at = self.running_at if self.running_at is not None else self.ready_at
        if running_at is not None and end > running_at:
            spend += self.dph_base * (end - max(start, running_at)) / SECONDS_PER_HOUR
        return spend

    def lifetime_end(self, now: float) -> float:
        return min(self.destroyed_at if self.destroyed_at is not None else now, now)


def instance_spend(record: InstanceRecord, now: float) -> float:
    """Return the USD an instance has cost from its rental until it was
    destroyed, or until ``now`` while it is alive.

    Records without the price parts (``dph_base``, ``storage_dph``) are
    charged their ``dph_total`` over the whole lifetime, which overestimates
    by the rental price during the boot.
    """
    return pricing_of_record(record).spend_between(record.rented_at, now, now=now)


def pricing_of_record(record: InstanceRecord) -> Pricing:
    # NOTE: getattr, so that records of a store that does not copy the price
    # columns into InstanceRecord still work (charged dph_total throughout).
    return Pricing(
        rented_at=record.rented_at,
        destroyed_at=record.destroyed_at,
        dph_total=record.hardware.dph_total,
        dph_base=getattr(record, "dph_base", None),
        storage_dph=getattr(record, "storage_dph", None),
        running_at=getattr(record, "running_at", None),
        ready_at=record.ready_at,
    )


def rental_price_fields(offer: Mapping[str, Any], disk_gb: float) -> dict[str, float]:
    """Return the price columns of an instance rented from the offer row
    ``offer`` (as search returns it) with ``disk_gb`` of disk: ``dph_base``
    and ``storage_dph``, both $/h. Empty when the offer lacks the prices."""
    try:
        storage_dph = float(offer["storage_cost"]) * disk_gb / HOURS_PER_MONTH
        if offer.get("dph_base") is not None:
            dph_base = float(offer["dph_base"])
        else:
            dph_base = float(offer["dph_total"]) - storage_dph
    except (KeyError, TypeError, ValueError):
        logger.debug("offer %s carries no usable price parts", offer.get("id"))
        return {}
    return {"dph_base": dph_base, "storage_dph": storage_dph}


def running_fields(
    instance: Mapping[str, Any], *, seen_at: float, rented_at: float
) -> dict[str, float]:
    """Return ``{"running_at": epoch}`` for an instance row first seen
    ``running`` at ``seen_at``.

    The rental price starts when the instance started running, which the
    row's ``uptime_mins`` dates more closely than the poll that saw it.
    """
    uptime_mins = instance.get("uptime_mins")
    running_at = seen_at
    if isinstance(uptime_mins, int | float) and uptime_mins > 0:
        running_at = seen_at - float(uptime_mins) * 60.0
    return {"running_at": min(seen_at, max(rented_at, running_at))}


# Costs of one run -----------------------------------------------------------


@dataclass(frozen=True)
class InstanceCost:
    """The cost of one instance to a run, over the time the run owned it."""

    pk: int
    vast_id: int | None
    label: str
    gpu_name: str
    num_gpus: int
    dph_total: float
    state: str
    rented_by_run: bool
    hours: float
    busy_hours: float
    usd: float
    busy_usd: float
    # Seconds from rental to ready (booted, reachable and prepared).
    boot_seconds: float | None


@dataclass(frozen=True)
class RuleCost:
    """The cost of one rule's jobs: the time they held their instances."""

    rule: str
    jobs: int
    busy_hours: float
    usd: float


@dataclass(frozen=True)
class RunCosts:
    """Spend of one run on the pool, split by rule, with idle time apart.

    ``total_usd`` is ``sum(usd_per_rule.values()) + idle_usd``. Idle time is
    instance time no lease covered: boots, waits between jobs, lingering and
    teardown. ``boots_avoided`` is the number of warm jobs, each of which
    would otherwise have waited for a rental and boot, estimated at the
    mean of the boots measured (``ready_at - rented_at``).
    """

    run_id: str
    started_at: float
    ended_at: float | None
    instances_rented: int
    jobs: int
    warm_jobs: int
    busy_hours: float
    idle_hours: float
    total_usd: float
    idle_usd: float
    usd_per_rule: dict[str, float]
    rules: list[RuleCost]
    boots_avoided: int
    mean_boot_seconds: float | None
    boot_seconds_saved: float | None
    instances: list[InstanceCost]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _LeaseSpan:
    instance_pk: int
    rule: str
    # (rule, job id, attempt): several leases of one job share it.
    job: tuple[str, int, int]
    warm: bool
    started_at: float
    ended_at: float | None


@dataclass(frozen=True)
class _InstanceRow:
    pk: int
    vast_id: int | None
    label: str
    gpu_name: str
    num_gpus: int
    state: InstanceState
    run_id: str | None
    pricing: Pricing


def run_costs(store: Store, run_id: str, *, now: float | None = None) -> RunCosts:
    """Return what run ``run_id`` spent, per instance, rule and idle time.

    Alive instances and open leases count until ``now`` (the store's clock
    by default). Raises ``PoolError`` when the run is not in the database.
    """
    now = store.clock() if now is None else now
    run = next((r for r in list_runs(store) if r.id == run_id), None)
    if run is None:
        raise PoolError(
            f"Run {run_id} not found in the pool database {store.path}; "
            "`vastai-pool report` without --run shows the latest run."
        )
    owned, renters, rows = _owned_spans(store, run_id)
    leases = _run_leases(store, run_id)

    instance_costs: list[InstanceCost] = []
    for pk, spans in owned.items():
        row = rows[pk]
        instance_leases = [lease for lease in leases if lease.instance_pk == pk]
        instance_costs.append(
            _instance_cost(row, spans, instance_leases, renters[pk] == run_id, now)
        )

    rules = _rule_costs(leases, rows, now)
    busy_hours = sum(cost.busy_hours for cost in instance_costs)
    total_hours = sum(cost.hours for cost in instance_costs)
    total_usd = sum(cost.usd for cost in instance_costs)
    rule_usd = sum(rule.usd for rule in rules)
    jobs, warm_jobs = count_jobs((lease.job, lease.warm) for lease in leases)
    mean_boot = _mean_boot(instance_costs)
    return RunCosts(
        run_id=run_id,
        started_at=run.started_at,
        ended_at=run.ended_at,
        instances_rented=sum(
            1
            for cost in instance_costs
            if cost.rented_by_run and cost.vast_id is not None
        ),
        jobs=jobs,
        warm_jobs=warm_jobs,
        busy_hours=busy_hours,
        idle_hours=max(0.0, total_hours - busy_hours),
        total_usd=total_usd,
        idle_usd=max(0.0, total_usd - rule_usd),
        usd_per_rule={rule.rule: rule.usd for rule in rules},
        rules=rules,
        boots_avoided=warm_jobs,
        mean_boot_seconds=mean_boot,
        boot_seconds_saved=mean_boot * warm_jobs if mean_boot is not None else None,
        instances=instance_costs,
    )


def _owned_spans(
    store: Store, run_id: str
) -> tuple[
    dict[int, list[tuple[float, float | None]]], dict[int, str], dict[int, _InstanceRow]
]:
    """Return, per instance the run ever owned, the spans it owned it, the
    run that rented each, and the instance rows.

    Every event carries the run that owns the instance after it, so
    ownership changes where the run of consecutive events changes. Events
    without a run keep the previous owner.
    """
    with store.sessions.read() as session:
        pks = set(
            session.scalars(
                select(Event.instance_pk).where(
                    Event.run_id == run_id, Event.instance_pk.is_not(None)
                )
            )
        )
        pks |= set(
            session.scalars(select(Instance.pk).where(Instance.run_id == run_id))
        )
        rows = {
            row.pk: _instance_row(row)
            for row in session.scalars(select(Instance).where(Instance.pk.in_(pks)))
        }
        history: dict[int, list[str | None]] = {pk: [] for pk in rows}
        times: dict[int, list[float]] = {pk: [] for pk in rows}
        statement = (
            select(Event.instance_pk, Event.at, Event.run_id)
            .where(Event.instance_pk.in_(pks))
            .order_by(Event.id)
        )
        for pk, at, owner in session.execute(statement):
            times[pk].append(at)
            history[pk].append(owner)

    owned: dict[int, list[tuple[float, float | None]]] = {}
    renters: dict[int, str] = {}
    for pk, row in rows.items():
        owners = history[pk] or [row.run_id]
        at = times[pk] or [row.pricing.rented_at]
        renters[pk] = next((owner for owner in owners if owner), "")
        spans = _spans_of(list(zip(at, owners, strict=True)), run_id, row)
        if spans:
            owned[pk] = spans
    return owned, renters, rows


def _spans_of(
    history: list[tuple[float, str | None]], run_id: str, row: _InstanceRow
) -> list[tuple[float, float | None]]:
    """Return the (start, end) spans in which ``run_id`` owned the instance;
    the last one ends None, at destroy or now."""
    spans: list[tuple[float, float | None]] = []
    owner = history[0][1]
    start = row.pricing.rented_at
    for at, event_owner in history[1:]:
        if event_owner is None or event_owner == owner:
            continue
        if owner == run_id:
            spans.append((start, at))
        owner, start = event_owner, at
    if owner == run_id:
        spans.append((start, None))
    return spans


def _instance_row(row: Instance) -> _InstanceRow:
    return _InstanceRow(
        pk=row.pk,
        vast_id=row.vast_id,
        label=row.label,
        gpu_name=row.gpu_name,
        num_gpus=row.num_gpus,
        state=InstanceState(row.state),
        run_id=row.run_id,
        pricing=Pricing(
            rented_at=row.rented_at,
            destroyed_at=row.destroyed_at,
            dph_total=row.dph_total,
            dph_base=row.dph_base,
            storage_dph=row.storage_dph,
            running_at=row.running_at,
            ready_at=row.ready_at,
        ),
    )


def _run_leases(store: Store, run_id: str) -> list[_LeaseSpan]:
    statement = select(Lease).where(Lease.run_id == run_id).order_by(Lease.id)
    with store.sessions.read() as session:
        return [
            _LeaseSpan(
                instance_pk=lease.instance_pk,
                rule=lease.rule,
                job=(lease.rule, lease.job_id, lease.attempt),
                warm=lease.warm,
                started_at=lease.started_at,
                ended_at=lease.ended_at,
            )
            for lease in session.scalars(statement)
        ]


def _lease_cost(lease: _LeaseSpan, pricing: Pricing, now: float) -> tuple[float, float]:
    """Return (hours, USD) of a lease, clipped to its instance's lifetime."""
    end = lease.ended_at if lease.ended_at is not None else now
    end = min(end, pricing.lifetime_end(now))
    start = max(lease.started_at, pricing.rented_at)
    hours = max(0.0, end - start) / SECONDS_PER_HOUR
    return hours, pricing.spend_between(start, end, now=now)


def _instance_cost(
    row: _InstanceRow,
    spans: Iterable[tuple[float, float | None]],
    leases: Iterable[_LeaseSpan],
    rented_by_run: bool,
    now: float,
) -> InstanceCost:
    pricing = row.pricing
    seconds = 0.0
    usd = 0.0
    for start, span_end in spans:
        end = min(span_end if span_end is not None else now, pricing.lifetime_end(now))
        seconds += max(0.0, end - start)
        usd += pricing.spend_between(start, end, now=now)
    busy_hours = 0.0
    busy_usd = 0.0
    for lease in leases:
        hours, cost = _lease_cost(lease, pricing, now)
        busy_hours += hours
        busy_usd += cost
    boot = (
        pricing.ready_at - pricing.rented_at
        if rented_by_run and pricing.ready_at is not None
        else None
    )
    return InstanceCost(
        pk=row.pk,
        vast_id=row.vast_id,
        label=row.label,
        gpu_name=row.gpu_name,
        num_gpus=row.num_gpus,
        dph_total=pricing.dph_total,
        state=row.state.value,
        rented_by_run=rented_by_run,
        hours=seconds / SECONDS_PER_HOUR,
        busy_hours=busy_hours,
        usd=usd,
        busy_usd=busy_usd,
        boot_seconds=boot,
    )


def _rule_costs(
    leases: Iterable[_LeaseSpan], rows: Mapping[int, _InstanceRow], now: float
) -> list[RuleCost]:
    totals: dict[str, tuple[float, float]] = {}
    jobs: dict[str, set[tuple[str, int, int]]] = {}
    for lease in leases:
        row = rows.get(lease.instance_pk)
        if row is None:
            continue
        hours, usd = _lease_cost(lease, row.pricing, now)
        rule_hours, rule_usd = totals.get(lease.rule, (0.0, 0.0))
        totals[lease.rule] = (rule_hours + hours, rule_usd + usd)
        # A job placed again after a lost instance is one job.
        jobs.setdefault(lease.rule, set()).add(lease.job)
    return [
        RuleCost(rule=rule, jobs=len(jobs[rule]), busy_hours=hours, usd=usd)
        for rule, (hours, usd) in sorted(totals.items())
    ]


def _mean_boot(instances: Iterable[InstanceCost]) -> float | None:
    boots = [cost.boot_seconds for cost in instances if cost.boot_seconds is not None]
    return statistics.fmean(boots) if boots else None


# The table and the report command -------------------------------------------


def format_costs(costs: RunCosts, *, extra: Iterable[tuple[str, str]] = ()) -> str:
    """Return a run's costs as a two-column table, one figure per line."""
    rows: list[tuple[str, str]] = [
        ("instances rented", str(costs.instances_rented)),
        ("jobs run", str(costs.jobs)),
        ("jobs on a warm instance", str(costs.warm_jobs)),
        *extra,
        ("busy instance-hours", f"{costs.busy_hours:.4f}"),
        ("idle instance-hours", f"{costs.idle_hours:.4f}"),
        ("billed (USD)", f"{costs.total_usd:.4f}"),
    ]
    rows += [(f"  rule {rule.rule} (USD)", f"{rule.usd:.4f}") for rule in costs.rules]
    rows.append(("  idle (USD)", f"{costs.idle_usd:.4f}"))
    rows.append(("boots avoided", str(costs.boots_avoided)))
    if costs.boot_seconds_saved is not None and costs.boots_avoided:
        rows.append(("boot time saved (s)", f"{costs.boot_seconds_saved:.1f}"))
    width = max(len(label) for label, _ in rows)
    lines = [f"Vast.ai pool run {costs.run_id}:"]
    lines += [f"  {label:<{width}}  {value:>10}" for label, value in rows]
    return "\n".join(lines)


def latest_run_id(store: Store) -> str | None:
    """Return the latest run that rented or leased an instance, else the
    latest run, else None."""
    runs = list_runs(store)
    with store.sessions.read() as session:
        used = set(session.scalars(select(Lease.run_id).distinct()))
        used |= set(
            session.scalars(
                select(Event.run_id).where(Event.kind == InstanceState.RENTING.value)
            )
        )
    for run in reversed(runs):
        if run.id in used:
            return run.id
    return runs[-1].id if runs else None


def add_report_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``report [--run ID] [--json] [--db PATH]`` on the
    ``vastai-pool`` sub-command parser."""
    report = subparsers.add_parser(
        "report",
        help="show what a run spent on the pool",
        description="Show what a past or current run spent: instances rented, "
        "jobs, busy and idle instance-hours, US dollars in all, per rule and "
        "idle, and the boots that warm instances avoided. Read from the pool "
        "database only; no API call is made.",
    )
    report.add_argument(
        "--run",
        default=None,
        metavar="ID",
        help="run id, as printed at the end of a run (default: the latest run "
        "that rented or leased an instance)",
    )
    report.add_argument("--json", action="store_true", help="print a JSON object")
    report.add_argument(
        "--db",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"pool database file (default: {default_db_path()})",
    )
    report.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    """Print the costs of ``args.run`` (or of the latest run); return 0, or
    1 when the database has no run."""
    path = Path(args.db or default_db_path()).expanduser()
    if not path.is_file():
        sys.stderr.write(
            f"vastai-pool: error: pool database {path} not found; give the file "
            "with --db, or run a workflow with --executor vastai first.\n"
        )
        return 1
    with Store(path) as store:
        run_id = args.run or latest_run_id(store)
        if run_id is None:
            sys.stderr.write(
                f"vastai-pool: error: no run in the pool database {store.path}; "
                "run a workflow with --executor vastai first.\n"
            )
            return 1
        costs = run_costs(store, run_id)
    if args.json:
        sys.stdout.write(json.dumps(costs.to_json(), indent=2) + "\n")
    else:
        sys.stdout.write(format_costs(costs) + "\n")
    return 0
