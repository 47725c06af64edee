"""Renting an instance for a job: search, create, boot, connect and prepare.

Every instance created here is destroyed on every failure path after its
create call, and its row ends in ``destroyed`` with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import shlex
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from vastai_pool import store as db
from vastai_pool.api import Offer, RemoteInstance, VastApi, VastStatus
from vastai_pool.errors import (
    ApiError,
    BootFailed,
    ConfigError,
    NoMatchingOffer,
    OfferUnavailable,
    PoolError,
    SshError,
)
from vastai_pool.models import DestroyReason, InstanceState
from vastai_pool.requirements import Requirements
from vastai_pool.ssh import Connection, Endpoint, ensure_keypair
from vastai_pool.status_board import StatusBoard
from vastai_pool.store import InstanceRecord, Store

logger = logging.getLogger(__name__)

try:
    from vastai_pool.costs import rental_price_fields, running_fields
except ImportError:  # a build without cost accounting records no price parts
    rental_price_fields = None  # type: ignore[assignment]
    running_fields = None  # type: ignore[assignment]

# Text in status_msg that means the container will never start (seen by the
# Snakemake Vast.ai plugin and in Vast.ai's docs), so waiting is pointless.
FATAL_STATUS_MESSAGES = (
    "pull rate limit",
    "manifest unknown",
    "unauthorized",
    "no space left on device",
    "OCI runtime create failed",
)
FATAL_STATUSES = frozenset({VastStatus.EXITED, VastStatus.UNKNOWN, VastStatus.OFFLINE})
# Destroy reasons whose cause the caller logs as a warning just before, so the
# destroy's own line does not repeat it.
_CAUSE_LOGGED_BEFORE = frozenset(
    {DestroyReason.BOOT_FAILED, DestroyReason.GONE, DestroyReason.RENT_FAILED}
)

# Status messages that point at the image rather than the machine when
# several machines report them, and how many machines make that call.
IMAGE_FAULT_MESSAGES = ("manifest unknown", "unauthorized")
IMAGE_FAULT_MACHINES = 2
# Seconds an offer this process rented stays claimed, so that rentals
# working from an older search do not try it again.
CLAIM_AFTER_RENT_SECONDS = 60.0

# Offers in a row that could not be rented (taken, or refused) before the
# market is searched again, since the rest of that search is likely stale.
MISSES_PER_SEARCH = 3
# Searches of the market for one rental before it gives up.
SEARCHES = 3
# Instances that may fail to boot for one job before the job fails; each
# failure puts its machine on the avoided list first.
BOOT_ATTEMPTS = 5

# sshd starts after the API reports running: attempts and seconds between them.
SSH_CONNECT_ATTEMPTS = 8
SSH_CONNECT_DELAY = 1.0
# Seconds a pip install of Snakemake may take on a fresh instance.
PIP_TIMEOUT = 1200.0

WORK_ROOT = "vastai-pool/work"
JOBS_ROOT = "vastai-pool/jobs"
SOURCES_ROOT = "vastai-pool/sources"


@dataclass(frozen=True)
class RentalContext:
    """The pool's API, database and settings that a rental uses."""

    api: VastApi
    store: Store
    run_id: str
    account: str
    # Directory of the pool's SSH key pair.
    key_dir: Path
    work_dir: str
    boot_timeout: float
    poll_interval: float
    keep: bool
    # Returns a fresh label ``<Store.label_prefix><run-short>-<n>`` on each call.
    next_label: Callable[[], str]
    # Called with each offer just before it is rented; raises (for example
    # ``BudgetSpent``) to forbid the rental.
    admit: Callable[[Offer], None] | None = None
    # Returns True once the rental should be abandoned (the job was cancelled).
    should_stop: Callable[[], bool] | None = None
    # Shares one list call per status round between the run's rentals. With
    # None, each rental requests its own instance from the API.
    status_board: StatusBoard | None = None
    # Pip requirements (``name==version``) installed on each new instance.
    packages: tuple[str, ...] = ()
    # Called with (machine id, instance id, what failed) when a machine is to
    # blame for a failed boot, to remember it beyond this run.
    machine_failed: Callable[[int, int, str], None] | None = None
    # Guards the run's set of failed machines; shared by the run's rentals.
    machine_lock: threading.Lock = field(default_factory=threading.Lock)
    # Offers the process's rentals hold; shared by the run's rentals.
    claims: OfferClaims | None = None
    # Machines per image that reported an image fault; shared, guarded by
    # ``machine_lock``.
    image_failures: dict[str, set[int]] = field(default_factory=dict)
    # Called with machine ids that were wrongly blamed for an image fault.
    image_cleared: Callable[[list[int]], None] | None = None


class RentalCancelled(PoolError):
    """A rental was abandoned because its job was cancelled; nothing is left."""


class MarketBusy(NoMatchingOffer):
    """Every matching offer is held by other rentals of this process; the
    job should wait for one of their instances instead of failing."""


class OfferClaims:
    """Offers that rentals of this process are renting or just rented.

    Parallel rentals of one run see the same search results; without
    claims they all create on the cheapest offer and all but one get
    ``no_such_ask``. Thread-safe.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._until: dict[int, float] = {}

    def claim(self, offer_id: int) -> bool:
        """Claim an offer for one rental; return False when it is held."""
        now = self._clock()
        with self._lock:
            until = self._until.get(offer_id)
            if until is not None and until > now:
                return False
            self._until[offer_id] = float("inf")
            return True

    def rented(self, offer_id: int) -> None:
        """Keep a rented offer claimed for ``CLAIM_AFTER_RENT_SECONDS``."""
        with self._lock:
            self._until[offer_id] = self._clock() + CLAIM_AFTER_RENT_SECONDS

    def release(self, offer_id: int) -> None:
        with self._lock:
            self._until.pop(offer_id, None)


class _OfferMissed(Exception):
    """An offer could not be rented (taken or refused), but another may be."""


class _MachineFailed(Exception):
    """The offer's machine failed another boot after the offer was picked."""


@dataclass
class Rental:
    """A booted, prepared instance and the SSH connection to it."""

    record: InstanceRecord
    connection: Connection
    offer: Offer


def local_snakemake_version() -> str | None:
    """Return the installed Snakemake version, or None when it is not installed."""
    try:
        return importlib.metadata.version("snakemake")
    except importlib.metadata.PackageNotFoundError:
        return None


def destroy(
    api: VastApi,
    store: Store,
    record: InstanceRecord,
    *,
    reason: DestroyReason,
    why: str,
    state_on_failure: InstanceState = InstanceState.DESTROYING,
) -> None:
    """Destroy an instance and move its row through destroying to destroyed.

    When the API call fails, the error is logged, not raised. The row is then
    left in ``state_on_failure`` (``destroying``, or ``lost`` for a host that
    is gone) so that ``vastai-pool gc`` finds it.
    """
    if record.state == InstanceState.DESTROYED:
        return
    if record.state == InstanceState.DESTROYING and record.destroy_reason is not None:
        # The first claim's reason is the cause. A second destroy, such as
        # the job that then lost its host, keeps that reason.
        reason = record.destroy_reason
    if record.state != InstanceState.DESTROYING:
        db.transition(
            store, record.pk, InstanceState.DESTROYING, why=why, reason=reason
        )
    if record.vast_id is not None:
        try:
            api.destroy_instance(record.vast_id)
        except ApiError as exc:
            logger.error(
                "destroying instance %d failed, it may still bill; run "
                "'vastai-pool gc' to retry: %s",
                record.vast_id,
                exc,
            )
            if state_on_failure != InstanceState.DESTROYING:
                db.transition(store, record.pk, state_on_failure, why=f"{why}; {exc}")
            return
    db.transition(store, record.pk, InstanceState.DESTROYED, why=why, reason=reason)
    if reason in _CAUSE_LOGGED_BEFORE:
        logger.info("destroyed instance %s (%s)", record.vast_id, reason.value)
    else:
        logger.info("destroyed instance %s (%s): %s", record.vast_id, reason.value, why)


def rent(
    ctx: RentalContext,
    requirements: Requirements,
    *,
    failed_machines: set[int],
) -> Rental:
    """Rent the cheapest offer that fits, boot it and prepare it for jobs.

    An offer that was taken or refused is skipped for the next one, and the
    market is searched again after ``MISSES_PER_SEARCH`` of them in a row
    (``SEARCHES`` searches in all). Offers that other rentals of this
    process hold (``ctx.claims``) are skipped without a try; when they are
    all that matches, ``MarketBusy`` is raised so that the job waits. An
    instance that fails to boot is destroyed, its machine is added to
    ``failed_machines`` (and reported to ``ctx.machine_failed``), and when
    the machine is to blame another offer is tried, up to ``BOOT_ATTEMPTS``
    boots. When the image itself fails to pull on ``IMAGE_FAULT_MACHINES``
    machines, ``BootFailed`` is raised at once and those machines are not
    blamed.
    """
    query = requirements.offer_query()
    with ctx.machine_lock:
        pulled_nowhere = sorted(ctx.image_failures.get(requirements.image, ()))
    if len(pulled_nowhere) >= IMAGE_FAULT_MACHINES:
        raise ConfigError(
            f"the image {requirements.image!r} failed to pull on machines "
            f"{', '.join(map(str, pulled_nowhere))} earlier in this run, so no "
            "instance was rented for this job: check --vastai-image (name and "
            "tag) and the registry login"
        )
    tried: set[int] = set()
    boot_failures: list[BootFailed] = []
    last_miss = ""
    busy = False
    for search in range(1, SEARCHES + 1):
        offers = ctx.api.search_offers(
            query, order=requirements.order, disk_gb=requirements.disk_gb
        )
        candidates = sorted(
            (
                o
                for o in offers
                if o.machine_id not in failed_machines and o.id not in tried
            ),
            key=lambda o: o.hardware.dph_total,
        )
        if not candidates:
            break
        misses = 0
        busy = False
        for offer in candidates:
            if offer.machine_id in failed_machines:
                continue
            _check_stop(ctx, f"before renting offer {offer.id}")
            if ctx.claims is not None and not ctx.claims.claim(offer.id):
                # Another job of this process is renting it right now.
                busy = True
                continue
            try:
                if ctx.admit is not None:
                    ctx.admit(offer)
                tried.add(offer.id)
                record = _create(ctx, requirements, offer, failed_machines)
            except _MachineFailed:
                # Another job's boot failed on this machine meanwhile.
                _release(ctx, offer)
                continue
            except _OfferMissed as miss:
                _release(ctx, offer)
                last_miss = str(miss).rstrip(".")
                misses += 1
                if misses >= MISSES_PER_SEARCH:
                    break
                continue
            except BaseException:
                _release(ctx, offer)
                raise
            if ctx.claims is not None:
                ctx.claims.rented(offer.id)
            try:
                connection = boot(ctx, record, offer, failed_machines=failed_machines)
            except BootFailed as exc:
                if not exc.machine_fault:
                    # A package that does not install, for example, would
                    # most likely fail the same way on another machine.
                    raise
                _check_image(ctx, requirements, offer, exc, failed_machines)
                boot_failures.append(exc)
                if len(boot_failures) >= BOOT_ATTEMPTS:
                    raise BootFailed(
                        f"{len(boot_failures)} instances failed to boot for this "
                        f"job, the last one: {exc}",
                        instance_id=exc.instance_id,
                        machine_fault=exc.machine_fault,
                    ) from exc
                continue
            return Rental(db.get_instance(ctx.store, record.pk), connection, offer)
        if search < SEARCHES:
            logger.info(
                "searching the market again for %r (search %d of %d): %d offers "
                "could not be rented",
                query,
                search + 1,
                SEARCHES,
                len(tried),
            )
    if boot_failures:
        raise boot_failures[-1]
    if busy and not tried:
        raise MarketBusy(
            f"every Vast.ai offer matching {query!r} is being rented by another "
            "job of this run",
            query=query,
        )
    if not tried:
        avoided = " other than machines that failed before" if failed_machines else ""
        raise NoMatchingOffer(
            f"no Vast.ai offer{avoided} matches {query!r}. Relax the job's "
            "resources or --vastai-search-query, or raise --vastai-max-price.",
            query=query,
        )
    raise NoMatchingOffer(
        f"none of the {len(tried)} Vast.ai offers tried for {query!r} could be "
        f"rented; the last reply: {last_miss}. Try again later, or relax the "
        "job's resources.",
        query=query,
    )


def _release(ctx: RentalContext, offer: Offer) -> None:
    if ctx.claims is not None:
        ctx.claims.release(offer.id)


def _check_image(
    ctx: RentalContext,
    requirements: Requirements,
    offer: Offer,
    exc: BootFailed,
    failed_machines: set[int],
) -> None:
    """Raise ``BootFailed`` once the image failed to pull on enough machines.

    "manifest unknown" and "unauthorized" on one machine may come from that
    machine's registry mirror or cache. On several machines they mean that
    the image name, tag or registry credentials are wrong, so every further
    rental would fail too.
    """
    if exc.image_message is None or offer.machine_id is None:
        return
    with ctx.machine_lock:
        machines = ctx.image_failures.setdefault(requirements.image, set())
        machines.add(offer.machine_id)
        if len(machines) < IMAGE_FAULT_MACHINES:
            return
        failed_machines.difference_update(machines)
        blamed = sorted(machines)
    if ctx.image_cleared is not None:
        ctx.image_cleared(blamed)
    raise BootFailed(
        f"the image {requirements.image!r} failed to pull on machines "
        f"{', '.join(map(str, blamed))} ({exc.image_message}), so the image "
        "itself is wrong, not the machines: check --vastai-image (name and "
        "tag) and the registry login",
        instance_id=exc.instance_id,
        machine_fault=False,
    ) from exc


def _remember_failure(
    ctx: RentalContext, offer: Offer, exc: BootFailed, failed_machines: set[int]
) -> None:
    """Avoid the offer's machine for the rest of the run, and later if to blame."""
    if offer.machine_id is None:
        return
    with ctx.machine_lock:
        failed_machines.add(offer.machine_id)
    if exc.machine_fault and ctx.machine_failed is not None:
        try:
            ctx.machine_failed(offer.machine_id, exc.instance_id, str(exc))
        except PoolError as error:
            logger.warning(
                "could not remember that machine %d failed: %s",
                offer.machine_id,
                error,
            )
    if exc.machine_fault:
        logger.info(
            "avoiding machine %d in this and later runs; renting another instance",
            offer.machine_id,
        )


def _check_stop(ctx: RentalContext, when: str) -> None:
    if ctx.should_stop is not None and ctx.should_stop():
        raise RentalCancelled(f"the rental was abandoned {when}: the job was cancelled")


def _create(
    ctx: RentalContext,
    requirements: Requirements,
    offer: Offer,
    failed_machines: set[int],
) -> InstanceRecord:
    """Record and create one rental; raise ``_OfferMissed`` when another
    offer may still be rented, ``_MachineFailed`` when its machine failed."""
    label = ctx.next_label()
    # The instance is allocated the job's disk, not the offer's free space.
    hardware = dataclasses.replace(offer.hardware, disk_gb=requirements.disk_gb)
    # Checked and recorded under the lock that guards ``failed_machines``, so
    # no rental of a machine is recorded after one of its boots failed.
    with ctx.machine_lock:
        if offer.machine_id in failed_machines:
            raise _MachineFailed
        pk = db.record_rental(
            ctx.store,
            run_id=ctx.run_id,
            account=ctx.account,
            label=label,
            offer_id=offer.id,
            machine_id=offer.machine_id,
            image=requirements.image,
            extra_query=requirements.extra_query,
            hardware=hardware,
            keep=ctx.keep,
        )
    try:
        vast_id = ctx.api.create_instance(
            offer.id,
            image=requirements.image,
            disk_gb=requirements.disk_gb,
            label=label,
        )
    except OfferUnavailable as exc:
        logger.info("offer %d was taken, trying the next one: %s", offer.id, exc)
        db.transition(
            ctx.store,
            pk,
            InstanceState.DESTROYED,
            why=f"offer {offer.id} was taken",
            reason=DestroyReason.RENT_FAILED,
        )
        raise _OfferMissed(str(exc)) from exc
    except ApiError as exc:
        if exc.instance_id is not None:
            # Vast.ai created an instance although it reported a failure.
            logger.warning(
                "renting offer %d created instance %d despite an error, "
                "destroying it: %s",
                offer.id,
                exc.instance_id,
                exc,
            )
            db.transition(
                ctx.store,
                pk,
                InstanceState.BOOTING,
                why="created despite an error",
                vast_id=exc.instance_id,
            )
            destroy(
                ctx.api,
                ctx.store,
                db.get_instance(ctx.store, pk),
                reason=DestroyReason.RENT_FAILED,
                why=f"create of offer {offer.id} failed: {exc}",
            )
            raise _OfferMissed(str(exc)) from exc
        if exc.status is None or exc.status >= 500:
            # The create may or may not have rented the offer.
            _reconcile_by_label(ctx, pk, label, f"create of offer {offer.id}: {exc}")
        else:
            db.transition(
                ctx.store,
                pk,
                InstanceState.DESTROYED,
                why=f"create of offer {offer.id} failed: {exc}",
                reason=DestroyReason.RENT_FAILED,
            )
        if _offer_specific(exc):
            logger.warning(
                "offer %d could not be rented, trying the next one: %s", offer.id, exc
            )
            raise _OfferMissed(str(exc)) from exc
        raise
    logger.info(
        "rented instance %d (label %s) from offer %d: %d x %s at $%.3f/h",
        vast_id,
        label,
        offer.id,
        offer.hardware.num_gpus,
        offer.hardware.gpu_name,
        offer.hardware.dph_total,
    )
    prices = (
        {}
        if rental_price_fields is None
        else rental_price_fields(offer.raw, requirements.disk_gb)
    )
    return db.transition(
        ctx.store,
        pk,
        InstanceState.BOOTING,
        why=f"created from offer {offer.id}",
        vast_id=vast_id,
        **prices,
    )


def _offer_specific(exc: ApiError) -> bool:
    """Return whether a failed create may succeed on another offer.

    A ``success: false`` reply (HTTP 200) and server errors concern the
    offer or the moment; 4xx replies (a bad key, no credit, a bad image)
    would fail the same way on every offer.
    """
    if exc.error_code in ("insufficient_credit", "auth_error"):
        return False
    return exc.status is None or exc.status == 200 or exc.status >= 500


def _reconcile_by_label(ctx: RentalContext, pk: int, label: str, why: str) -> None:
    """After a create whose outcome is unknown, destroy whatever carries ``label``.

    When the instance list cannot be read either, the row stays in
    ``renting`` so that ``vastai-pool gc`` reconciles it by label later.
    """
    try:
        remote = ctx.api.find_by_label(label)
    except ApiError as exc:
        logger.error(
            "cannot tell whether %s was rented (%s); run 'vastai-pool gc' "
            "once the API answers: %s",
            label,
            why,
            exc,
        )
        return
    if remote is None:
        db.transition(
            ctx.store,
            pk,
            InstanceState.DESTROYED,
            why=f"{why}; no instance carries label {label}",
            reason=DestroyReason.RENT_FAILED,
        )
        return
    logger.warning(
        "instance %d was rented as %s although the create failed; destroying it",
        remote.id,
        label,
    )
    db.transition(ctx.store, pk, InstanceState.BOOTING, why=why, vast_id=remote.id)
    destroy(
        ctx.api,
        ctx.store,
        db.get_instance(ctx.store, pk),
        reason=DestroyReason.RENT_FAILED,
        why=why,
    )


def boot(
    ctx: RentalContext,
    record: InstanceRecord,
    offer: Offer,
    *,
    failed_machines: set[int] | None = None,
) -> Connection:
    """Wait for a created instance to run, connect and prepare it.

    Any failure destroys the instance and raises ``BootFailed`` naming the
    instance, the offer and what happened; the machine goes into
    ``failed_machines`` first.
    """
    assert record.vast_id is not None
    vast_id = record.vast_id
    connection: Connection | None = None
    try:
        private_key, public_key = ensure_keypair(ctx.key_dir)
        ctx.api.attach_ssh_key(vast_id, public_key)
        remote = wait_until_running(ctx, vast_id, offer)
        assert remote.ssh_host is not None and remote.ssh_port is not None
        if running_fields is not None:
            # The rental price is billed from here on, the storage since create.
            db.transition(
                ctx.store,
                record.pk,
                InstanceState.BOOTING,
                why="running",
                **running_fields(
                    remote.raw, seen_at=ctx.store.clock(), rented_at=record.rented_at
                ),
            )
        connection = Connection(Endpoint(remote.ssh_host, remote.ssh_port), private_key)
        try:
            host_key = connection.connect(
                attempts=SSH_CONNECT_ATTEMPTS, delay=SSH_CONNECT_DELAY
            )
        except SshError as exc:
            raise BootFailed(
                f"instance {vast_id} (offer {offer.id}) runs but SSH to "
                f"{remote.ssh_host}:{remote.ssh_port} failed: {exc}",
                instance_id=vast_id,
            ) from exc
        db.transition(
            ctx.store,
            record.pk,
            InstanceState.BOOTING,
            why="reachable over SSH",
            ssh_host=remote.ssh_host,
            ssh_port=remote.ssh_port,
            host_key=host_key,
        )
        prepare(
            connection,
            ctx.work_dir,
            vast_id=vast_id,
            offer_id=offer.id,
            packages=ctx.packages,
        )
        return connection
    except BaseException as exc:
        if connection is not None:
            connection.close()
        failure: BootFailed | None = None
        if isinstance(exc, BootFailed):
            why = str(exc)
            failure = exc
        elif isinstance(exc, RentalCancelled):
            why = str(exc)
        elif isinstance(exc, PoolError):
            why = f"boot of instance {vast_id} (offer {offer.id}) failed: {exc}"
            # The machine is not to blame for an API error or a dropped
            # SSH command.
            failure = BootFailed(why, instance_id=vast_id, machine_fault=False)
        else:
            why = f"boot of instance {vast_id} interrupted: {type(exc).__name__}"
        logger.warning("%s; destroying it", why)
        if failure is not None and failed_machines is not None:
            # Before the destroy, so that no rental starts on the machine
            # once its instance is recorded as failed.
            _remember_failure(ctx, offer, failure, failed_machines)
        destroy(
            ctx.api,
            ctx.store,
            db.get_instance(ctx.store, record.pk),
            reason=DestroyReason.BOOT_FAILED,
            why=why,
        )
        if failure is not None and failure is not exc:
            raise failure from exc
        raise


def wait_until_running(
    ctx: RentalContext, vast_id: int, offer: Offer
) -> RemoteInstance:
    """Poll the API until the instance runs with an SSH endpoint; raise BootFailed."""
    deadline = time.monotonic() + ctx.boot_timeout
    last: RemoteInstance | None = None
    seen_round = 0
    failed_checks = 0
    while True:
        _check_stop(ctx, f"while instance {vast_id} booted")
        try:
            if ctx.status_board is not None:
                status_round = ctx.status_board.next_round(after=seen_round)
                seen_round = status_round.number
                if status_round.error is not None:
                    raise status_round.error
                # Right after the create the list may not show it yet.
                remote = status_round.instances.get(vast_id)
            else:
                remote = ctx.api.show_instance(vast_id)
        except ApiError as exc:
            if exc.status is not None and exc.status != 429 and exc.status < 500:
                raise
            # Rate limits and server errors pass; the boot timeout still bounds
            # how long they are tolerated.
            # One warning per boot; the status board's own read already
            # logged each burst.
            logger.log(
                logging.DEBUG if failed_checks else logging.WARNING,
                "checking instance %d failed, retrying: %s",
                vast_id,
                exc,
            )
            failed_checks += 1
            remote = None
        if remote is not None:
            last = remote
            message = remote.status_msg or ""
            fatal = next(
                (m for m in FATAL_STATUS_MESSAGES if m.lower() in message.lower()),
                None,
            )
            if fatal is not None or remote.status in FATAL_STATUSES:
                failure = BootFailed(
                    f"instance {vast_id} (offer {offer.id}) "
                    f"failed to boot: status {remote.status.value}, "
                    f"message {message!r}",
                    instance_id=vast_id,
                )
                if fatal in IMAGE_FAULT_MESSAGES:
                    failure.image_message = fatal
                raise failure
            if remote.status is VastStatus.RUNNING and remote.ssh_host:
                return remote
        if time.monotonic() >= deadline:
            state = (
                f"status {last.status.value}, message {last.status_msg!r}"
                if last is not None
                else "the API never showed it"
            )
            raise BootFailed(
                f"instance {vast_id} (offer {offer.id}) was not running after "
                f"the boot timeout of {ctx.boot_timeout:g} s ({state}); raise "
                "--vastai-boot-timeout or pick a smaller image",
                instance_id=vast_id,
            )
        if ctx.status_board is None:
            # The board paces its own rounds.
            time.sleep(ctx.poll_interval)


def prepare(
    connection: Connection,
    work_dir: str,
    *,
    vast_id: int,
    offer_id: int,
    packages: tuple[str, ...] = (),
) -> None:
    """Create the work directory and install what jobs need, once per instance.

    That is Snakemake at the local version plus ``packages`` (pip
    requirements pinned as ``name==version``, e.g. the storage plugins in
    use); only those missing or at another version are installed.
    """
    result = connection.run(f"mkdir -p {shlex.quote(work_dir)} {JOBS_ROOT}")
    if result.exit_code != 0:
        raise BootFailed(
            f"instance {vast_id} (offer {offer_id}): creating {work_dir} failed: "
            f"{result.stderr.strip()}",
            instance_id=vast_id,
        )

    expected = local_snakemake_version()
    wanted = ((f"snakemake=={expected}",) if expected else ()) + tuple(packages)
    if not wanted:
        return

    python = _remote_python(connection)
    # Reading the package metadata takes milliseconds, where importing
    # Snakemake for ``--version`` takes seconds on a busy host.
    probe = connection.run(
        f"{python} -c {shlex.quote(_MISSING_PROBE)} "
        + " ".join(shlex.quote(requirement) for requirement in wanted),
        timeout=120,
    )
    if probe.exit_code == 0:
        missing = probe.stdout.split()
    else:
        missing = list(wanted)
    if not missing:
        logger.debug("instance %d has %s", vast_id, ", ".join(wanted))
        return
    logger.info("installing %s on instance %d", " ".join(missing), vast_id)
    install = connection.run(
        f"{python} -m pip install --quiet "
        + " ".join(shlex.quote(requirement) for requirement in missing),
        timeout=PIP_TIMEOUT,
    )
    if install.exit_code != 0:
        tail = (install.stderr or install.stdout).strip()[-500:]
        raise BootFailed(
            f"instance {vast_id} (offer {offer_id}): pip install "
            f"{' '.join(missing)} failed with exit code {install.exit_code}: {tail}",
            instance_id=vast_id,
            machine_fault=False,
        )


# Prints each ``name==version`` argument that is not installed at that version.
_MISSING_PROBE = """
import importlib.metadata as metadata
import sys
for requirement in sys.argv[1:]:
    name, _, version = requirement.partition("==")
    try:
        found = metadata.version(name)
    except metadata.PackageNotFoundError:
        found = None
    if found != version:
        print(requirement)
"""


def _remote_python(connection: Connection) -> str:
    # Images differ in whether they ship "python" or only "python3".
    result = connection.run("command -v python || command -v python3")
    path = result.stdout.strip().splitlines()
    return shlex.quote(path[0]) if result.exit_code == 0 and path else "python3"


def matching_idle(
    records: Collection[InstanceRecord], requirements: Requirements
) -> list[InstanceRecord]:
    """Return the idle records that could serve a job with ``requirements``."""
    return [
        r
        for r in records
        if r.state == InstanceState.IDLE and satisfies(r, requirements)
    ]


def satisfies(record: InstanceRecord, requirements: Requirements) -> bool:
    """Return whether an instance can run a job with these requirements."""
    return (
        record.image == requirements.image
        and record.extra_query == requirements.extra_query
        and requirements.matches(record.hardware)
    )
