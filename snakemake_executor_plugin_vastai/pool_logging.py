"""Forwarding of the plugin's and the pool's log records to Snakemake's output."""

from __future__ import annotations

import logging
from collections.abc import Callable

FORWARDED_LOGGERS = ("vastai_pool", "snakemake_executor_plugin_vastai")


class _ForwardHandler(logging.Handler):
    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        # Snakemake's formatter prints ``record.msg`` without its arguments,
        # so the message is merged here.
        merged = logging.makeLogRecord(record.__dict__)
        merged.msg, merged.args = record.getMessage(), None
        self.target.handle(merged)


def forward_logs(target: logging.Logger, *, verbose: bool) -> Callable[[], None]:
    """Send the records of ``FORWARDED_LOGGERS`` at INFO (DEBUG when verbose)
    to ``target``'s handlers, so they appear in Snakemake's output and log file.

    Returns the function that undoes this.
    """
    handler = _ForwardHandler(target)
    sources = [logging.getLogger(name) for name in FORWARDED_LOGGERS]
    previous_levels = [source.level for source in sources]
    for source in sources:
        source.setLevel(logging.DEBUG if verbose else logging.INFO)
        source.addHandler(handler)

    def stop() -> None:
        for source, level in zip(sources, previous_levels, strict=True):
            source.removeHandler(handler)
            source.setLevel(level)

    return stop
