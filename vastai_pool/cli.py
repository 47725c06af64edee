"""The ``vastai-pool`` command: list and clean up the pool's instances.

A thin layer over ``vastai_pool.inventory``; ``sandbox`` comes from
``vastai_pool.sandbox.cli``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vastai_pool import inventory
from vastai_pool import store as pool_store
from vastai_pool.credentials import resolve_api_key, resolve_api_url
from vastai_pool.errors import ConfigError, PoolError
from vastai_pool.models import InstanceState
from vastai_pool.store import InstanceRecord, Store, account_id, default_db_path

if TYPE_CHECKING:
    from vastai_pool.api import VastApi

logger = logging.getLogger(__name__)

# States in which an instance needs its run's process to end it.
ORPHAN_STATES = frozenset(
    {InstanceState.RENTING, InstanceState.BOOTING, InstanceState.BUSY}
)

PROG = "vastai-pool"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="List and clean up the Vast.ai instances of the Snakemake "
        "vastai executor's pool.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what is done (to stderr)"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"pool database file (default: {default_db_path()})",
    )
    common.add_argument(
        "--api-url",
        default=None,
        metavar="URL",
        help="Vast.ai API URL (default: $VAST_URL, else https://console.vast.ai)",
    )
    common.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="Vast.ai API key (default: $SNAKEMAKE_VASTAI_API_KEY, $VAST_API_KEY, "
        "else the key file of `vastai set api-key`)",
    )

    ls = subparsers.add_parser(
        "ls",
        parents=[common],
        help="list the pool's instances",
        description="List the pool's instances, with states refreshed from the "
        "Vast.ai API when credentials resolve. Without an API key, every "
        "account's instances are listed from the database.",
    )
    ls.add_argument(
        "--all", action="store_true", help="include destroyed and lost instances"
    )
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.set_defaults(func=run_ls)

    gc = subparsers.add_parser(
        "gc",
        parents=[common],
        help="destroy instances that no live run owns",
        description="Destroy the account's instances whose owning run is over "
        "(ended, its process gone, or its heartbeat stale), idle and lingering "
        "ones included, and listed instances with the pool's label that the "
        "database does not track; with --kept also the kept ones. Rows whose "
        "instance Vast.ai no longer lists are marked lost.",
    )
    gc.add_argument(
        "--dry-run", action="store_true", help="print what would be destroyed"
    )
    gc.add_argument("--kept", action="store_true", help="destroy kept instances too")
    gc.set_defaults(func=run_gc)

    reap = subparsers.add_parser(
        "reap",
        parents=[common],
        help="destroy lingering instances at their deadlines",
        description="Start a detached process that destroys each lingering "
        "instance of the account at its deadline (unless a run adopts it), "
        "ends runs that died, and exits when nothing lingers. Only one runs per "
        "pool file and account; it logs next to the pool database.",
    )
    reap.add_argument(
        "--foreground",
        action="store_true",
        help="run in this process instead of detaching",
    )
    reap.set_defaults(func=run_reap)

    machines = subparsers.add_parser(
        "machines",
        parents=[common],
        help="list or forget the machines rentals avoid",
        description="List the Vast.ai machines that failed an instance of this "
        "pool in the last "
        f"{pool_store.MACHINE_MEMORY_SECONDS / 3600:.0f} hours (a fatal boot "
        "message, a boot that timed out, SSH that never answered, a host that "
        "went offline), which new rentals skip. Without an API key, every "
        "account's are listed.",
    )
    machines.add_argument(
        "--forget",
        nargs="*",
        type=int,
        default=None,
        metavar="MACHINE_ID",
        help="stop avoiding these machines (all of them when no id is given)",
    )
    machines.add_argument("--json", action="store_true", help="print a JSON list")
    machines.set_defaults(func=run_machines)

    _add_report_parser(subparsers)
    _add_sandbox_parser(subparsers)
    return parser


def _add_report_parser(subparsers: Any) -> None:
    try:
        from vastai_pool import costs
    except ImportError as exc:
        logger.debug("report command unavailable: %s", exc)
        return
    costs.add_report_parser(subparsers)


def _add_sandbox_parser(subparsers: Any) -> None:
    try:
        from vastai_pool.sandbox import cli as sandbox_cli
    except ImportError as exc:
        logger.debug("sandbox commands unavailable: %s", exc)
        return
    sandbox_cli.add_parser(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"{PROG}: %(levelname)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except PoolError as exc:
        _err(f"{PROG}: error: {exc}")
        return 1
    except KeyboardInterrupt:
        _err(f"{PROG}: interrupted")
        return 130


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


# ls ---------------------------------------------------------------------


def _existing_db(args: argparse.Namespace) -> Path | None:
    """Return the pool database path, or None after saying it does not exist.

    ``ls`` and ``gc`` only read or clean an existing pool; opening a missing
    path would create an empty database there, e.g. at a mistyped ``--db``.
    """
    path = Path(args.db or default_db_path()).expanduser()
    if path.exists():
        return path
    sys.stderr.write(
        f"vastai-pool: no pool database at {path}, so nothing was rented "
        "through it. Give the right file with --db.\n"
    )
    return None


def run_ls(args: argparse.Namespace) -> int:
    api_url = resolve_api_url(args.api_url)
    db_path = _existing_db(args)
    if db_path is None:
        if args.json:
            sys.stdout.write("[]\n")
        return 0
    with Store(db_path) as store:
        try:
            api_key = resolve_api_key(args.api_key)
        except ConfigError:
            account = None
            refresh = inventory.Refresh(problem="no API key found")
        else:
            account = account_id(api_url, api_key)
            refresh = inventory.refresh_states(
                store, _open_api(api_url, api_key), account
            )
        if not refresh.ok:
            scope = "every account" if account is None else "this account"
            _err(
                f"{PROG}: states are from the database only ({refresh.problem}); "
                f"listing {scope}"
            )
        entries = inventory.list_pool(
            store, account=account, include_destroyed=args.all, refresh=refresh
        )
        live_runs = set(pool_store.live_run_ids(store))
    if args.json:
        _out(json.dumps([entry_json(entry) for entry in entries], indent=2))
    else:
        _out(format_table(entries))
    # Busy or booting rows of a crashed run look alive but no process
    # tends them; only gc (or the next run) will destroy them.
    orphaned = [
        entry
        for entry in entries
        if entry.record.state in ORPHAN_STATES and entry.record.run_id not in live_runs
    ]
    if orphaned:
        _err(
            f"{PROG}: {len(orphaned)} instance(s) belong to a run that is over "
            f"(crashed or ended) and still bill; `{PROG} gc --db {db_path}` "
            "destroys them."
        )
    return 0


def run_machines(args: argparse.Namespace) -> int:
    db_path = _existing_db(args)
    if db_path is None:
        if args.json:
            _out("[]")
        return 0
    try:
        account: str | None = account_id(
            resolve_api_url(args.api_url), resolve_api_key(args.api_key)
        )
    except ConfigError:
        account = None
    with Store(db_path) as store:
        if args.forget is not None:
            forgotten = pool_store.forget_failed_machines(
                store, account, args.forget or None
            )
            which = ", ".join(map(str, args.forget)) if args.forget else "every machine"
            if forgotten == 0:
                _out(f"no recorded failure of {which}; nothing was avoided")
            else:
                _out(f"forgot {forgotten} recorded failure(s) of {which}")
            return 0
        rows = pool_store.avoided_machines(store, account)
    if args.json:
        _out(
            json.dumps(
                [
                    {
                        "machine_id": row.machine_id,
                        "account": row.account,
                        "failures": row.failures,
                        "last_failure": iso_time(row.at),
                        "avoided_until": iso_time(
                            row.at + pool_store.MACHINE_MEMORY_SECONDS
                        ),
                        "instance_id": row.instance_vast_id,
                        "detail": row.detail,
                    }
                    for row in rows
                ],
                indent=2,
            )
        )
        return 0
    if not rows:
        _out("no machine is avoided")
        return 0
    header = ("MACHINE", "FAILURES", "LAST FAILURE", "AVOIDED UNTIL", "WHAT FAILED")
    lines = [
        (
            str(row.machine_id),
            str(row.failures),
            iso_time(row.at) or "",
            iso_time(row.at + pool_store.MACHINE_MEMORY_SECONDS) or "",
            _shorten(row.detail, 90),
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(4)]
    for cells in [header, *lines]:
        _out(
            "  ".join(
                cell.ljust(width) for cell, width in zip(cells[:4], widths, strict=True)
            )
            + "  "
            + cells[4]
        )
    return 0


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open_api(api_url: str, api_key: str) -> VastApi | None:
    from vastai_pool.api import VastApi

    try:
        return VastApi(api_url, api_key)
    except PoolError as exc:
        logger.warning("Cannot open the Vast.ai API at %s: %s", api_url, exc)
        return None


def entry_json(entry: inventory.PoolEntry) -> dict[str, Any]:
    record = entry.record
    return {
        "id": record.vast_id,
        "label": record.label,
        "account": record.account,
        "state": record.state.value,
        "api_status": entry.api_status,
        "gpu_name": record.hardware.gpu_name,
        "num_gpus": record.hardware.num_gpus,
        "dph_total": record.hardware.dph_total,
        "jobs": entry.jobs,
        "run_id": record.run_id,
        "rented_at": iso_time(record.rented_at),
        "ready_at": iso_time(record.ready_at),
        "idle_since": iso_time(record.idle_since),
        "destroyed_at": iso_time(record.destroyed_at),
        "destroy_reason": record.destroy_reason.value
        if record.destroy_reason
        else None,
        "kept": entry.kept,
        "deadline": iso_time(entry.deadline),
    }


def iso_time(epoch: float | None) -> str | None:
    """Return an epoch time as ISO 8601 in UTC, to the second."""
    if epoch is None:
        return None
    moment = datetime.fromtimestamp(epoch, tz=UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


_COLUMNS = (
    "id",
    "state",
    "gpu",
    "$/h",
    "jobs",
    "rented",
    "destroyed",
    "kept",
    "deadline",
)


def format_table(entries: Sequence[inventory.PoolEntry]) -> str:
    if not entries:
        return "No instances in the pool."
    rows = [_COLUMNS]
    for entry in entries:
        record = entry.record
        state = record.state.value
        if entry.api_status:
            state += f" ({entry.api_status})"
        rows.append(
            (
                str(record.vast_id) if record.vast_id is not None else "-",
                state,
                f"{record.hardware.num_gpus}x {record.hardware.gpu_name}",
                f"{record.hardware.dph_total:.3f}",
                str(entry.jobs),
                iso_time(record.rented_at) or "-",
                iso_time(record.destroyed_at) or "-",
                "yes" if entry.kept else "no",
                iso_time(entry.deadline) or "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


# gc ---------------------------------------------------------------------


def run_gc(args: argparse.Namespace) -> int:
    api_url = resolve_api_url(args.api_url)
    api_key = resolve_api_key(args.api_key)
    account = account_id(api_url, api_key)
    db_path = _existing_db(args)
    if db_path is None:
        sys.stdout.write("Nothing to destroy.\n")
        return 0
    if not args.verbose:
        # gc prints each recovery, destroy and failure itself below, so the
        # inventory's log lines would repeat them.
        logging.getLogger(inventory.__name__).setLevel(logging.CRITICAL)
    with Store(db_path) as store:
        report = inventory.collect_garbage(
            store,
            _open_api(api_url, api_key),
            account,
            include_kept=args.kept,
            dry_run=args.dry_run,
        )
    if not report.refresh.ok:
        _err(f"{PROG}: states are from the database only ({report.refresh.problem})")
    for record in report.refresh.marked_lost:
        _out(f"marked lost {_describe(record)}: Vast.ai no longer lists it")
    for run_id in report.recovered_runs:
        _out(f"ended run {run_id}: its process died without closing the pool")

    verb = "would destroy" if report.dry_run else "destroyed"
    if not report.actions and not report.strays:
        _out("Nothing to destroy.")
    for stray in report.strays:
        remote = stray.remote
        if stray.error:
            _err(
                f"{PROG}: error: destroying instance {remote.id} {remote.label} "
                f"failed: {stray.error}"
            )
        else:
            _out(f"{verb} instance {remote.id} {remote.label}: it {stray.why}")
    for action in report.actions:
        if action.error:
            _err(
                f"{PROG}: error: destroying {_describe(action.record)} failed: "
                f"{action.error}"
            )
        else:
            _out(f"{verb} {_describe(action.record)}: {action.why}")
    for record in report.skipped:
        _out(f"skipped {_describe(record)}: another process changed it meanwhile")
    return 0 if report.ok else 1


def _describe(record: InstanceRecord) -> str:
    vast_id = record.vast_id if record.vast_id is not None else "(no id)"
    hardware = record.hardware
    return (
        f"instance {vast_id} {record.label} ({hardware.num_gpus}x "
        f"{hardware.gpu_name}, ${hardware.dph_total:.3f}/h)"
    )


# reap -------------------------------------------------------------------


def run_reap(args: argparse.Namespace) -> int:
    from vastai_pool import reap

    api_url = resolve_api_url(args.api_url)
    api_key = resolve_api_key(args.api_key)
    db_path = Path(args.db or default_db_path()).expanduser()
    if not db_path.is_file():
        raise ConfigError(
            f"No pool database at {db_path}; pass --db with the file a run used."
        )
    if not args.foreground:
        reap.spawn_reaper(db_path, api_url, api_key)
        _out(f"reaper started; it logs to {reap.log_path(db_path)}")
        return 0
    reap.log_to_file(db_path)
    try:
        return reap.reap_forever(db_path, api_url, api_key)
    except Exception:
        # A detached reaper has no stderr, so the log file is the only trace.
        logger.exception("the reaper for %s failed", db_path)
        raise


if __name__ == "__main__":
    sys.exit(main())
