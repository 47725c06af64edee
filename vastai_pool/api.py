"""Thin adapter over the official ``vastai`` SDK; no other module calls it.

INTERFACE STUB, to be implemented. Every SDK or HTTP error is translated
into ``ApiError`` (``OfferUnavailable`` for a taken offer) with ``from exc``.
The API key is handed to the SDK and never logged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vastai_pool.requirements import Hardware


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


@dataclass(frozen=True)
class Offer:
    id: int
    machine_id: int | None
    hardware: Hardware
    raw: dict


@dataclass(frozen=True)
class RemoteInstance:
    id: int
    label: str | None
    status: VastStatus
    status_msg: str | None
    ssh_host: str | None
    ssh_port: int | None
    dph_total: float
    raw: dict


def parse_offer_query(query: str) -> dict:
    """Parse a query string with the SDK's own parser; raise ``ConfigError``."""
    raise NotImplementedError


class VastApi:
    def __init__(self, api_url: str, api_key: str) -> None:
        raise NotImplementedError

    def search_offers(
        self, query: str, *, order: str, disk_gb: float, limit: int = 64
    ) -> list[Offer]: ...

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
        """Rent an offer with SSH access; return the new instance id."""
        raise NotImplementedError

    def attach_ssh_key(self, instance_id: int, public_key: str) -> None: ...

    def show_instance(self, instance_id: int) -> RemoteInstance | None: ...

    def list_instances(self) -> list[RemoteInstance]:
        """All of the account's instances, every page of the v1 list."""
        raise NotImplementedError

    def destroy_instance(self, instance_id: int) -> None:
        """Destroy; an id the API no longer knows counts as destroyed."""
