"""Listing and cleanup of pool instances, behind ``vastai-pool ls`` and ``gc``.

Each function takes an open ``Store`` and, where it talks to Vast.ai, a ``VastApi``
(or None to work from the database alone), and returns dataclasses that the
CLI prints and tests inspect.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vastai_pool import store as pool_store
from vastai_pool.errors import ApiError
from vastai_pool.models import DestroyReason, InstanceState
from vastai_pool.store import InstanceRecord, Store

if TYPE_CHECKING:
    from vastai_pool.api import RemoteInstance, VastApi

logger = logging.getLogger(__name__)


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

    @property
    def failed(self) -> tuple[GcAction, ...]:
        return tuple(action for action in self.actions if action.error)


def refresh_states(store: Store, api: VastApi | None, account: str) -> Refresh:
    """Mark the account's instances that the API no longer lists.

    A listed-no-more instance becomes ``destroyed`` if it was being destroyed
    and ``lost`` otherwise. Rows still ``renting`` are left alone, because
    their create call may be in flight. With ``api`` None, or when the API
    fails, nothing changes and ``problem`` contains the reason.
    """
    if api is None:
        return Refresh(problem="no API client")
    try:
        remote = {instance.id: instance for instance in api.list_instances()}
    except ApiError as exc:
        return Refresh(problem=str(exc))

    lost: list[InstanceRecord] = []
    destroyed: list[InstanceRecord] = []
    for record in pool_store.list_instances(store, account=account):
        if record.vast_id is None or record.vast_id in remote:
            continue
        if record.state is InstanceState.RENTING:
            continue
        why = f"Vast.ai no longer lists instance {record.vast_id}"
        if record.state is InstanceState.DESTROYING:
            destroyed.append(
                pool_store.transition(
                    store, record.pk, InstanceState.DESTROYED, why=why
                )
            )
        else:
            lost.append(
                pool_store.transition(
                    store,
                    record.pk,
                    InstanceState.LOST,
                    why=why,
                    reason=DestroyReason.GONE,
                )
            )
    for record in lost:
        logger.warning(
            "Instance %s (Vast.ai id %s) is no longer listed by the API; marked lost",
            record.label,
            record.vast_id,
        )
    return Refresh(
        remote=remote, marked_lost=tuple(lost), marked_destroyed=tuple(destroyed)
    )


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
    """Destroy the instances ``select_garbage`` returns, each first claimed as
    ``destroying`` so that a run cannot lease it meanwhile.

    Without ``dry_run``, listing the account's instances must succeed, else
    ``ApiError`` is raised before anything is destroyed. A row
    still ``renting`` without a Vast.ai id is matched by label in the API's
    list, and marked lost when no instance carries its label.
    """
    refresh = refresh_states(store, api, account)
    if not dry_run and not refresh.ok:
        raise ApiError(
            f"Cannot list the account's instances ({refresh.problem}); nothing "
            "was destroyed. Check --api-url and the API key, then run gc again."
        )
    selected = select_garbage(store, account, include_kept=include_kept)
    if dry_run:
        actions = tuple(GcAction(record, why) for record, why in selected)
        return GcReport(dry_run=True, refresh=refresh, actions=actions)

    assert api is not None
    by_label = {
        instance.label: instance.id
        for instance in refresh.remote.values()
        if instance.label
    }
    actions: list[GcAction] = []
    skipped: list[InstanceRecord] = []
    for record, why in selected:
        claimed = pool_store.claim_for_destroy(
            store, record, why=f"vastai-pool gc: {why}", reason=DestroyReason.GC
        )
        if claimed is None:
            skipped.append(record)
            continue
        actions.append(_destroy(store, api, claimed, why, by_label.get(claimed.label)))
    return GcReport(
        dry_run=False, refresh=refresh, actions=tuple(actions), skipped=tuple(skipped)
    )


def _destroy(
    store: Store,
    api: VastApi,
    record: InstanceRecord,
    why: str,
    id_by_label: int | None,
) -> GcAction:
    vast_id = record.vast_id if record.vast_id is not None else id_by_label
    if vast_id is None:
        gone = pool_store.transition(
            store,
            record.pk,
            InstanceState.LOST,
            why=f"rental never completed: no instance labelled {record.label}",
            reason=DestroyReason.GC,
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
        why="destroyed by vastai-pool gc",
        reason=DestroyReason.GC,
        vast_id=vast_id,
    )
    logger.info("Destroyed instance %s (%s)", vast_id, why)
    return GcAction(destroyed, why)
