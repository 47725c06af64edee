"""The sandbox market's state and operations, independent of HTTP.

Operations return the JSON body of a success reply and raise ``ApiFailure``
with the status code and body Vast.ai sends for an error. One lock guards
the offers, instances and account; slow work (killing processes, stopping
SSH servers) happens outside it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vastai_pool.sandbox.catalog import build_catalog
from vastai_pool.sandbox.faults import FaultHooks
from vastai_pool.sandbox.hosts import PARAMIKO
from vastai_pool.sandbox.instance import Instance, LaunchSpec
from vastai_pool.sandbox.offer_query import (
    OPERATORS,
    QueryError,
    compare,
    order_rows,
    price_offer,
    search_offers,
)

logger = logging.getLogger(__name__)

FIRST_INSTANCE_ID = 7000001
ACCOUNT_USER_ID = 4242
MAX_PAGE_SIZE = 25
# A page size of 0 or less counts as this many rows, as in the v1 API.
NONPOSITIVE_PAGE_SIZE = 5
MAX_LABEL_LENGTH = 1024
MAX_BULK_IDS = 64
# A log result URL returns 404 to its first fetch and until this many
# seconds after the request, as Vast.ai's does while it collects the log.
LOG_READY_SECONDS = 0.5
# Columns of the v1 list computed from other values; filtering on them is a
# 400 invalid_request in the v1 API.
COMPUTED_COLUMNS = frozenset({"dph_total", "num_gpus", "duration", "uptime_mins"})
RUNTYPE_DEFAULT = "ssh"


@dataclass
class ApiFailure(Exception):
    """An API error reply: HTTP status, body (JSON, or text when a str), headers."""

    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, status: int, error: str, msg: str, **extra: Any) -> ApiFailure:
        return cls(status, {"success": False, "error": error, "msg": msg, **extra})


@dataclass
class LogResult:
    text: str
    ready_at: float
    fetched: bool = False


class Market:
    """Offers, instances, account keys and the ledger of one sandbox."""

    def __init__(
        self, *, state_dir: Path, boot_seconds: float, hosts: str = PARAMIKO
    ) -> None:
        self.state_dir = state_dir
        self.boot_seconds = boot_seconds
        # The SSH server backend of new instances (see ``hosts.HOST_BACKENDS``).
        self.hosts = hosts
        self.faults = FaultHooks()
        self.base_url = ""
        self._lock = threading.RLock()
        self._catalog = {offer["id"]: offer for offer in build_catalog()}
        self._rented_offers: dict[int, int] = {}
        self._instances: dict[int, Instance] = {}
        self._destroyed: list[Instance] = []
        self._next_id = FIRST_INSTANCE_ID
        self._ssh_keys: list[dict[str, Any]] = []
        self._next_key_id = 1
        self._log_results: dict[str, LogResult] = {}
        self._closed = False

    # -- offers

    def catalog(self) -> list[dict[str, Any]]:
        """Return every offer of the catalog, rented or not, unpriced."""
        return [dict(offer) for offer in self._catalog.values()]

    def search(self, query: Any) -> dict[str, Any]:
        with self._lock:
            available = [
                offer
                for offer_id, offer in self._catalog.items()
                if offer_id not in self._rented_offers
            ]
        try:
            return {"offers": search_offers(available, query)}
        except QueryError as error:
            raise ApiFailure.of(400, "invalid_request", str(error)) from error

    # -- create

    def create(self, offer_id_text: str, body: dict[str, Any]) -> dict[str, Any]:
        offer_id = _parse_id(offer_id_text, "offer")
        reply = self.faults.create_reply(offer_id)
        if reply is not None:
            raise ApiFailure(reply.status, reply.body, dict(reply.headers))
        with self._lock:
            if self._closed:
                raise ApiFailure.of(503, "unavailable", "the sandbox is shutting down")
            offer = self._catalog.get(offer_id)
            if offer is None or offer_id in self._rented_offers:
                raise ApiFailure.of(
                    404,
                    "no_such_ask",
                    f"error 404/3603: no_such_ask Instance type by id {offer_id} "
                    "is not available.",
                    ask_id=offer_id,
                )
            spec = _launch_spec(body, offer)
            instance_id = self._next_id
            self._next_id += 1
            self._rented_offers[offer_id] = instance_id
            keys = [entry["public_key"] for entry in self._ssh_keys]
        try:
            instance = Instance(
                instance_id=instance_id,
                offer=price_offer(offer, spec.disk_gb),
                spec=spec,
                root_dir=self.state_dir / "instances" / str(instance_id),
                boot_seconds=self.boot_seconds,
                authorized_keys=keys,
                faults=self.faults,
                now=time.time(),
                hosts=self.hosts,
            )
        except Exception:
            with self._lock:
                self._rented_offers.pop(offer_id, None)
            raise
        with self._lock:
            self._instances[instance_id] = instance
        logger.debug("instance %d: rented offer %d", instance_id, offer_id)
        return {
            "success": True,
            "new_contract": instance_id,
            "instance_api_key": secrets.token_hex(32),
        }

    # -- show and list

    def get(self, instance_id: int) -> Instance | None:
        with self._lock:
            return self._instances.get(instance_id)

    def require(self, instance_id_text: str) -> Instance:
        instance_id = _parse_id(instance_id_text, "instance")
        instance = self.get(instance_id)
        if instance is None:
            raise ApiFailure.of(
                404, "no_such_instance", f"Instance {instance_id} not found."
            )
        return instance

    def show(self, instance_id_text: str) -> dict[str, Any]:
        instance = self.get(_parse_id(instance_id_text, "instance"))
        return {"instances": instance.row(time.time()) if instance else None}

    def advance_all(self) -> None:
        """Move every instance's lifecycle and bill forward to now.

        The sandbox calls this periodically, so onstart scripts start and
        args entrypoints turn ``exited`` even when no client polls.
        """
        with self._lock:
            instances = list(self._instances.values())
        now = time.time()
        for instance in instances:
            instance.advance(now)

    def rows(self) -> list[dict[str, Any]]:
        with self._lock:
            instances = list(self._instances.values())
        now = time.time()
        return [instance.row(now) for instance in instances]

    def list_v0(self) -> dict[str, Any]:
        rows = self.rows()
        return {"instances_found": len(rows), "instances": rows}

    def list_v1(self, params: dict[str, str]) -> dict[str, Any]:
        """Serve one page of ``GET /api/v1/instances/``."""
        filters = _json_param(params, "select_filters", {})
        order_by = _json_param(params, "order_by", [{"col": "id", "dir": "asc"}])
        select_cols = _json_param(params, "select_cols", None)
        if not isinstance(filters, dict) or not isinstance(order_by, list):
            raise ApiFailure.of(
                400, "invalid_request", "invalid select_filters/order_by"
            )
        limit = _page_size(params.get("limit"))
        offset = _decode_token(params.get("after_token"))

        all_rows = self.rows()
        matching = [row for row in all_rows if _row_matches(row, filters)]
        order = [
            (str(entry.get("col")), str(entry.get("dir", "asc")).lower() == "desc")
            for entry in order_by
            if isinstance(entry, dict)
        ]
        if "id" not in [col for col, _ in order]:
            order.append(("id", False))
        ordered = order_rows(matching, order)
        page = ordered[offset : offset + limit]
        next_offset = offset + len(page)

        label_counts: dict[str, int] = {}
        for row in all_rows:
            key = row.get("label") or ""
            label_counts[key] = label_counts.get(key, 0) + 1
        if isinstance(select_cols, list) and select_cols and select_cols != ["*"]:
            page = [{col: row.get(col) for col in select_cols} for row in page]
        more = next_offset < len(ordered)
        return {
            "success": True,
            "instances_found": len(page),
            "total_instances": len(matching),
            "label_counts": label_counts,
            "instances": page,
            "next_token": _encode_token(next_offset) if more else None,
        }

    def filters(self) -> dict[str, Any]:
        """Return the distinct (status, verification, GPU) combinations in use."""
        combos = {
            (row["actual_status"], row["verification"], row["gpu_name"])
            for row in self.rows()
        }
        keys = ("actual_status", "verification", "gpu_name")
        return {"filters": [dict(zip(keys, combo, strict=True)) for combo in combos]}

    # -- change

    # NOTE: a stopped instance keeps its offer off the market, so starting it
    # again never replies resources_unavailable unless a fault hook does.
    def update(self, instance_id_text: str, body: dict[str, Any]) -> dict[str, Any]:
        instance = self.require(instance_id_text)
        if "label" in body:
            label = body["label"]
            if label is not None and not isinstance(label, str):
                raise ApiFailure.of(400, "invalid_args", f"invalid label {label!r}")
            if label is not None and len(label) > MAX_LABEL_LENGTH:
                raise ApiFailure.of(
                    400, "label_too_long", f"label is longer than {MAX_LABEL_LENGTH}"
                )
            instance.label = label
        if "state" in body:
            state = body["state"]
            if state not in ("running", "stopped"):
                raise ApiFailure.of(
                    400,
                    "invalid_args",
                    f"invalid state {state!r}; use running or stopped",
                )
            instance.set_state(state, time.time())
        return {"success": True}

    def update_many(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start or stop up to 64 instances (``PUT /instances/`` with ``ids``)."""
        ids = body.get("ids")
        if not isinstance(ids, list) or not ids or len(ids) > MAX_BULK_IDS:
            raise ApiFailure.of(
                400, "invalid_args", f"ids must list 1 to {MAX_BULK_IDS} instance ids"
            )
        changed, missing = [], []
        for instance_id in ids:
            try:
                self.update(str(instance_id), {"state": body.get("state")})
            except ApiFailure as failure:
                if failure.status != 404:
                    raise
                missing.append(instance_id)
            else:
                changed.append(instance_id)
        return {"success": bool(changed), "changed": changed, "not_found": missing}

    def create_many(self, body: dict[str, Any]) -> dict[str, Any]:
        """Rent up to 64 offers with one launch body (``POST /asks/bulk/``)."""
        started = time.time()
        ids = body.get("ids")
        if not isinstance(ids, list) or not ids or len(ids) > MAX_BULK_IDS:
            raise ApiFailure.of(
                400, "invalid_args", f"ids must list 1 to {MAX_BULK_IDS} offer ids"
            )
        launch = {key: value for key, value in body.items() if key != "ids"}
        results: list[dict[str, Any]] = []
        for offer_id in ids:
            try:
                reply = self.create(str(offer_id), launch)
            except ApiFailure as failure:
                detail = failure.body if isinstance(failure.body, dict) else {}
                results.append({"ask_id": offer_id, **detail, "success": False})
            else:
                results.append(
                    {
                        "ask_id": offer_id,
                        "success": True,
                        "new_contract": reply["new_contract"],
                        "state": "running",
                    }
                )
        created = [r["new_contract"] for r in results if r["success"]]
        failed = [r["ask_id"] for r in results if not r["success"]]
        return {
            "success": bool(created),
            "results": results,
            "created": created,
            "failed": failed,
            "elapsed": time.time() - started,
        }

    def reboot(self, instance_id_text: str) -> dict[str, Any]:
        instance = self.require(instance_id_text)
        if not instance.reboot(time.time()):
            return {
                "success": False,
                "error": "invalid_id",
                "msg": f"Instance {instance.id} is not running.",
            }
        return {"success": True}

    def destroy(self, instance_id_text: str) -> dict[str, Any]:
        instance = self.require(instance_id_text)
        if not self._destroy(instance):
            raise ApiFailure.of(
                404, "no_such_instance", f"Instance {instance.id} not found."
            )
        return {"success": True, "msg": f"destroying instance {instance.id}."}

    def destroy_many(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = body.get("instance_ids") or []
        destroyed, missing = [], []
        for instance_id in ids:
            instance = self.get(instance_id) if isinstance(instance_id, int) else None
            if instance is not None and self._destroy(instance):
                destroyed.append(instance_id)
            else:
                missing.append(instance_id)
        if not destroyed:
            raise ApiFailure.of(
                404, "instances_not_found", f"No instances found among {ids}."
            )
        return {"success": True, "destroyed": destroyed, "not_found": missing}

    def _destroy(self, instance: Instance) -> bool:
        with self._lock:
            if self._instances.pop(instance.id, None) is None:
                return False
            self._rented_offers.pop(instance.offer["id"], None)
            self._destroyed.append(instance)
        instance.destroy(time.time())
        return True

    def destroy_all(self) -> None:
        """Destroy every instance and refuse new rentals (sandbox stop)."""
        with self._lock:
            self._closed = True
            instances = list(self._instances.values())
        for instance in instances:
            self._destroy(instance)

    # -- SSH keys

    def attach_key(self, instance_id_text: str, body: dict[str, Any]) -> dict[str, Any]:
        instance = self.require(instance_id_text)
        key = _parse_public_key(body.get("ssh_key"))
        if not instance.add_authorized_key(key):
            return {"success": False, "msg": "This key is already attached."}
        entry = {"instance_id": instance.id, "key": key}
        return {"success": True, "msg": "SSH key attached.", "key": json.dumps(entry)}

    def detach_key(self, instance_id_text: str, key_id: str) -> dict[str, Any]:
        self.require(instance_id_text)
        return {"success": True}

    def account_keys(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(entry) for entry in self._ssh_keys]

    def add_account_key(self, body: dict[str, Any]) -> dict[str, Any]:
        key = _parse_public_key(body.get("ssh_key"))
        with self._lock:
            for entry in self._ssh_keys:
                if entry["public_key"].split()[1] == key.split()[1]:
                    return {
                        "success": False,
                        "msg": "This key already exists.",
                        **entry,
                    }
            entry = {
                "id": self._next_key_id,
                "user_id": ACCOUNT_USER_ID,
                "public_key": key,
                "created_at": time.time(),
                "deleted_at": None,
            }
            self._next_key_id += 1
            self._ssh_keys.append(entry)
            return {"success": True, **entry}

    def delete_account_key(self, key_id_text: str) -> dict[str, Any]:
        key_id = _parse_id(key_id_text, "ssh key")
        with self._lock:
            before = len(self._ssh_keys)
            self._ssh_keys = [
                entry for entry in self._ssh_keys if entry["id"] != key_id
            ]
            if len(self._ssh_keys) == before:
                raise ApiFailure.of(404, "no_such_key", f"SSH key {key_id} not found.")
        return {"success": True}

    # -- logs

    def request_logs(
        self, instance_id_text: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        instance_id = _parse_id(instance_id_text, "instance")
        instance = self.get(instance_id)
        if instance is None:
            raise ApiFailure.of(404, "invalid_id", f"Instance {instance_id} not found.")
        tail = body.get("tail")
        try:
            lines = int(tail) if tail is not None else None
        except (TypeError, ValueError) as error:
            raise ApiFailure.of(
                400, "invalid_args", f"invalid tail {tail!r}"
            ) from error
        text = instance.read_log(lines)
        pattern = body.get("filter")
        if pattern:
            text = "".join(line for line in text.splitlines(True) if pattern in line)
        token = secrets.token_urlsafe(16)
        with self._lock:
            self._log_results[token] = LogResult(text, time.time() + LOG_READY_SECONDS)
        return {
            "success": True,
            "result_url": f"{self.base_url}/sandbox/results/{token}",
            "msg": "Logs will be available at the result URL shortly.",
        }

    def log_result(self, token: str) -> str | None:
        """Return a log result's text once it is ready, else None."""
        with self._lock:
            result = self._log_results.get(token)
            if result is None:
                return None
            first_fetch, result.fetched = not result.fetched, True
        if first_fetch or time.time() < result.ready_at:
            return None
        return result.text

    # -- account and ledger

    def ledger(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            alive = list(self._instances.values())
            destroyed = list(self._destroyed)
        for instance in alive:
            instance.advance(now)
        billed = sum(instance.billed_usd for instance in [*alive, *destroyed])
        return {
            "rented": len(alive) + len(destroyed),
            "destroyed": len(destroyed),
            "alive": sorted(instance.id for instance in alive),
            "billed_usd": billed,
        }

    def user(self) -> dict[str, Any]:
        spent = self.ledger()["billed_usd"]
        keys = self.account_keys()
        credit = 1000.0 - spent
        return {
            "id": ACCOUNT_USER_ID,
            "username": "sandbox",
            "email": "sandbox@localhost",
            "fullname": "Sandbox User",
            "credit": credit,
            "balance": credit,
            "balance_threshold": 0.0,
            "balance_threshold_enabled": False,
            "has_billing": True,
            "ssh_key": keys[0]["public_key"] if keys else None,
            "key_id": None,
            "sid": None,
            "is_sandbox": True,
        }


def _parse_id(text: str, kind: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError) as error:
        raise ApiFailure.of(
            400, "invalid_args", f"invalid {kind} id {text!r}"
        ) from error


def _parse_public_key(value: Any) -> str:
    if not value:
        raise ApiFailure.of(400, "no_ssh_key", "No ssh_key given.")
    if not isinstance(value, str):
        raise ApiFailure.of(400, "invalid_args", "ssh_key must be a string")
    fields = value.strip().split()
    if len(fields) < 2 or not fields[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise ApiFailure.of(
            400,
            "invalid_args",
            "ssh_key must be an OpenSSH public key: '<type> <base64>'",
        )
    try:
        base64.b64decode(fields[1], validate=True)
    except binascii.Error as error:
        raise ApiFailure.of(
            400, "invalid_args", "ssh_key has invalid base64"
        ) from error
    return " ".join(fields)


def _launch_spec(body: dict[str, Any], offer: dict[str, Any]) -> LaunchSpec:
    image = body.get("image")
    template = body.get("template_hash_id")
    if not image and not template:
        raise ApiFailure.of(
            400, "invalid_args", "image or template_hash_id is required"
        )

    disk = body.get("disk", 10)
    if isinstance(disk, bool) or not isinstance(disk, int | float) or disk <= 0:
        raise ApiFailure.of(400, "invalid_args", f"invalid disk {disk!r}; give GB > 0")
    if disk > offer["disk_space"]:
        raise ApiFailure.of(
            400,
            "invalid_args",
            f"disk {disk} GB exceeds the offer's {offer['disk_space']} GB",
        )

    price = body.get("price")
    if price is not None:
        if not isinstance(price, int | float) or not 0.001 <= price <= 128:
            raise ApiFailure.of(400, "invalid_price", f"invalid price {price!r}")
        if price < offer["min_bid"]:
            raise ApiFailure.of(
                400,
                "invalid_price",
                f"bid {price} is below the minimum bid {offer['min_bid']}",
            )

    label = body.get("label")
    if label is not None and (
        not isinstance(label, str) or len(label) > MAX_LABEL_LENGTH
    ):
        raise ApiFailure.of(
            400, "invalid_args", "label must be a string of <= 1024 chars"
        )
    env = body.get("env") or {}
    if not isinstance(env, dict):
        raise ApiFailure.of(400, "invalid_args", "env must be a JSON object")

    args = body.get("args")
    if args is not None and not (
        isinstance(args, list) and all(isinstance(item, str) for item in args)
    ):
        raise ApiFailure.of(400, "invalid_args", "args must be a list of strings")
    runtype = body.get("runtype") or ("args" if args is not None else RUNTYPE_DEFAULT)

    return LaunchSpec(
        image=image,
        disk_gb=float(disk),
        label=label,
        env={str(key): str(value) for key, value in env.items()},
        onstart=body.get("onstart"),
        runtype=str(runtype),
        args=args,
        bid_price=float(price) if price is not None else None,
        template_hash_id=template,
    )


def _json_param(params: dict[str, str], name: str, default: Any) -> Any:
    text = params.get(name)
    if text is None:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ApiFailure.of(
            400, "invalid_request", f"{name} is not valid JSON: {text!r}"
        ) from error


def _page_size(text: str | None) -> int:
    if text is None:
        return MAX_PAGE_SIZE
    try:
        value = int(text)
    except ValueError as error:
        raise ApiFailure.of(
            400, "invalid_request", f"invalid limit {text!r}"
        ) from error
    if value <= 0:
        return NONPOSITIVE_PAGE_SIZE
    return min(value, MAX_PAGE_SIZE)


def _encode_token(offset: int) -> str:
    raw = json.dumps({"offset": offset}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str | None) -> int:
    if not token:
        return 0
    try:
        padded = token + "=" * (-len(token) % 4)
        offset = json.loads(base64.urlsafe_b64decode(padded))["offset"]
    except (ValueError, KeyError, TypeError, binascii.Error) as error:
        raise ApiFailure.of(
            400, "invalid_token", f"invalid after_token {token!r}"
        ) from error
    if not isinstance(offset, int) or offset < 0:
        raise ApiFailure.of(400, "invalid_token", f"invalid after_token {token!r}")
    return offset


def _row_matches(row: dict[str, Any], filters: dict[str, Any]) -> bool:
    for column, condition in filters.items():
        if column in COMPUTED_COLUMNS:
            raise ApiFailure.of(
                400, "invalid_request", f"cannot filter on computed column {column!r}"
            )
        if not isinstance(condition, dict):
            condition = {"eq": condition}
        for op, expected in condition.items():
            if op not in OPERATORS:
                raise ApiFailure.of(
                    400, "invalid_request", f"unknown operator {op!r} on {column!r}"
                )
            if not compare(row.get(column), op, expected):
                return False
    return True
