"""Audit sink ``file``: JSON Lines at AUDIT_FILE_PATH, safe with several workers appending."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Mapping
from typing import Any

from dtmf_service import event_json, hookimpl
from dtmf_service.config import ConfigError


class FileSink:
    """One ``write`` of whole lines on an O_APPEND descriptor: workers never interleave a line.

    AUDIT_FILE_FSYNC: ``always`` (fsync per event), ``batch`` (per delivered batch; default), ``never``.
    AUDIT_FILE_MODE: the file's mode, ``0600`` by default (events may hold digits); ``0640`` lets a log
    shipper in the file's group read it. A directory the sink creates gets the matching ``0700``/``0750``.
    """

    def __init__(self, path: str, fsync: str = "batch", mode: int = 0o600) -> None:
        self.path = path
        self.fsync = fsync
        self.mode = mode
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid: int | None = None

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            # Re-opened after fork, and after log rotation moved the file away (checked by inode).
            # The directory is made here, not by the factory: a CLI command that builds the sink
            # to check its settings creates nothing (CONTRACT.md section 11 rev 3).
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, mode=directory_mode(self.mode), exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.mode)
            self._pid = os.getpid()
            self._apply_mode(self._fd)
            return self._fd
        fd = self._fd
        try:
            moved = os.stat(self.path).st_ino != os.fstat(fd).st_ino
        except FileNotFoundError:
            moved = True
        if moved:
            os.close(fd)
            self._fd = None
            return self._descriptor()
        return fd

    def _apply_mode(self, fd: int) -> None:
        """The configured mode whatever made the file (umask, an earlier version's 0640, logrotate)."""
        try:
            if os.fstat(fd).st_mode & 0o777 != self.mode:
                os.fchmod(fd, self.mode)
        except OSError:
            pass  # not ours to change (another owner): it stays as its owner set it

    def _write(self, data: bytes, sync: bool) -> None:
        """Whole lines or nothing: a short write (full disk) is cut back off, so every line of the file
        parses as JSON and the retry appends after a complete line. The flock keeps other workers'
        appends out of the way while a short write is undone."""
        with self._lock:
            fd = self._descriptor()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    written = os.write(fd, data)
                except OSError:
                    written = -1
                if written != len(data):
                    os.ftruncate(fd, start)
                    raise OSError(errno.ENOSPC, "audit file: short write undone")
                if sync:
                    os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def deliver(self, event: dict[str, Any]) -> None:
        self._write((event_json(event) + "\n").encode(), self.fsync != "never")

    def deliver_many(self, events: list[dict[str, Any]]) -> None:
        if self.fsync == "always":
            for event in events:
                self.deliver(event)
            return
        lines = "".join(event_json(e) + "\n" for e in events).encode()
        self._write(lines, self.fsync == "batch")

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None


def file_mode(text: str) -> int:
    """AUDIT_FILE_MODE as an octal mode: the owner reads and writes, group and others may only read."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600 or mode & 0o133:
        raise ConfigError(f"AUDIT_FILE_MODE: expected an octal mode such as 0600 or 0640, got {text!r}")
    return mode


def directory_mode(mode: int) -> int:
    """The mode of a directory holding a file of ``mode``: whoever may read the file may enter."""
    return 0o700 | (0o050 if mode & 0o040 else 0) | (0o005 if mode & 0o004 else 0)


@hookimpl
def dtmf_audit_sink(name: str, config: Mapping[str, Any]) -> FileSink | None:
    if name != "file":
        return None
    if not config.get("AUDIT_FILE_PATH"):
        raise ConfigError("AUDIT_FILE_PATH: required when AUDIT_SINKS includes file")
    mode = file_mode(config.get("AUDIT_FILE_MODE") or "0600")
    return FileSink(config["AUDIT_FILE_PATH"], config.get("AUDIT_FILE_FSYNC", "batch"), mode)
