"""Choice of the SSH server that sandbox instances run: paramiko or OpenSSH.

``paramiko`` (the default) serves each instance from inside the sandbox
process and runs anywhere. ``openssh`` runs the system's ``sshd`` per
instance, as Vast.ai hosts do, and needs root.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from vastai_pool.sandbox.openssh_host import (
    LOGIN_HOME,
    OpenSshHost,
    openssh_unavailable_reason,
)
from vastai_pool.sandbox.sshd import HostConfig, InstanceSshHost

HOSTS_VARIABLE = "VASTAI_SANDBOX_HOSTS"
PARAMIKO = "paramiko"
OPENSSH = "openssh"
HOST_BACKENDS = (PARAMIKO, OPENSSH)
DEFAULT_HOSTS = PARAMIKO


class HostBackendError(ValueError):
    """An unknown host backend, or one that cannot run on this machine."""


class SshHost(Protocol):
    """The interface an instance needs from its SSH server, for either backend."""

    @property
    def port(self) -> int: ...

    @property
    def host_key_line(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def drop_connections(self) -> int: ...


def resolve_hosts(value: str | None, *, state_dir: Path) -> str:
    """Return the backend named by ``value``, else by ``$VASTAI_SANDBOX_HOSTS``.

    Raises ``HostBackendError`` for an unknown name, and for ``openssh``
    when this machine cannot run it (not root, no sshd, or ``state_dir``
    under ``/root``, which the backend hides).
    """
    source = "hosts"
    if value is None:
        value = os.environ.get(HOSTS_VARIABLE, "").strip() or DEFAULT_HOSTS
        source = HOSTS_VARIABLE
    name = value.strip().lower()
    if name not in HOST_BACKENDS:
        raise HostBackendError(
            f"invalid {source} value {value!r}: use one of {', '.join(HOST_BACKENDS)}"
        )
    if name == OPENSSH:
        reason = openssh_unavailable_reason() or _hidden_path_reason(state_dir)
        if reason is not None:
            raise HostBackendError(
                f"the openssh host backend cannot run: {reason}. Use the paramiko "
                f"backend instead (hosts='paramiko', {HOSTS_VARIABLE}=paramiko or "
                "`vastai-pool sandbox serve --hosts paramiko`)."
            )
    return name


def create_host(backend: str, config: HostConfig, work_dir: Path) -> SshHost:
    """Build (without starting) the SSH server of one instance.

    ``work_dir`` contains the OpenSSH backend's config, host key, pid file and
    log; it must lie outside ``config.home``.
    """
    if backend == OPENSSH:
        return OpenSshHost(config, work_dir)
    if backend == PARAMIKO:
        return InstanceSshHost(config)
    raise HostBackendError(
        f"invalid host backend {backend!r}: use one of {', '.join(HOST_BACKENDS)}"
    )


def _hidden_path_reason(state_dir: Path) -> str | None:
    # Sessions see the instance's home at /root, so instance files (homes,
    # the fake nvidia-smi, sshd's config) under the real /root would vanish.
    for candidate in (Path(os.path.abspath(state_dir)), Path(state_dir).resolve()):
        if candidate.is_relative_to(LOGIN_HOME):
            return (
                f"the state directory {candidate} is under {LOGIN_HOME}, which "
                "each instance's home directory replaces; choose one elsewhere "
                "(e.g. under /tmp)"
            )
    return None
