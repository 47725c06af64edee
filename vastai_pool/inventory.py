"""Listing and cleanup of pool instances, behind ``vastai-pool ls`` and ``gc``.

Each function takes an open ``Store`` and, where it talks to Vast.ai, a ``VastApi``
(or None to work from the database alone), and returns dataclasses that the
CLI prints and tests inspect.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vastai_pool import store as pool_store
from vastai_pool.errors import ApiError
from vastai_pool.models import DestroyReason, InstanceState, LeaseOutcome
from vastai_pool.store import InstanceRecord, RunRecord, Store

if TYPE_CHECKING:
    from vastai_pool.api import RemoteInstance, VastApi

logger = logging.getLogger(__name__)


# Seconds an idle instance left by a crashed run stays adoptable when the run
# recorded no idle timeout.
_ORPHAN_IDLE_SECONDS = 300.0

_GONE = frozenset({InstanceState.DESTROYED, InstanceState.LOST})


@dataclass(frozen=True)
class Refresh:
    """Result of comparing the database with the API's instance list.

    ``remote`` maps Vast.ai ids to what the API listed. It is empty when the
    API could not be asked, and ``problem`` then contains the reason.
    """

    remote: dict[int, RemoteInstance] = field(default_factory=dict)
    problem: str | None = None
    marked_lost: tuple[InstanceRecord, ...] = ()
    marked_destroyed: tuple[InstanceRecord, ...] = ()

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class PoolEntry:
    """One instance as ``vastai-pool ls`` shows it.

    ``deadline`` (epoch seconds) is when the pool is to destroy the instance:
    its linger deadline, else for an idle instance the end of its owning
    run's idle timeout. ``api_status`` is Vast.ai's status when refreshed.
    """

    record: InstanceRecord
    jobs: int
    deadline: float | None
    api_status: str | None

    @property
    def kept(self) -> bool:
        return self.record.state is InstanceState.KEPT or self.record.keep


@dataclass(frozen=True)
class GcAction:
    """One instance that ``gc`` destroyed (or, in a dry run, would destroy)."""

    record: InstanceRecord
    why: str
    # Set when the destroy call failed; the row then stays ``destroying``.
    error: str | None = None


@dataclass(frozen=True)
class GcReport:
    dry_run: bool
    refresh: Refresh
    actions: tuple[GcAction, ...]
    # Instances that another process took over between selection and claim.
    skipped: tuple[InstanceRecord, ...] = ()
    # Runs that had died without ending and that gc ended.
    recovered_runs: tuple[str, ...] = ()

    @property
    def strays(self) -> tuple[Stray, ...]:
        if isinstance(self.refresh, ReconcileReport):
            return self.refresh.strays
        return ()

    @property
    def failed(self) -> tuple[GcAction, ...]:
        return tuple(action for action in self.actions if action.error)

    @property
    def ok(self) -> bool:
        return not self.failed and not any(stray.error for stray in self.strays)


def refresh_states(store: Store, api: VastApi | None, account: str) -> Refresh:
    """Mark the account's instances that the API no longer lists.

    A listed-no-more instance becomes ``destroyed`` if it was being destroyed
    and ``lost`` otherwise. Rows still ``renting`` are left alone, because
    their create call may be in flight. With ``api`` None, or when the API
    fails, nothing changes and ``problem`` contains the reason.
    """
    if api is None:
        return Refresh(problem="no API client")
    before = pool_store.list_instances(store, account=account)
    try:
        remote = {instance.id: instance for instance in api.list_instances()}
    except ApiError as exc:
        return Refresh(problem=str(exc))
    lost, destroyed = _mark_unlisted(store, before, remote, skip_runs=frozenset())
    return Refresh(
        remote=remote, marked_lost=tuple(lost), marked_destroyed=tuple(destroyed)
    )


def _mark_unlisted(
    store: Store,
    before: Sequence[InstanceRecord],
    remote: dict[int, RemoteInstance],
    *,
    skip_runs: frozenset[str],
) -> tuple[list[InstanceRecord], list[InstanceRecord]]:
    """Mark gone the rows of ``before`` (read before the API was listed) that
    had a Vast.ai id and are missing from ``remote``.

    Reading the rows first matters: an instance created after the list call
    is not in it, but its row only gets its id after the create returns.
    """
    lost: list[InstanceRecord] = []
    destroyed: list[InstanceRecord] = []
    for record in before:
        if record.vast_id is None or record.vast_id in remote:
            continue
        if record.state is InstanceState.RENTING:
            continue
        if record.run_id is not None and record.run_id in skip_runs:
            continue
        gone = pool_store.mark_gone(
            store, record.pk, why=f"Vast.ai no longer lists instance {record.vast_id}"
        )
        if gone is None:
            continue
        if gone.state is InstanceState.DESTROYED:
            destroyed.append(gone)
        else:
            lost.append(gone)
            logger.warning(
                "Instance %s (Vast.ai id %s) is no longer listed by the API; "
                "marked lost",
                gone.label,
                gone.vast_id,
            )
    return lost, destroyed


@dataclass(frozen=True)
class Stray:
    """A listed instance with the pool's label prefix that no alive row tracks."""

    remote: RemoteInstance
    why: str
    # The row with its id or label, when that row is destroyed or lost.
    record: InstanceRecord | None = None
    # Set when the destroy call failed.
    error: str | None = None


@dataclass(frozen=True)
class ReconcileReport(Refresh):
    """The outcome of ``reconcile``. ``strays`` were destroyed, or in a dry run
    would be."""

    strays: tuple[Stray, ...] = ()
    dry_run: bool = False

    @property
    def failed(self) -> tuple[Stray, ...]:
        return tuple(stray for stray in self.strays if stray.error)


def reconcile(
    store: Store, api: VastApi, account: str, *, dry_run: bool = False
) -> ReconcileReport:
    """Compare the account's rows with one paginated list of its instances.

    A listed instance whose label starts with this pool database's
    ``Store.label_prefix`` but that no row has (by id or label), or whose
    row is destroyed or lost, is
    destroyed (only reported with ``dry_run``). A row whose instance is no
    longer listed is marked lost (``destroyed`` if it was being destroyed);
    ``stopped`` instances are listed, so they count as alive. Rows owned by
    a live run are left to that run. An API failure changes nothing and is
    returned as ``problem``.
    """
    live = frozenset(pool_store.live_run_ids(store))
    before = pool_store.list_instances(store, account=account)
    try:
        listing = api.list_instances()
    except ApiError as exc:
        return ReconcileReport(problem=str(exc), dry_run=dry_run)
    remote = {instance.id: instance for instance in listing}
    lost, destroyed = _mark_unlisted(store, before, remote, skip_runs=live)

    # Read after the list call: a row is written before its create call, so
    # every pool instance in the list has its row by now.
    rows = pool_store.list_instances(store, account=account, include_destroyed=True)
    by_id = {row.vast_id: row for row in rows if row.vast_id is not None}
    by_label = {row.label: row for row in rows}
    strays: list[Stray] = []
    for instance in listing:
        label = instance.label or ""
        # A row with the instance's id makes it this pool's whatever its
        # label; without one, only this pool database's label prefix does.
        row = by_id.get(instance.id)
        if row is None and label.startswith(store.label_prefix):
            row = by_label.get(label)
        if row is None and not label.startswith(store.label_prefix):
            continue
        if row is None:
            why = "carries the pool's label but the pool database does not know it"
        elif row.state in _GONE:
            why = f"the pool database has it as {row.state.value}"
        else:
            continue
        strays.append(_destroy_stray(api, instance, why, row, dry_run=dry_run))
    return ReconcileReport(
        remote=remote,
        marked_lost=tuple(lost),
        marked_destroyed=tuple(destroyed),
        strays=tuple(strays),
        dry_run=dry_run,
    )


def _destroy_stray(
    api: VastApi,
    instance: RemoteInstance,
    why: str,
    row: InstanceRecord | None,
    *,
    dry_run: bool,
) -> Stray:
    if dry_run:
        return Stray(instance, why, row)
    try:
        api.destroy_instance(instance.id)
    except ApiError as exc:
        logger.error("Destroying stray instance %d failed: %s", instance.id, exc)
        return Stray(instance, why, row, error=str(exc))
    logger.warning(
        "Destroyed instance %d (label %s): it %s", instance.id, instance.label, why
    )
    return Stray(instance, why, row)


@dataclass(frozen=True)
class Recovery:
    """The outcome of ``recover``: runs ended and instances handled."""

    runs: tuple[str, ...] = ()
    actions: tuple[GcAction, ...] = ()
    # Idle instances left for adoption, with the linger deadline they got.
    adoptable: tuple[InstanceRecord, ...] = ()


def recover_stale_runs(
    store: Store,
    api: VastApi,
    account: str,
    *,
    listing: Sequence[RemoteInstance] | None = None,
) -> list[str]:
    """End the account's runs that died without ending; return their ids.

    A run died when its process on this host is gone or its heartbeat is
    stale (``store.run_is_over``). Its open leases end as lost. Its renting,
    booting, busy and destroying instances are destroyed, and a row without a
    Vast.ai id is matched by label. Its idle ones are left for adoption with
    a linger deadline. Its run row is ended once all its instances are
    handled. ``listing`` is a list of the account's instances
    already fetched, used for label matching.
    """
    return list(recover(store, api, account, listing=listing).runs)


def recover(
    store: Store,
    api: VastApi,
    account: str,
    *,
    listing: Sequence[RemoteInstance] | None = None,
) -> Recovery:
    """``recover_stale_runs``, returning what was destroyed as well."""
    now = store.clock()
    stale = [
        run
        for run in pool_store.list_runs(store, account=account)
        if run.ended_at is None and pool_store.run_is_over(run, now)
    ]
    if not stale:
        return Recovery()
    labels = _LabelIndex(api, listing)
    ended: list[str] = []
    actions: list[GcAction] = []
    adoptable: list[InstanceRecord] = []
    for run in stale:
        leases = pool_store.end_open_leases(store, run.id, LeaseOutcome.LOST)
        logger.warning(
            "Run %s (pid %d on %s) ended without closing the pool; recovering "
            "its instances (%d open leases ended as lost)",
            run.id,
            run.pid,
            run.host,
            len(leases),
        )
        complete = True
        for record in pool_store.list_instances(store, account=account):
            if record.run_id != run.id or record.state is InstanceState.KEPT:
                continue
            if record.state is InstanceState.IDLE:
                kept = _leave_for_adoption(store, record, run, now)
                if kept is not None:
                    adoptable.append(kept)
                continue
            action = _destroy_orphan(store, api, record, labels)
            if action is None:
                continue
            actions.append(action)
            if action.error:
                complete = False
        if complete:
            pool_store.end_run(store, run.id)
            ended.append(run.id)
    return Recovery(
        runs=tuple(ended), actions=tuple(actions), adoptable=tuple(adoptable)
    )


def _leave_for_adoption(
    store: Store, record: InstanceRecord, run: RunRecord, now: float
) -> InstanceRecord | None:
    if record.linger_until is not None:
        return record
    window = max(
        run.idle_timeout_seconds
        if run.idle_timeout_seconds is not None
        else _ORPHAN_IDLE_SECONDS,
        run.linger_seconds,
    )
    until = (record.idle_since if record.idle_since is not None else now) + window
    return pool_store.set_linger(
        store,
        record,
        until,
        why=f"its run {run.id} died; adoptable until its idle time of {window:g} s "
        "is over",
    )


class _LabelIndex:
    """An index of listed instances by label, filled by one list call on
    first use unless a listing is given."""

    def __init__(self, api: VastApi, listing: Sequence[RemoteInstance] | None) -> None:
        self._api = api
        self._by_label: dict[str, int] | None = None
        if listing is not None:
            self._index(listing)
        self.problem: str | None = None

    def _index(self, listing: Sequence[RemoteInstance]) -> None:
        self._by_label = {i.label: i.id for i in listing if i.label}

    def lookup(self, label: str) -> tuple[bool, int | None]:
        """Return (whether the API could be listed, the id carrying ``label``)."""
        if self._by_label is None and self.problem is None:
            try:
                self._index(self._api.list_instances())
            except ApiError as exc:
                self.problem = str(exc)
        if self._by_label is None:
            return False, None
        return True, self._by_label.get(label)


def _destroy_orphan(
    store: Store, api: VastApi, record: InstanceRecord, labels: _LabelIndex
) -> GcAction | None:
    why = f"{record.state.value}, and its run {record.run_id} died"
    if record.vast_id is None:
        listed, found = labels.lookup(record.label)
        if not listed:
            return GcAction(
                record, why, error=f"cannot list instances: {labels.problem}"
            )
        if found is None:
            gone = pool_store.transition(
                store,
                record.pk,
                InstanceState.LOST,
                why=f"rental never completed: no instance labelled {record.label}",
                reason=DestroyReason.RUN_ENDED,
            )
            return GcAction(gone, "its rental never completed")
        record = pool_store.transition(
            store, record.pk, record.state, why="matched by label", vast_id=found
        )
    claimed = pool_store.claim_for_destroy(
        store,
        record,
        why=f"recovering a dead run: {why}",
        reason=DestroyReason.RUN_ENDED,
    )
    if claimed is None:
        return None
    return _destroy(store, api, claimed, why, claimed.vast_id, by="run recovery")


def list_pool(
    store: Store,
    *,
    account: str | None,
    include_destroyed: bool = False,
    refresh: Refresh | None = None,
) -> list[PoolEntry]:
    """Return the pool's instances (of ``account``, or of every account)."""
    records = pool_store.list_instances(
        store, account=account, include_destroyed=include_destroyed
    )
    jobs = pool_store.job_counts(store, [record.pk for record in records])
    idle_timeouts = {
        run.id: run.idle_timeout_seconds for run in pool_store.list_runs(store)
    }
    remote = refresh.remote if refresh else {}
    entries = []
    for record in records:
        if record.vast_id is None and record.state is InstanceState.DESTROYED:
            # A create that rented nothing (the offer was taken or refused)
            # leaves a row but never was an instance.
            continue
        listed = remote.get(record.vast_id) if record.vast_id is not None else None
        entries.append(
            PoolEntry(
                record=record,
                jobs=jobs[record.pk],
                deadline=_deadline(record, idle_timeouts.get(record.run_id)),
                api_status=str(listed.status) if listed else None,
            )
        )
    return entries


def _deadline(record: InstanceRecord, idle_timeout: float | None) -> float | None:
    if record.linger_until is not None:
        return record.linger_until
    if (
        record.state is InstanceState.IDLE
        and record.idle_since is not None
        and idle_timeout is not None
    ):
        return record.idle_since + idle_timeout
    return None


def select_garbage(
    store: Store, account: str, *, include_kept: bool
) -> list[tuple[InstanceRecord, str]]:
    """Return (instance, why) for each alive instance of ``account`` that no
    live run owns: idle, busy or booting ones left by a run that is over,
    and with ``include_kept`` the kept ones too."""
    live = pool_store.live_run_ids(store)
    selected = []
    for record in pool_store.list_instances(store, account=account):
        owner_live = record.run_id is not None and record.run_id in live
        if record.state is InstanceState.KEPT:
            if include_kept:
                selected.append((record, "kept, and --kept was given"))
            continue
        if owner_live:
            continue
        if record.keep and record.state is not InstanceState.DESTROYING:
            if include_kept:
                selected.append((record, "kept by a run that is over"))
            continue
        selected.append((record, f"{record.state.value}, and its run is over"))
    return selected


def collect_garbage(
    store: Store,
    api: VastApi | None,
    account: str,
    *,
    include_kept: bool = False,
    dry_run: bool = False,
) -> GcReport:
    """Clean up everything of ``account`` that no live run owns.

    First ``reconcile`` (strays destroyed, unlisted rows marked lost), then
    ``recover`` of runs that died, then each instance ``select_garbage``
    returns (idle ones of finished runs too), each first claimed as
    ``destroying`` so that a run cannot lease it meanwhile. With
    ``dry_run`` nothing is destroyed and the report lists what would be.

    Without ``dry_run``, listing the account's instances must succeed, else
    ``ApiError`` is raised before anything is destroyed.
    """
    if api is None:
        refresh: Refresh = ReconcileReport(problem="no API client", dry_run=dry_run)
    else:
        refresh = reconcile(store, api, account, dry_run=dry_run)
    if not dry_run and not refresh.ok:
        raise ApiError(
            f"Cannot list the account's instances ({refresh.problem}); nothing "
            "was destroyed. Check --api-url and the API key, then run gc again."
        )
    if dry_run:
        selected = select_garbage(store, account, include_kept=include_kept)
        actions = tuple(GcAction(record, why) for record, why in selected)
        return GcReport(dry_run=True, refresh=refresh, actions=actions)

    assert api is not None
    listing = list(refresh.remote.values())
    recovery = recover(store, api, account, listing=listing)
    by_label = {i.label: i.id for i in listing if i.label}
    actions_done: list[GcAction] = list(recovery.actions)
    skipped: list[InstanceRecord] = []
    for record, why in select_garbage(store, account, include_kept=include_kept):
        claimed = pool_store.claim_for_destroy(
            store, record, why=f"vastai-pool gc: {why}", reason=DestroyReason.GC
        )
        if claimed is None:
            skipped.append(record)
            continue
        vast_id = claimed.vast_id
        if vast_id is None:
            vast_id = by_label.get(claimed.label)
        actions_done.append(_destroy(store, api, claimed, why, vast_id))
    return GcReport(
        dry_run=False,
        refresh=refresh,
        actions=tuple(actions_done),
        skipped=tuple(skipped),
        recovered_runs=recovery.runs,
    )


def destroy_claimed(
    store: Store, api: VastApi, record: InstanceRecord, why: str, *, by: str
) -> GcAction:
    """Destroy an instance already claimed as ``destroying`` (by its Vast.ai
    id) and record it destroyed; a failed call is returned in ``error``."""
    return _destroy(store, api, record, why, record.vast_id, by=by)


def _destroy(
    store: Store,
    api: VastApi,
    record: InstanceRecord,
    why: str,
    vast_id: int | None,
    *,
    by: str = "vastai-pool gc",
) -> GcAction:
    """Destroy a claimed (``destroying``) instance and record the outcome."""
    reason = record.destroy_reason or DestroyReason.GC
    if vast_id is None:
        gone = pool_store.transition(
            store,
            record.pk,
            InstanceState.LOST,
            why=f"rental never completed: no instance labelled {record.label}",
            reason=reason,
        )
        return GcAction(gone, "its rental never completed")
    try:
        api.destroy_instance(vast_id)
    except ApiError as exc:
        logger.error("Destroying instance %s failed: %s", vast_id, exc)
        return GcAction(record, why, error=str(exc))
    destroyed = pool_store.transition(
        store,
        record.pk,
        InstanceState.DESTROYED,
        why=f"destroyed by {by}",
        reason=reason,
        vast_id=vast_id,
    )
    logger.info("Destroyed instance %s (%s)", vast_id, why)
    return GcAction(destroyed, why)
