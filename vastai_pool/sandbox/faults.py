"""Hook points where scripted faults can change what the sandbox does.

``FaultHooks`` does nothing: every method returns the value that lets the
sandbox behave normally. A fault script subclasses it and assigns an
instance to ``Sandbox.faults``; the sandbox calls each hook at exactly one
place, named in its docstring. Hooks run on server threads, so an
implementation must be thread-safe and fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Reply:
    """An HTTP reply that replaces the one the sandbox would send."""

    status: int
    # A dict or list is sent as JSON; a str is sent as text/plain.
    body: object
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BootFault:
    """Makes an instance stop booting in ``actual_status`` with ``status_msg``."""

    actual_status: str
    status_msg: str


class FaultHooks:
    """The no-fault behaviour of every hook point."""

    def http_reply(self, method: str, path: str) -> Reply | None:
        """Called for every API request before routing, e.g. for 429/5xx bursts.

        ``path`` is normalised (no trailing slash, no query string).
        """
        return None

    def create_reply(self, offer_id: int) -> Reply | None:
        """Called before an offer is rented, e.g. to reply that it was taken."""
        return None

    def boot_fault(self, instance_id: int) -> BootFault | None:
        """Called while an instance boots, e.g. to fail the image pull."""
        return None

    def host_online(self, instance_id: int) -> bool:
        """Called whenever an instance's status is computed; False = host offline.

        An offline host shows ``actual_status: "offline"``, refuses SSH
        connections and bills nothing.
        """
        return True

    def accept_ssh(self, instance_id: int) -> bool:
        """Called for every new SSH connection; False closes it at once."""
        return True
