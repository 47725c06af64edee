"""``vastai-pool sandbox serve``: run a sandbox marketplace until interrupted."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from vastai_pool.sandbox.fault_script import FaultScriptError
from vastai_pool.sandbox.hosts import HOST_BACKENDS, HOSTS_VARIABLE, HostBackendError
from vastai_pool.sandbox.service import Sandbox

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``sandbox serve`` on a ``vastai-pool`` sub-command parser."""
    sandbox = subparsers.add_parser(
        "sandbox",
        help="run a local Vast.ai marketplace for trying the pool offline",
        description="A local emulator of the Vast.ai REST API whose instances "
        "are SSH servers on 127.0.0.1.",
    )
    commands = sandbox.add_subparsers(
        dest="sandbox_command", required=True, metavar="COMMAND"
    )
    serve = commands.add_parser(
        "serve",
        help="serve the sandbox API until SIGINT or SIGTERM",
        description="Serve the sandbox API on 127.0.0.1. The first two lines on "
        "stdout are VAST_URL=... and VAST_API_KEY=...; every instance is "
        "destroyed on exit.",
    )
    serve.add_argument(
        "--port",
        type=int,
        default=0,
        help="TCP port to listen on (default: a free one)",
    )
    serve.add_argument(
        "--api-key", default=None, help="API key clients must send (default: random)"
    )
    serve.add_argument(
        "--boot-seconds",
        type=float,
        default=1.0,
        help="seconds an instance takes from create to running (default: 1.0)",
    )
    serve.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="directory for instance homes (default: a temporary one, removed on exit)",
    )
    serve.add_argument(
        "--faults",
        type=Path,
        default=None,
        metavar="FILE",
        help='JSON fault script to replay: {"seed": N, "rules": [...]} '
        "(default: no faults)",
    )
    serve.add_argument(
        "--hosts",
        choices=HOST_BACKENDS,
        default=None,
        help="SSH server of each instance: paramiko (in-process) or "
        "openssh (the system's sshd with the instance's home mounted over /root; "
        f"needs root) (default: ${HOSTS_VARIABLE}, else paramiko)",
    )
    serve.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; return the exit code."""
    if args.port < 0 or args.port > 65535:
        sys.stderr.write(f"error: invalid --port {args.port}; use 0-65535\n")
        return 2
    if args.boot_seconds < 0:
        sys.stderr.write(
            f"error: invalid --boot-seconds {args.boot_seconds}; use >= 0\n"
        )
        return 2
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {
        signum: signal.signal(signum, request_stop)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    faults = getattr(args, "faults", None)
    try:
        sandbox = Sandbox(
            api_key=args.api_key,
            port=args.port,
            boot_seconds=args.boot_seconds,
            state_dir=args.state_dir,
            faults=faults,
            hosts=getattr(args, "hosts", None),
        )
    except FaultScriptError as error:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.stderr.write(f"error: invalid --faults {faults}: {error}\n")
        return 2
    except HostBackendError as error:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sys.stderr.write(f"error: {error}\n")
        return 2
    if faults is not None:
        logger.info("sandbox: replaying the fault script %s", faults)
    try:
        try:
            sandbox.start()
        except OSError as error:
            sys.stderr.write(
                f"error: cannot listen on 127.0.0.1:{args.port}: {error}\n"
            )
            return 1
        sys.stdout.write(f"VAST_URL={sandbox.url}\nVAST_API_KEY={sandbox.api_key}\n")
        sys.stdout.flush()
        while not stop.wait(timeout=1.0):
            pass
        logger.info(
            "sandbox: stopping, destroying %d instances", len(sandbox.ledger()["alive"])
        )
    finally:
        sandbox.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
