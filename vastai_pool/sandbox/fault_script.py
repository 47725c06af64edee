"""Seeded fault scripts for the sandbox: ``ScriptedFaults`` and its loader.

A script is a JSON object ``{"seed": 7, "rules": [...]}`` (a bare list of
rules means seed 0). Each rule has a ``kind`` and at most one of ``rate``
and ``count``. A ``rate`` is the chance that an eligible operation is hit,
drawn from a ``random.Random`` seeded per rule. A ``count`` hits the first
N eligible operations, and a rule with neither hits every one. Optional
targets narrow a rule: ``offer``, ``gpu_name``, ``machine``, ``instance``,
``route`` (a regex searched in the normalised path) and ``method``.

The eligible operation of each kind:

- ``offer_taken``, ``create_fails``: a create call on an offer;
- ``boot_stuck``, ``boot_fatal``: an instance's boot, decided once;
- ``http_429``, ``http_502``, ``http_503``, ``http_504``: an API request
  (``/api/`` paths); a hit fails the next ``burst`` eligible requests;
- ``host_offline``, ``ssh_drop``, ``destroyed_outside``: an instance that
  has run for ``after_seconds``, decided once; ``ssh_drop`` with
  ``"during": "sftp"`` instead decides at its first SFTP read or write;
- ``destroy_504_once``: the first destroy call on an instance.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vastai_pool.sandbox.faults import BootFault, FaultHooks, Reply
from vastai_pool.sandbox.market import ApiFailure, Market

if TYPE_CHECKING:
    from vastai_pool.sandbox.instance import Instance

logger = logging.getLogger(__name__)

CREATE_KINDS = frozenset({"offer_taken", "create_fails"})
BOOT_KINDS = frozenset({"boot_stuck", "boot_fatal"})
HTTP_STATUS = {"http_429": 429, "http_502": 502, "http_503": 503, "http_504": 504}
RUNNING_KINDS = frozenset({"host_offline", "ssh_drop", "destroyed_outside"})
DESTROY_KINDS = frozenset({"destroy_504_once"})
KINDS = CREATE_KINDS | BOOT_KINDS | set(HTTP_STATUS) | RUNNING_KINDS | DESTROY_KINDS

FATAL_MESSAGES = (
    "pull rate limit",
    "manifest unknown",
    "OCI runtime create failed",
    "no space left on device",
)
# The status_msg of each fatal boot, modelled on docker daemon errors.
FATAL_STATUS_MSG = {
    "pull rate limit": "Error response from daemon: toomanyrequests: You have "
    "reached your pull rate limit. You may increase the limit by "
    "authenticating and upgrading",
    "manifest unknown": "Error response from daemon: manifest for the image "
    "not found: manifest unknown: manifest unknown",
    "OCI runtime create failed": "Error response from daemon: OCI runtime create "
    "failed: runc create failed: unable to start container process",
    "no space left on device": "Error response from daemon: failed to register "
    "layer: write /usr/lib/libcuda.so: no space left on device",
}
# Plain-text bodies of the 5xx replies, in the style of a gateway proxy page.
GATEWAY_BODIES = {
    502: "<html><body><h1>502 Bad Gateway</h1></body></html>\n",
    503: "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>\n",
    504: "<html><body><h1>504 Gateway Time-out</h1></body></html>\n",
}
RATE_LIMIT_BODY = "API requests too frequent"
SFTP_DURING = "sftp"

TARGET_KEYS = ("offer", "gpu_name", "machine", "instance", "route", "method")
COMMON_KEYS = frozenset({"kind", "rate", "count"})
# The targets each kind can match on. A create has its offer, an instance's
# faults have the instance and its offer, an API request has its method and
# path, and a destroy call has both.
OFFER_TARGETS = frozenset({"offer", "gpu_name", "machine"})
INSTANCE_TARGETS = OFFER_TARGETS | {"instance"}
REQUEST_TARGETS = frozenset({"route", "method"})
TARGETS: dict[str, frozenset[str]] = {
    **dict.fromkeys(CREATE_KINDS, OFFER_TARGETS),
    **dict.fromkeys(BOOT_KINDS | RUNNING_KINDS, INSTANCE_TARGETS),
    **dict.fromkeys(HTTP_STATUS, REQUEST_TARGETS),
    **dict.fromkeys(DESTROY_KINDS, INSTANCE_TARGETS | REQUEST_TARGETS),
}
EXTRA_KEYS: dict[str, frozenset[str]] = {
    "boot_fatal": frozenset({"message"}),
    "http_429": frozenset({"burst"}),
    "http_502": frozenset({"burst"}),
    "http_503": frozenset({"burst"}),
    "http_504": frozenset({"burst"}),
    "host_offline": frozenset({"after_seconds", "gone_after_seconds"}),
    "ssh_drop": frozenset({"after_seconds", "during"}),
    "destroyed_outside": frozenset({"after_seconds"}),
}
DESTROY_ROUTE = re.compile(r"^/api/v0/instances/(?P<id>\d+)$")


class FaultScriptError(ValueError):
    """A fault script that cannot be used; the message names the rule and value."""


@dataclass
class FaultRule:
    """One validated rule of a fault script, with its own random stream."""

    index: int
    kind: str
    rate: float | None
    count: int | None
    offer: int | None = None
    gpu_name: str | None = None
    machine: int | None = None
    instance: int | None = None
    route: re.Pattern[str] | None = None
    method: str | None = None
    message: str = FATAL_MESSAGES[0]
    burst: int = 1
    after_seconds: float = 0.0
    gone_after_seconds: float = 5.0
    during: str | None = None
    rng: random.Random = field(default_factory=random.Random)
    eligible: int = 0
    burst_left: int = 0

    def roll(self) -> bool:
        """Count one eligible operation; return True when the rule hits it."""
        self.eligible += 1
        if self.count is not None:
            return self.eligible <= self.count
        rate = 1.0 if self.rate is None else self.rate
        return self.rng.random() < rate

    def matches_offer(self, offer: dict[str, Any] | None) -> bool:
        if self.offer is None and self.gpu_name is None and self.machine is None:
            return True
        if offer is None:
            return False
        if self.offer is not None and offer.get("id") != self.offer:
            return False
        if self.gpu_name is not None and offer.get("gpu_name") != self.gpu_name:
            return False
        return self.machine is None or offer.get("machine_id") == self.machine

    def matches_instance(self, instance_id: int, offer: dict[str, Any] | None) -> bool:
        if self.instance is not None and instance_id != self.instance:
            return False
        return self.matches_offer(offer)

    def matches_request(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        return self.route is None or self.route.search(path) is not None


def load_script(source: str | Path | dict[str, Any] | list[Any]) -> ScriptedFaults:
    """Build ``ScriptedFaults`` from a script dict or list, or a JSON file path."""
    if isinstance(source, str | Path):
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as error:
            raise FaultScriptError(
                f"cannot read the fault script {path}: {error}"
            ) from error
        try:
            source = json.loads(text)
        except json.JSONDecodeError as error:
            raise FaultScriptError(
                f"fault script {path} is not valid JSON: {error}; "
                'write {"seed": N, "rules": [...]}'
            ) from error
    return ScriptedFaults(source)


def parse_script(script: dict[str, Any] | list[Any]) -> tuple[int, list[FaultRule]]:
    """Validate a script; return its seed and rules or raise FaultScriptError."""
    if isinstance(script, list):
        seed: Any = 0
        rules = script
    elif isinstance(script, dict):
        unknown = set(script) - {"seed", "rules"}
        if unknown:
            raise FaultScriptError(
                f"fault script has unknown keys {sorted(unknown)}; use seed and rules"
            )
        seed = script.get("seed", 0)
        rules = script.get("rules", [])
    else:
        raise FaultScriptError(
            f"fault script must be an object or a list, got {type(script).__name__}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FaultScriptError(f"fault script seed {seed!r} is not an integer")
    if not isinstance(rules, list):
        raise FaultScriptError(f"fault script rules must be a list, got {rules!r}")
    return seed, [_parse_rule(index, rule, seed) for index, rule in enumerate(rules)]


def _parse_rule(index: int, raw: Any, seed: int) -> FaultRule:
    where = f"fault rule {index}"
    if not isinstance(raw, dict):
        raise FaultScriptError(f"{where}: expected an object, got {raw!r}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise FaultScriptError(
            f"{where}: unknown kind {kind!r}; use one of {', '.join(sorted(KINDS))}"
        )
    allowed = COMMON_KEYS | TARGETS[kind] | EXTRA_KEYS.get(kind, frozenset())
    unknown = set(raw) - allowed
    if unknown:
        ignored = sorted(unknown & set(TARGET_KEYS))
        if ignored:
            raise FaultScriptError(
                f"{where}: kind {kind} cannot be narrowed by {', '.join(ignored)}; "
                f"its targets are {', '.join(sorted(TARGETS[kind]))}"
            )
        raise FaultScriptError(
            f"{where}: unknown keys {sorted(unknown)} for kind {kind}; "
            f"use {', '.join(sorted(allowed))}"
        )
    rate, count = raw.get("rate"), raw.get("count")
    if rate is not None and count is not None:
        raise FaultScriptError(f"{where}: give rate or count, not both")
    if rate is not None and (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not 0 <= rate <= 1
    ):
        raise FaultScriptError(f"{where}: rate {rate!r} is outside [0, 1]")
    if count is not None and (
        isinstance(count, bool) or not isinstance(count, int) or count < 0
    ):
        raise FaultScriptError(f"{where}: count {count!r} is not an integer >= 0")

    rule = FaultRule(
        index=index,
        kind=kind,
        rate=None if rate is None else float(rate),
        count=count,
        rng=random.Random(f"{seed}:{index}"),
    )
    for key in ("offer", "machine", "instance"):
        value = raw.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int)
        ):
            raise FaultScriptError(f"{where}: {key} {value!r} is not an integer id")
        setattr(rule, key, value)
    for key in ("gpu_name", "method"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise FaultScriptError(f"{where}: {key} {value!r} is not a string")
        setattr(rule, key, value.upper() if key == "method" and value else value)

    route = raw.get("route")
    if route is not None:
        try:
            rule.route = re.compile(str(route))
        except re.error as error:
            raise FaultScriptError(
                f"{where}: route {route!r} is not a valid regex: {error}"
            ) from error

    if "message" in raw:
        if raw["message"] not in FATAL_MESSAGES:
            raise FaultScriptError(
                f"{where}: message {raw['message']!r} is not a known fatal boot "
                f"message; use one of {', '.join(FATAL_MESSAGES)}"
            )
        rule.message = raw["message"]
    if "burst" in raw:
        burst = raw["burst"]
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise FaultScriptError(f"{where}: burst {burst!r} is not an integer >= 1")
        rule.burst = burst
    for key in ("after_seconds", "gone_after_seconds"):
        if key in raw:
            value = raw[key]
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or value < 0
            ):
                raise FaultScriptError(f"{where}: {key} {value!r} is not a number >= 0")
            setattr(rule, key, float(value))
    if "during" in raw:
        if raw["during"] != SFTP_DURING:
            raise FaultScriptError(
                f"{where}: during {raw['during']!r} is unknown; use {SFTP_DURING!r}"
            )
        rule.during = SFTP_DURING
    return rule


@dataclass
class _Offline:
    at: float
    gone_at: float
    announced: bool = False


class FaultedMarket(Market):
    """A market whose ledger also reports the faults injected, when scripted."""

    def ledger(self) -> dict[str, Any]:
        result = super().ledger()
        if isinstance(self.faults, ScriptedFaults):
            result["faults"] = self.faults.injected
        return result


class ScriptedFaults(FaultHooks):
    """Fault hooks driven by a seeded script; thread-safe.

    The sandbox binds it to its market (``bind``) and calls ``advance``
    on every tick, which applies the faults of running instances.
    """

    def __init__(self, script: dict[str, Any] | list[Any]) -> None:
        self.seed, self.rules = parse_script(script)
        self._lock = threading.Lock()
        self._injected: dict[str, int] = {}
        self._market: Market | None = None
        self._boot: dict[int, BootFault | None] = {}
        self._running_decided: set[tuple[int, int]] = set()
        self._pending: list[tuple[float, FaultRule, int]] = []
        self._offline: dict[int, _Offline] = {}
        self._destroy_seen: set[int] = set()

    @property
    def injected(self) -> dict[str, int]:
        """Faults injected so far, by kind."""
        with self._lock:
            return dict(self._injected)

    def bind(self, market: Market) -> None:
        """Give the hooks the market whose instances they act on."""
        self._market = market

    def _record(self, rule: FaultRule, what: str, *args: object) -> None:
        self._injected[rule.kind] = self._injected.get(rule.kind, 0) + 1
        logger.info(
            "sandbox fault %s (rule %d): %s", rule.kind, rule.index, what % args
        )

    def _instance(self, instance_id: int) -> Instance | None:
        return self._market.get(instance_id) if self._market is not None else None

    def _offer_of(self, instance_id: int) -> dict[str, Any] | None:
        instance = self._instance(instance_id)
        return instance.offer if instance is not None else None

    def _catalog_offer(self, offer_id: int) -> dict[str, Any] | None:
        if self._market is None:
            return {"id": offer_id}
        for offer in self._market.catalog():
            if offer["id"] == offer_id:
                return offer
        return None

    # -- hook points

    def http_reply(self, method: str, path: str) -> Reply | None:
        if not path.startswith("/api/"):
            return None
        destroy = DESTROY_ROUTE.match(path) if method == "DELETE" else None
        with self._lock:
            for rule in self.rules:
                status = HTTP_STATUS.get(rule.kind)
                if status is None or not rule.matches_request(method, path):
                    continue
                if rule.burst_left == 0 and rule.roll():
                    rule.burst_left = rule.burst
                if rule.burst_left > 0:
                    rule.burst_left -= 1
                    self._record(rule, "%s %s answered %d", method, path, status)
                    return _http_fault(status)
            if destroy is not None:
                return self._destroy_reply(method, path, int(destroy["id"]))
        return None

    def _destroy_reply(self, method: str, path: str, instance_id: int) -> Reply | None:
        if instance_id in self._destroy_seen:
            return None
        self._destroy_seen.add(instance_id)
        offer = self._offer_of(instance_id)
        for rule in self.rules:
            if rule.kind not in DESTROY_KINDS:
                continue
            if not rule.matches_request(method, path):
                continue
            if rule.matches_instance(instance_id, offer) and rule.roll():
                self._record(rule, "destroy of instance %d answered 504", instance_id)
                return _http_fault(504)
        return None

    def create_reply(self, offer_id: int) -> Reply | None:
        offer = self._catalog_offer(offer_id)
        with self._lock:
            for rule in self.rules:
                if rule.kind not in CREATE_KINDS or not rule.matches_offer(offer):
                    continue
                if not rule.roll():
                    continue
                self._record(rule, "create on offer %d refused", offer_id)
                if rule.kind == "offer_taken":
                    return Reply(
                        404,
                        {
                            "success": False,
                            "error": "no_such_ask",
                            "msg": f"error 404/3603: no_such_ask Instance type by "
                            f"id {offer_id} is not available.",
                            "ask_id": offer_id,
                        },
                    )
                return Reply(
                    200,
                    {
                        "success": False,
                        "error": "create_failed",
                        "msg": f"Could not create an instance on offer {offer_id}; "
                        "the host did not accept the contract.",
                    },
                )
        return None

    def boot_fault(self, instance_id: int) -> BootFault | None:
        with self._lock:
            if instance_id in self._boot:
                return self._boot[instance_id]
        offer = self._offer_of(instance_id)
        with self._lock:
            if instance_id in self._boot:
                return self._boot[instance_id]
            fault = None
            for rule in self.rules:
                if rule.kind not in BOOT_KINDS:
                    continue
                if not rule.matches_instance(instance_id, offer) or not rule.roll():
                    continue
                if rule.kind == "boot_stuck":
                    fault = BootFault("loading", "Pulling image: waiting for a layer")
                    self._record(rule, "instance %d stuck loading", instance_id)
                else:
                    fault = BootFault("created", FATAL_STATUS_MSG[rule.message])
                    self._record(
                        rule, "instance %d boot fails: %s", instance_id, rule.message
                    )
                break
            self._boot[instance_id] = fault
            return fault

    def host_online(self, instance_id: int) -> bool:
        with self._lock:
            offline = self._offline.get(instance_id)
        return offline is None or time.time() < offline.at

    def accept_ssh(self, instance_id: int) -> bool:
        return self.host_online(instance_id)

    def sftp_transfer(self, instance_id: int) -> None:
        """Called by the SFTP server on every file read or write of an instance.

        An ``ssh_drop`` rule with ``during: sftp`` decides at an instance's
        first transfer whether to drop its connections there.
        """
        offer = self._offer_of(instance_id)
        hit: FaultRule | None = None
        with self._lock:
            for rule in self.rules:
                if rule.kind != "ssh_drop" or rule.during != SFTP_DURING:
                    continue
                key = (rule.index, instance_id)
                if key in self._running_decided:
                    continue
                self._running_decided.add(key)
                if rule.matches_instance(instance_id, offer) and rule.roll():
                    hit = rule
                    self._record(
                        rule, "instance %d SSH dropped during SFTP", instance_id
                    )
                    break
        instance = self._instance(instance_id) if hit is not None else None
        if instance is not None:
            instance.ssh.drop_connections()

    # -- running instances

    def advance(self, now: float) -> None:
        """Decide and apply the faults of running instances; called every tick."""
        market = self._market
        if market is None:
            return
        for row in market.rows():
            if row.get("actual_status") == "running" and row.get("uptime_mins"):
                self._decide_running(row, now)
        with self._lock:
            due = [entry for entry in self._pending if entry[0] <= now]
            self._pending = [entry for entry in self._pending if entry[0] > now]
            offline = [
                (instance_id, state)
                for instance_id, state in self._offline.items()
                if now >= state.at
            ]
        for _, rule, instance_id in due:
            self._apply(rule, instance_id, now)
        for instance_id, state in offline:
            instance = market.get(instance_id)
            if instance is None:
                continue
            if not state.announced:
                state.announced = True
                instance.ssh.drop_connections()
            if now >= state.gone_at and _vanish(market, instance_id):
                logger.info(
                    "sandbox fault host_offline: instance %d is gone", instance_id
                )

    def _decide_running(self, row: dict[str, Any], now: float) -> None:
        instance_id = row["id"]
        offer = {
            "id": row.get("bundle_id"),
            "gpu_name": row.get("gpu_name"),
            "machine_id": row.get("machine_id"),
        }
        instance = self._instance(instance_id)
        if instance is not None:
            offer = instance.offer
        running_since = now - float(row["uptime_mins"]) * 60.0
        with self._lock:
            for rule in self.rules:
                if rule.kind not in RUNNING_KINDS or rule.during == SFTP_DURING:
                    continue
                key = (rule.index, instance_id)
                if key in self._running_decided:
                    continue
                self._running_decided.add(key)
                if not rule.matches_instance(instance_id, offer) or not rule.roll():
                    continue
                due = running_since + rule.after_seconds
                self._pending.append((due, rule, instance_id))

    def _apply(self, rule: FaultRule, instance_id: int, now: float) -> None:
        market = self._market
        instance = market.get(instance_id) if market is not None else None
        if instance is None or market is None:
            return
        with self._lock:
            if rule.kind == "host_offline":
                self._offline[instance_id] = _Offline(
                    now, now + rule.gone_after_seconds
                )
                self._record(rule, "instance %d host offline", instance_id)
            elif rule.kind == "ssh_drop":
                self._record(rule, "instance %d SSH connections dropped", instance_id)
            else:
                self._record(rule, "instance %d destroyed outside", instance_id)
        if rule.kind == "ssh_drop":
            instance.ssh.drop_connections()
        elif rule.kind == "host_offline":
            instance.ssh.drop_connections()
        else:
            _vanish(market, instance_id)


def _vanish(market: Market, instance_id: int) -> bool:
    """Destroy an instance as the platform does; False if it is already gone."""
    try:
        market.destroy(str(instance_id))
    except ApiFailure:
        return False
    return True


def _http_fault(status: int) -> Reply:
    # Vast.ai sends no Retry-After on these replies.
    if status == 429:
        return Reply(429, RATE_LIMIT_BODY)
    return Reply(status, GATEWAY_BODIES[status])
