"""Errors raised by the pool, one hierarchy for every layer below the plugin."""

from __future__ import annotations


class PoolError(Exception):
    """Base of every error the pool raises on purpose.

    The plugin translates it into Snakemake's ``WorkflowError`` and the CLI
    prints it as one line.
    """


class ConfigError(PoolError):
    """A setting, credential or requirement is invalid or missing."""


class ApiError(PoolError):
    """The Vast.ai API rejected a call or could not be reached.

    ``instance_id`` is set when the API created an instance despite the error
    (Vast.ai returns ``success: false`` with ``new_contract`` set when the
    instance came up stopped), so the caller must destroy it.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_code: str | None = None,
        instance_id: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.instance_id = instance_id


class OfferUnavailable(ApiError):
    """The offer was taken between search and create (``no_such_ask``)."""


class NoMatchingOffer(PoolError):
    """No offer on the market satisfies a job's requirements."""

    def __init__(self, message: str, *, query: str) -> None:
        super().__init__(message)
        self.query = query


class BootFailed(PoolError):
    """An instance did not reach ``running`` or could not be prepared.

    ``machine_fault`` is True when the machine itself is to blame (a fatal
    status message, a boot that never finished, SSH that never accepted a
    connection), so that later runs avoid it. It is False when the cause may
    lie elsewhere, such as a package that would not install.
    """

    def __init__(
        self, message: str, *, instance_id: int, machine_fault: bool = True
    ) -> None:
        super().__init__(message)
        self.instance_id = instance_id
        self.machine_fault = machine_fault
        # The fatal status message when it may mean a wrong image
        # ("manifest unknown", "unauthorized"), else None.
        self.image_message: str | None = None


class SshError(PoolError):
    """An SSH connection, command or transfer failed."""


class HostKeyMismatch(SshError):
    """An instance presented a host key other than the one pinned for it."""


class PoolDatabaseError(PoolError):
    """The pool database file is unreadable, corrupt or of a newer schema."""
