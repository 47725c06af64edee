"""The SFTP subsystem of a sandbox instance, over the real filesystem.

Relative paths resolve against the instance's home directory, as they do
against ``/root`` on a Vast.ai instance. Absolute paths are used as they
are, because sandbox commands also see the host's filesystem.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
from paramiko.sftp import SFTP_OK

# Fault hook point: called with the instance id on every file read or
# write under a registered directory (a sandbox's state directory).
TransferHook = Callable[[int], None]
_transfer_hooks: dict[Path, TransferHook] = {}
_transfer_hooks_lock = threading.Lock()


def set_transfer_hook(root: Path, hook: TransferHook | None) -> None:
    """Call ``hook(instance_id)`` on SFTP reads and writes of homes under ``root``."""
    with _transfer_hooks_lock:
        if hook is None:
            _transfer_hooks.pop(Path(root), None)
        else:
            _transfer_hooks[Path(root)] = hook


def _transfer_hook_for(home: Path) -> TransferHook | None:
    with _transfer_hooks_lock:
        for root, hook in _transfer_hooks.items():
            if home.is_relative_to(root):
                return hook
    return None


def _errno_reply(error: OSError) -> int:
    return paramiko.SFTPServer.convert_errno(error.errno)


class InstanceSftpHandle(paramiko.SFTPHandle):
    """An open file; paramiko reads ``readfile``/``writefile`` to serve it."""

    on_transfer: Callable[[], None] | None = None

    def read(self, offset: int, length: int) -> bytes | int:
        if self.on_transfer is not None:
            self.on_transfer()
        return super().read(offset, length)

    def write(self, offset: int, data: bytes) -> int:
        if self.on_transfer is not None:
            self.on_transfer()
        return super().write(offset, data)

    def stat(self) -> paramiko.SFTPAttributes | int:
        try:
            return paramiko.SFTPAttributes.from_stat(os.fstat(self.readfile.fileno()))
        except OSError as error:
            return _errno_reply(error)

    def chattr(self, attr: paramiko.SFTPAttributes) -> int:
        try:
            _apply_attributes(self.filename, attr)
        except OSError as error:
            return _errno_reply(error)
        return SFTP_OK


class InstanceSftpSubsystem(paramiko.SFTPServer):
    """paramiko's SFTP subsystem, plus the exit status that sshd sends.

    Without an exit status OpenSSH's ``scp`` and ``sftp`` exit with 1 even
    when every transfer succeeded.
    """

    def finish_subsystem(self) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self.sock.send_exit_status(0)
        super().finish_subsystem()


class InstanceSftpServer(paramiko.SFTPServerInterface):
    """Serve one SFTP session rooted (for relative paths) at ``home``."""

    def __init__(self, server: paramiko.ServerInterface, *, home: Path) -> None:
        super().__init__(server)
        self.home = home
        self._transfer_hook = _transfer_hook_for(Path(home))
        config = getattr(server, "config", None)
        self._instance_id: int | None = getattr(config, "instance_id", None)

    def resolve(self, path: str) -> str:
        """Map an SFTP path to a local one, relative paths under ``home``."""
        if not path or path == ".":
            return str(self.home)
        if os.path.isabs(path):
            return os.path.normpath(path)
        return os.path.normpath(os.path.join(self.home, path))

    def canonicalize(self, path: str) -> str:
        return self.resolve(path)

    def list_folder(self, path: str) -> list[paramiko.SFTPAttributes] | int:
        local = self.resolve(path)
        try:
            entries = []
            for name in os.listdir(local):
                attributes = paramiko.SFTPAttributes.from_stat(
                    os.lstat(os.path.join(local, name))
                )
                attributes.filename = name
                entries.append(attributes)
            return entries
        except OSError as error:
            return _errno_reply(error)

    def stat(self, path: str) -> paramiko.SFTPAttributes | int:
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(self.resolve(path)))
        except OSError as error:
            return _errno_reply(error)

    def lstat(self, path: str) -> paramiko.SFTPAttributes | int:
        try:
            return paramiko.SFTPAttributes.from_stat(os.lstat(self.resolve(path)))
        except OSError as error:
            return _errno_reply(error)

    def open(
        self, path: str, flags: int, attr: paramiko.SFTPAttributes
    ) -> paramiko.SFTPHandle | int:
        local = self.resolve(path)
        mode = attr.st_mode if attr is not None and attr.st_mode is not None else 0o666
        try:
            descriptor = os.open(
                local, flags | getattr(os, "O_BINARY", 0), mode & 0o7777
            )
        except OSError as error:
            return _errno_reply(error)
        if flags & os.O_CREAT and attr is not None:
            attr._flags &= ~attr.FLAG_PERMISSIONS
            try:
                _apply_attributes(local, attr)
            except OSError as error:
                os.close(descriptor)
                return _errno_reply(error)
        file_mode = _file_mode(flags)
        try:
            stream = os.fdopen(descriptor, file_mode)
        except OSError as error:
            os.close(descriptor)
            return _errno_reply(error)
        handle = InstanceSftpHandle(flags)
        handle.filename = local
        handle.readfile = stream
        handle.writefile = stream
        hook, instance_id = self._transfer_hook, self._instance_id
        if hook is not None and instance_id is not None:
            handle.on_transfer = lambda: hook(instance_id)
        return handle

    def remove(self, path: str) -> int:
        return self._call(os.remove, self.resolve(path))

    def rename(self, oldpath: str, newpath: str) -> int:
        # SFTP v3 rename must not replace an existing target; posix_rename does.
        target = self.resolve(newpath)
        if os.path.lexists(target):
            return paramiko.sftp.SFTP_FAILURE
        return self._call(os.rename, self.resolve(oldpath), target)

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        return self._call(os.replace, self.resolve(oldpath), self.resolve(newpath))

    def mkdir(self, path: str, attr: paramiko.SFTPAttributes) -> int:
        local = self.resolve(path)
        mode = attr.st_mode if attr is not None and attr.st_mode is not None else 0o777
        result = self._call(os.mkdir, local, mode & 0o7777)
        if result == SFTP_OK and attr is not None:
            attr._flags &= ~attr.FLAG_PERMISSIONS
            return self._call(_apply_attributes, local, attr)
        return result

    def rmdir(self, path: str) -> int:
        return self._call(os.rmdir, self.resolve(path))

    def chattr(self, path: str, attr: paramiko.SFTPAttributes) -> int:
        return self._call(_apply_attributes, self.resolve(path), attr)

    def symlink(self, target_path: str, path: str) -> int:
        return self._call(os.symlink, target_path, self.resolve(path))

    def readlink(self, path: str) -> str | int:
        try:
            return os.readlink(self.resolve(path))
        except OSError as error:
            return _errno_reply(error)

    @staticmethod
    def _call(function: Any, *args: Any) -> int:
        try:
            function(*args)
        except OSError as error:
            return _errno_reply(error)
        return SFTP_OK


def _file_mode(flags: int) -> str:
    if flags & os.O_WRONLY:
        return "ab" if flags & os.O_APPEND else "wb"
    if flags & os.O_RDWR:
        return "a+b" if flags & os.O_APPEND else "r+b"
    return "rb"


def _apply_attributes(path: str, attr: paramiko.SFTPAttributes) -> None:
    """Apply chmod, chown, utime and truncate from SFTP attributes."""
    if attr._flags & attr.FLAG_PERMISSIONS:
        os.chmod(path, attr.st_mode & 0o7777)
    if attr._flags & attr.FLAG_UIDGID:
        os.chown(path, attr.st_uid, attr.st_gid)
    if attr._flags & attr.FLAG_AMTIME:
        os.utime(path, (attr.st_atime, attr.st_mtime))
    if attr._flags & attr.FLAG_SIZE:
        with open(path, "r+b") as stream:
            stream.truncate(attr.st_size)
