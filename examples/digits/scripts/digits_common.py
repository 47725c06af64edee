"""Helpers shared by the digits workflow's scripts."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

# Digits of precision kept for every metric, so metric files compare byte
# for byte between runs.
METRIC_DIGITS = 6


def start_logging(log_path: str) -> logging.Logger:
    """Send this script's log records to the rule's log file."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=log_path,
        filemode="w",
        level=logging.INFO,
        format="%(levelname)s %(message)s",
    )
    return logging.getLogger("digits")


def round_metric(value: float) -> float:
    return round(float(value), METRIC_DIGITS)


# A JSON list of numbers only, as ``json.dumps(indent=2)`` spreads it.
_NUMBER_LIST = re.compile(r"\[\s+([-0-9.e,\s]+?)\s+\]")


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as JSON with sorted keys and a trailing newline.

    Lists of numbers (such as confusion matrix rows) stay on one line.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True)
    text = _NUMBER_LIST.sub(_join_number_list, text)
    Path(path).write_text(text + "\n", encoding="utf-8")


def _join_number_list(match: re.Match[str]) -> str:
    numbers = match[1].replace(" ", "").replace("\n", "").split(",")
    return "[" + ", ".join(numbers) + "]"


def read_json(path: str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
