"""Thin adapter over the official ``vastai`` SDK; no other module calls it.

Every SDK or HTTP error is translated into ``ApiError`` (``OfferUnavailable``
for a taken offer) with ``from exc``. The API key is handed to the SDK and
never logged or put into a message.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from vastai import VastAI
from vastai.api.query import offers_alias, offers_fields, offers_mult, parse_query

from vastai_pool.errors import ApiError, ConfigError, OfferUnavailable
from vastai_pool.requirements import Hardware

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Filters the SDK adds to every offer search unless ``no_default`` is set
# (vastai 1.9.1). They are seeded before parsing so that a user's
# ``verified=any`` can remove one.
_DEFAULT_OFFER_FILTERS: dict[str, dict[str, Any]] = {
    "verified": {"eq": True},
    "external": {"eq": False},
    "rentable": {"eq": True},
    "rented": {"eq": False},
}

# A destroy is sent again (after a pause starting at _DESTROY_BACKOFF seconds,
# doubled up to _DESTROY_PAUSE_CAP) until the API confirms the instance is
# gone, for at most _DESTROY_PATIENCE seconds: an instance whose destroy
# failed keeps billing.
_DESTROY_BACKOFF = 1.0
_DESTROY_PAUSE_CAP = 16.0
_DESTROY_PATIENCE = 180.0
# Seconds between the checks that a destroyed instance is gone. Vast.ai's
# API documents a minimum of 2 s between show calls.
_DESTROY_CONFIRM_PAUSES = (0.0, 2.0, 4.0)
# cur_state of an instance that no longer has its machine (after destroy).
_GONE_STATES = frozenset({"unloaded", "destroyed"})


# Attempts of a rate-limited create and the first pause in seconds; Vast.ai
# documents a minimum of 4.5 s between creates.
_CREATE_ATTEMPTS = 4
_CREATE_RATE_LIMIT_PAUSE = 5.0


# Replies worth sending a read again for: rate limited, or a gateway or server
# that is briefly unavailable. Vast.ai's 429 often comes as plain text and
# without Retry-After.
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Longest Retry-After (seconds) obeyed; the SDK uses the same bound.
_MAX_RETRY_AFTER = 60.0


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, bounded in attempts and time.

    Pause ``n`` (from 0) is uniform in [0, min(cap, first * 2**n)], or a
    numeric Retry-After when the server sends one. No pause starts that
    would end after ``total`` seconds since the first attempt.
    """

    attempts: int = 6
    first: float = 0.25
    cap: float = 8.0
    total: float = 45.0

    def pause(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return random.uniform(0.0, min(self.cap, self.first * 2**attempt))


def _retry_after(exc: ApiError) -> float | None:
    cause = exc.__cause__
    response = getattr(cause, "response", None)
    if response is None:
        return None
    value = response.headers.get("Retry-After")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if 0 <= seconds <= _MAX_RETRY_AFTER else None


class VastStatus(enum.StrEnum):
    """Vast.ai's ``actual_status`` values, mapped in one table."""

    PROVISIONING = "provisioning"  # the API sends null
    CREATED = "created"
    LOADING = "loading"
    RUNNING = "running"
    STOPPED = "stopped"
    FROZEN = "frozen"
    EXITED = "exited"
    REBOOTING = "rebooting"
    SCHEDULING = "scheduling"
    UNKNOWN = "unknown"
    OFFLINE = "offline"


# Raw ``actual_status`` to VastStatus. Vast.ai sends null while the contract is
# still being set up. A value missing here is read as still provisioning, so
# that a new status from the API waits for the boot timeout instead of failing.
_STATUS_TABLE: dict[str | None, VastStatus] = {
    None: VastStatus.PROVISIONING,
    "provisioning": VastStatus.PROVISIONING,
    "created": VastStatus.CREATED,
    "loading": VastStatus.LOADING,
    "running": VastStatus.RUNNING,
    "stopped": VastStatus.STOPPED,
    "frozen": VastStatus.FROZEN,
    "exited": VastStatus.EXITED,
    "rebooting": VastStatus.REBOOTING,
    "scheduling": VastStatus.SCHEDULING,
    "unknown": VastStatus.UNKNOWN,
    "offline": VastStatus.OFFLINE,
}


def map_status(raw: str | None) -> VastStatus:
    """Return the VastStatus of a raw ``actual_status`` value."""
    status = _STATUS_TABLE.get(raw.strip().lower() if isinstance(raw, str) else raw)
    if status is None:
        logger.debug("unrecognized actual_status %r, treated as provisioning", raw)
        return VastStatus.PROVISIONING
    return status


@dataclass(frozen=True)
class Offer:
    id: int
    machine_id: int | None
    hardware: Hardware
    raw: dict


@dataclass(frozen=True)
class RemoteInstance:
    """An instance as the API reports it.

    ``ssh_host``/``ssh_port`` is the endpoint to connect to: the direct
    address (``public_ipaddr`` and the host port mapped to 22) when the
    instance has one, else Vast.ai's SSH proxy.
    """

    id: int
    label: str | None
    status: VastStatus
    status_msg: str | None
    ssh_host: str | None
    ssh_port: int | None
    dph_total: float
    raw: dict
    machine_id: int | None = None
    hardware: Hardware | None = None


def parse_offer_query(query: str, *, with_defaults: bool = False) -> dict:
    """Parse an offer query string with the SDK's own parser.

    With ``with_defaults`` the result starts from the filters the SDK adds to
    every search (verified, not external, rentable, not rented by me), which
    the query may switch off with ``field=any``. Raises ``ConfigError`` naming
    the query and the parse error.
    """
    base = {k: dict(v) for k, v in _DEFAULT_OFFER_FILTERS.items()}
    warnings = io.StringIO()
    try:
        # The parser prints its warnings about unknown fields to stderr.
        with contextlib.redirect_stderr(warnings):
            parsed = parse_query(
                query,
                base if with_defaults else {},
                offers_fields,
                offers_alias,
                offers_mult,
            )
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"invalid Vast.ai offer query {query!r}: {exc}. Write terms as "
            "'field op value' (e.g. 'gpu_ram>=24 inet_down>200'), with "
            "underscores for spaces in values and lists as [a,b]."
        ) from exc
    for line in warnings.getvalue().splitlines():
        if line.strip():
            logger.warning("offer query %r: %s", query, line.strip())
    return parsed


def _country(geolocation: object) -> str | None:
    # Vast.ai writes "<region>, <CC>"; the SDK itself reads the last two letters.
    if not isinstance(geolocation, str) or len(geolocation.strip()) < 2:
        return None
    return geolocation.strip()[-2:].upper()


def _number(row: dict, *keys: str) -> float:
    for key in keys:
        value = row.get(key)
        if value is not None:
            try:
                return float(value)
            except (TypeError, ValueError):
                continue
    return 0.0


def hardware_from_row(row: dict) -> Hardware:
    """Return the Hardware of an offer or instance row (MB of RAM, GB of disk)."""
    return Hardware(
        num_gpus=int(_number(row, "num_gpus")),
        gpu_name=str(row.get("gpu_name") or ""),
        cpu_cores_effective=_number(row, "cpu_cores_effective"),
        cpu_ram_mb=_number(row, "cpu_ram"),
        disk_gb=_number(row, "disk_space"),
        dph_total=_number(row, "dph_total"),
        reliability=_number(row, "reliability", "reliability2"),
        datacenter=row.get("hosting_type") == 1,
        country=_country(row.get("geolocation")),
    )


def _ssh_endpoint(row: dict) -> tuple[str | None, int | None]:
    # Prefer the direct port: the proxy adds a hop and, per the Snakemake Vast.ai
    # plugin's authors, is not always wired up. Docker's shape, HostPort a string.
    ports = row.get("ports") or {}
    mapped = ports.get("22/tcp") if isinstance(ports, dict) else None
    public = row.get("public_ipaddr")
    if public and mapped:
        try:
            return str(public).strip(), int(mapped[0]["HostPort"])
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    host = row.get("ssh_host")
    port = row.get("ssh_port")
    if host and port:
        return str(host), int(port)
    return None, None


def remote_instance_from_row(row: dict) -> RemoteInstance:
    """Return a RemoteInstance from a show or list row of the API."""
    host, port = _ssh_endpoint(row)
    machine = row.get("machine_id")
    return RemoteInstance(
        id=int(row["id"]),
        label=row.get("label") or None,
        status=map_status(row.get("actual_status")),
        status_msg=row.get("status_msg"),
        ssh_host=host,
        ssh_port=port,
        dph_total=_number(row, "dph_total"),
        raw=row,
        machine_id=int(machine) if machine is not None else None,
        hardware=hardware_from_row(row),
    )


def _error_body(response: requests.Response | None) -> tuple[str | None, str]:
    if response is None:
        return None, ""
    try:
        body = response.json()
    except ValueError:
        return None, (response.text or "").strip()[:300]
    if not isinstance(body, dict):
        return None, str(body)[:300]
    code = body.get("error")
    message = body.get("msg") or body.get("message") or body.get("detail") or ""
    return (str(code) if code else None), str(message)


def _base_url(exc: requests.RequestException) -> str:
    """Return scheme://host:port of the failed request; never its query,
    which may carry the API key."""
    request = exc.request
    if request is None or not request.url:
        return "the configured URL"
    parts = urlsplit(request.url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """Turn SDK and HTTP failures of one call into ``ApiError``."""
    try:
        yield
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        code, message = _error_body(exc.response)
        text = f"Vast.ai API call {what} failed with HTTP {status}"
        if code:
            text += f" {code}"
        if message:
            text += f": {message}"
        taken = code == "no_such_ask" or "no_such_ask" in message
        if taken and status in (400, 404, 410):
            raise OfferUnavailable(
                text, status=status, error_code="no_such_ask"
            ) from exc
        if status in (401, 403):
            text += ". Check the API key and its permissions"
        raise ApiError(text, status=status, error_code=code) from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise ApiError(
            f"Vast.ai API call {what} failed: the API at {_base_url(exc)} could "
            f"not be reached ({type(exc).__name__}). Check the API URL "
            "(--vastai-api-url, VAST_URL) and the network."
        ) from exc
    except requests.RequestException as exc:
        raise ApiError(f"Vast.ai API call {what} failed: {type(exc).__name__}") from exc
    except (KeyError, TypeError, ValueError) as exc:
        # A reply the SDK could not read (not JSON, or a field it needs missing).
        raise ApiError(
            f"Vast.ai API call {what} returned a reply the SDK could not read: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _check_success(reply: Any, what: str) -> dict:
    if not isinstance(reply, dict):
        raise ApiError(f"Vast.ai API call {what} returned {type(reply).__name__}")
    if reply.get("success") is False:
        code = reply.get("error")
        message = reply.get("msg") or reply.get("message") or ""
        text = f"Vast.ai API call {what} failed: {code or 'success false'}"
        if message:
            text += f": {message}"
        raise ApiError(text, status=200, error_code=code)
    return reply


class VastApi:
    """The Vast.ai calls the pool makes, on one account.

    ``retry`` is the SDK's total number of attempts on 429, 502-504 and
    connection errors.
    """

    def __init__(self, api_url: str, api_key: str, *, retry: int = 3) -> None:
        if not api_key:
            raise ConfigError(
                "no Vast.ai API key: set --vastai-api-key or VAST_API_KEY"
            )
        # The SDK glues server_url and path, so a trailing slash gives "//api".
        self.api_url = api_url.rstrip("/")
        self._sdk = VastAI(api_key=api_key, server_url=self.api_url, retry=retry)
        # The SDK would resend a create after a 502-504 or a dropped connection,
        # when Vast.ai may already have rented the offer, so creates go out once.
        self._sdk_once = VastAI(api_key=api_key, server_url=self.api_url, retry=1)
        # Reads (show, list) back off here rather than in the SDK, whose
        # pauses (0.15 s growing x1.5 over ``retry`` attempts) are too short
        # for a 429 and would multiply with ours.
        self.list_backoff = Backoff()
        self._sleep = time.sleep
        self._monotonic = time.monotonic

    def search_offers(
        self, query: str, *, order: str, disk_gb: float, limit: int = 64
    ) -> list[Offer]:
        """Return the offers matching ``query``, priced for ``disk_gb`` of storage."""
        filters = parse_offer_query(query, with_defaults=True)
        # A search rents nothing, so it backs off and is sent again like a read.
        rows = self._read(
            f"search offers {query!r}",
            lambda: self._sdk_once.search_offers(
                query=filters,
                order=order,
                limit=limit,
                storage=disk_gb,
                no_default=True,
            ),
        )
        offers = []
        for row in rows or []:
            machine = row.get("machine_id")
            offers.append(
                Offer(
                    id=int(row["id"]),
                    machine_id=int(machine) if machine is not None else None,
                    hardware=hardware_from_row(row),
                    raw=row,
                )
            )
        return offers

    def create_instance(
        self,
        offer_id: int,
        *,
        image: str,
        disk_gb: float,
        label: str,
        onstart: str | None = None,
        env: dict[str, str] | None = None,
    ) -> int:
        """Rent an offer with SSH access; return the new instance id.

        Raises ``OfferUnavailable`` when the offer is taken, and ``ApiError``
        with ``instance_id`` set when Vast.ai created an instance despite
        reporting a failure, so that the caller destroys it.
        """
        what = f"create instance from offer {offer_id}"
        pause = _CREATE_RATE_LIMIT_PAUSE
        for attempt in range(1, _CREATE_ATTEMPTS + 1):
            try:
                with _translated(what):
                    # ssh+direct sends runtype "ssh_direc ssh_proxy", which maps
                    # port 22 directly and keeps the proxy as a fallback.
                    reply = self._sdk_once.create_instance(
                        offer_id,
                        image=image,
                        disk=disk_gb,
                        label=label,
                        onstart_cmd=onstart,
                        env=dict(env or {}),
                        ssh=True,
                        direct=True,
                    )
                break
            except ApiError as exc:
                # A 429 was rejected before anything was rented, so it is safe
                # to send again; nothing else is.
                if exc.status != 429 or attempt == _CREATE_ATTEMPTS:
                    raise
                logger.warning(
                    "creating from offer %d was rate limited, retrying in %.1f s",
                    offer_id,
                    pause,
                )
                time.sleep(pause)
                pause *= 2
        if not isinstance(reply, dict):
            raise ApiError(f"Vast.ai API call {what} returned {reply!r}")
        contract = reply.get("new_contract")
        if reply.get("success") is False:
            code = reply.get("error")
            message = reply.get("msg") or reply.get("message") or ""
            text = f"Vast.ai API call {what} failed: {code or 'success false'}"
            if message:
                text += f": {message}"
            if contract:
                text += f" (instance {contract} was created anyway)"
                raise ApiError(
                    text, status=200, error_code=code, instance_id=int(contract)
                )
            if code == "no_such_ask":
                raise OfferUnavailable(text, status=200, error_code=code)
            raise ApiError(text, status=200, error_code=code)
        if not contract:
            raise ApiError(f"Vast.ai API call {what} returned no new_contract")
        return int(contract)

    def attach_ssh_key(self, instance_id: int, public_key: str) -> None:
        """Authorize ``public_key`` on an instance; a key already there is fine."""
        what = f"attach SSH key to instance {instance_id}"
        # Attaching a key twice is harmless, so it is retried like a read.
        reply = self._read(
            what, lambda: self._sdk_once.attach_ssh(instance_id, public_key)
        )
        if isinstance(reply, dict) and reply.get("success") is False:
            message = str(reply.get("msg") or reply.get("error") or "")
            if "already" in message.lower():
                return
        _check_success(reply, what)

    def show_instance(self, instance_id: int) -> RemoteInstance | None:
        """Return the instance, or None when the API does not (or no longer) know it.

        Backs off on 429 and 502-504 like ``list_instances``.
        """
        row = self._read(
            f"show instance {instance_id}",
            lambda: self._sdk_once.show_instance(instance_id),
        )
        if row is None:
            return None
        return remote_instance_from_row(row)

    def list_instances(self) -> list[RemoteInstance]:
        """Return all of the account's instances, from every page of the v1 list.

        The SDK follows ``next_token`` through the pages. A 429 or 502-504
        reply on any page sends the whole list again after a pause
        (``list_backoff``). When the attempts or the time run out,
        ``ApiError`` is raised with the last failure.
        """
        rows = self._read("list instances", self._sdk_once.show_instances)
        return [remote_instance_from_row(row) for row in rows or []]

    def _read(self, what: str, call: Callable[[], T]) -> T:
        """Make a read-only call, sent again after a pause on 429 and
        502-504 within ``list_backoff``, and once more after a connection
        failure."""
        backoff = self.list_backoff
        started = self._monotonic()
        attempt = 0
        while True:
            try:
                with _translated(what):
                    return call()
            except ApiError as exc:
                retryable = exc.status is None or exc.status in _RETRY_STATUSES
                if not retryable:
                    raise
                attempt += 1
                pause = backoff.pause(attempt - 1, _retry_after(exc))
                elapsed = self._monotonic() - started
                # An unreachable API is more often a wrong URL than a blip:
                # one more try only.
                attempts = backoff.attempts if exc.status is not None else 2
                if attempt >= attempts or elapsed + pause > backoff.total:
                    cause = (
                        "the API is rate limiting or unavailable"
                        if exc.status is not None
                        else "the API did not answer"
                    )
                    raise ApiError(
                        f"{exc} (gave up after {attempt} attempts in "
                        f"{elapsed:.1f} s; {cause}, try again in a minute)",
                        status=exc.status,
                        error_code=exc.error_code,
                    ) from exc
                # One warning per burst; the attempts after it are details.
                logger.log(
                    logging.WARNING if attempt == 1 else logging.DEBUG,
                    "Vast.ai API call %s failed (attempt %d of %d), retrying in "
                    "%.2f s: %s",
                    what,
                    attempt,
                    backoff.attempts,
                    pause,
                    exc,
                )
                self._sleep(pause)

    def find_by_label(self, label: str) -> RemoteInstance | None:
        """Return the account's instance carrying ``label``, or None."""
        for remote in self.list_instances():
            if remote.label == label:
                return remote
        return None

    def destroy_instance(self, instance_id: int) -> None:
        """Destroy an instance and return once the API shows it gone.

        The destroy call is sent again after 429, 5xx and connection
        failures, and again when the instance is still listed after it, with
        pauses doubling up to 16 s, for at most 180 s. An id the API does not
        know counts as destroyed. Raises ``ApiError`` with the last failure
        when the time runs out or the API refuses the call (401, 403).
        """
        what = f"destroy instance {instance_id}"
        started = self._monotonic()
        pause = _DESTROY_BACKOFF
        attempt = 0
        while True:
            attempt += 1
            try:
                if not self._send_destroy(instance_id, what):
                    return
                if self._confirm_gone(instance_id):
                    return
                failure = ApiError(
                    f"Vast.ai API call {what} succeeded but the instance is "
                    "still listed"
                )
            except ApiError as exc:
                retryable = exc.status is None or exc.status in _RETRY_STATUSES
                if not retryable and not (exc.status and exc.status >= 500):
                    raise
                failure = exc
            elapsed = self._monotonic() - started
            if elapsed + pause > _DESTROY_PATIENCE:
                raise ApiError(
                    f"{failure} (gave up after {attempt} attempts in {elapsed:.0f} s)",
                    status=failure.status,
                    error_code=failure.error_code,
                ) from failure
            logger.log(
                logging.WARNING if attempt == 1 else logging.DEBUG,
                "destroying instance %d is not confirmed yet (attempt %d), "
                "retrying in %.1f s: %s",
                instance_id,
                attempt,
                pause,
                failure,
            )
            self._sleep(pause)
            pause = min(pause * 2, _DESTROY_PAUSE_CAP)

    def _send_destroy(self, instance_id: int, what: str) -> bool:
        """Send one destroy; return False when the API does not know the id."""
        try:
            with _translated(what):
                reply = self._sdk_once.destroy_instance(instance_id)
            _check_success(reply, what)
        except ApiError as exc:
            if exc.error_code == "no_such_instance" or (
                exc.status == 404 and exc.error_code is None
            ):
                logger.debug("instance %d was already gone from the API", instance_id)
                return False
            raise
        return True

    def _confirm_gone(self, instance_id: int) -> bool:
        """Return whether the API shows the instance gone after a destroy."""
        for pause in _DESTROY_CONFIRM_PAUSES:
            if pause:
                self._sleep(pause)
            remote = self.show_instance(instance_id)
            if remote is None or (remote.raw.get("cur_state") in _GONE_STATES):
                return True
        return False
