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
    """

    def __init__(self, path: str, fsync: str = "batch") -> None:
        self.path = path
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid: int | None = None
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            # Re-opened after fork, and after log rotation moved the file away (checked by inode).
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._pid = os.getpid()
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


@hookimpl
def dtmf_audit_sink(name: str, config: Mapping[str, Any]) -> FileSink | None:
    if name != "file":
        return None
    if not config.get("AUDIT_FILE_PATH"):
        raise ConfigError("AUDIT_FILE_PATH: required when AUDIT_SINKS includes file")
    return FileSink(config["AUDIT_FILE_PATH"], config.get("AUDIT_FILE_FSYNC", "batch"))
