"""Counters shared by every worker process of one gunicorn master.

As prometheus_client's multiprocess mode does: each process writes its own
memory-mapped file in a shared directory, and a read merges every file. A
counter sums all files, those of dead workers included, so totals survive a
worker restart; a gauge sums the files of live processes only. The gunicorn
master wipes the directory when it starts (gunicorn.conf.py).

When a worker exits, the master folds its counters into one archive file and
removes its file (``fold_dead``, at gunicorn's ``child_exit``, where
prometheus_client calls ``mark_process_dead``), so a read costs one file per
live worker plus one, however many workers have come and gone. Each process
file carries a random token; the archive lists the tokens it has absorbed, so a
reader that saw a file just before it was folded does not count it twice.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import struct
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from dtmf_service.processes import pid_alive

_MAGIC = b"DTMFCNT1"
_HEADER = 8192  # magic, length, JSON list of names; values follow
_SLOT = struct.Struct("<d")
_MAX_SLOTS = 1024


class SharedCounters:
    """Named float counters and gauges, one file per process, merged on read."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)  # owner only, like every file it holds
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._map: mmap.mmap | None = None
        self._slots: dict[str, int] = {}
        self._gauges: set[str] = set()
        self._declared: list[str] = []
        self._token = ""

    def declare(self, names: Iterable[str]) -> None:
        """Names to lay out when a process opens its file, so its header is written once, up front."""
        with self._lock:
            self._declared.extend(n for n in names if n not in self._declared)

    def declare_gauges(self, names: Iterable[str]) -> None:
        """Mark names whose value is a level (summed over live processes), not a running total."""
        names = list(names)
        self._gauges.update(names)
        self.declare(names)
        with self._lock:
            if self._map is not None and self._pid == os.getpid():
                self._write_names()  # the header says which names are levels (fold_dead skips them)

    def inc(self, name: str, amount: float = 1.0) -> None:
        with self._lock:
            offset = self._offset(name)
            (value,) = _SLOT.unpack_from(self._map, offset)  # type: ignore[arg-type]
            _SLOT.pack_into(self._map, offset, value + amount)  # type: ignore[arg-type]

    def add_many(self, amounts: dict[str, float]) -> None:
        """Several increments under one lock (one request's worth)."""
        with self._lock:
            if self._pid != os.getpid():
                self._open()
            slots, mapped = self._slots, self._map
            for name, amount in amounts.items():
                slot = slots.get(name)
                offset = _HEADER + (slot if slot is not None else self._add_slot(name)) * _SLOT.size
                (value,) = _SLOT.unpack_from(mapped, offset)  # type: ignore[arg-type]
                _SLOT.pack_into(mapped, offset, value + amount)  # type: ignore[arg-type]

    def set(self, name: str, value: float) -> None:
        with self._lock:
            offset = self._offset(name)  # opens the file first: self._map may not exist yet
            _SLOT.pack_into(self._map, offset, value)  # type: ignore[arg-type]

    def totals(self) -> dict[str, float]:
        """Every name, merged over all process files."""
        files = []
        for path in glob.glob(os.path.join(self.directory, "counters-*.bin")):
            try:
                pid = int(os.path.basename(path)[9:-4])
                files.append((pid, *_read_file(path)))
            except (OSError, ValueError):
                continue  # a file being created right now, or folded away; the archive has it
        # The archive is read last: a file folded after it was read above is then skipped by token.
        archive = _read_archive(self.directory)
        folded = {entry[0] for entry in archive["folded"]}
        merged: dict[str, float] = dict(archive["totals"])
        for pid, token, gauges, values in files:
            if token is not None and token in folded:
                continue
            alive = pid_alive(pid)
            for name, value in values.items():
                if (name in gauges or name in self._gauges) and not alive:
                    continue
                merged[name] = merged.get(name, 0.0) + value
        return merged

    def _offset(self, name: str) -> int:
        if self._pid != os.getpid():
            self._open()
        slot = self._slots.get(name)
        if slot is None:
            slot = self._add_slot(name)
        return _HEADER + slot * _SLOT.size

    def _open(self) -> None:
        # A forked child must not write into its parent's file: open one of its own.
        self._pid = os.getpid()
        path = os.path.join(self.directory, f"counters-{self._pid}.bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = _HEADER + _MAX_SLOTS * _SLOT.size
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        names = _read_names(self._map)
        self._token = uuid.uuid4().hex  # a reused pid's file gets a fresh identity too
        self._slots = {name: index for index, name in enumerate(names)}
        missing = [n for n in self._declared if n not in self._slots]
        for name in missing:
            self._slots[name] = len(self._slots)
        self._write_names()
        for gauge in self._gauges & set(self._slots):
            # A reused pid inherits a dead process's file: its levels are stale, its totals are not.
            _SLOT.pack_into(self._map, _HEADER + self._slots[gauge] * _SLOT.size, 0.0)

    def _add_slot(self, name: str) -> int:
        index = len(self._slots)
        if index >= _MAX_SLOTS:
            raise RuntimeError("too many metric names")
        self._slots[name] = index
        self._write_names()
        return index

    def _write_names(self) -> None:
        assert self._map is not None
        names = sorted(self._slots, key=self._slots.__getitem__)
        header = {"names": names, "gauges": sorted(self._gauges & set(names)), "token": self._token}
        blob = json.dumps(header).encode()
        if len(blob) + 12 > _HEADER:
            raise RuntimeError("metric names do not fit the header")
        self._map[8 : 12 + len(blob)] = struct.pack("<I", len(blob)) + blob
        self._map[0:8] = _MAGIC


def _read_header(buffer: bytes | mmap.mmap) -> dict[str, Any]:
    if bytes(buffer[0:8]) != _MAGIC:
        return {"names": [], "gauges": [], "token": None}
    (length,) = struct.unpack_from("<I", buffer, 8)
    if length > _HEADER - 12:
        raise ValueError("corrupt counters header")
    return json.loads(bytes(buffer[12 : 12 + length]))


def _read_names(buffer: bytes | mmap.mmap) -> list[str]:
    return list(_read_header(buffer)["names"])


def _read_file(path: str) -> tuple[str | None, set[str], dict[str, float]]:
    """A process file's token, gauge names and values."""
    with open(path, "rb") as handle:
        data = handle.read()
    header = _read_header(data)
    values = {name: _SLOT.unpack_from(data, _HEADER + i * _SLOT.size)[0] for i, name in enumerate(header["names"])}
    return header["token"], set(header["gauges"]), values


_ARCHIVE = "archive.json"
_FOLDED_MEMORY_S = 300.0  # a reader takes milliseconds; tokens older than this are forgotten


def _read_archive(directory: str) -> dict[str, Any]:
    try:
        with open(os.path.join(directory, _ARCHIVE), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {"totals": {}, "folded": []}


def fold_dead(directory: str, pid: int) -> None:
    """Fold an exited process's counters into the archive and remove its file (master only)."""
    path = os.path.join(directory, f"counters-{pid}.bin")
    try:
        token, gauges, values = _read_file(path)
    except (OSError, ValueError):
        return
    archive = _read_archive(directory)
    totals = archive["totals"]
    for name, value in values.items():
        if name not in gauges:  # a dead process holds no level
            totals[name] = totals.get(name, 0.0) + value
    now = time.time()
    folded = [entry for entry in archive["folded"] if now - entry[1] < _FOLDED_MEMORY_S]
    folded.append([token, now])
    tmp = os.path.join(directory, f".{_ARCHIVE}.{os.getpid()}")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as handle:
        json.dump({"totals": totals, "folded": folded}, handle)
    os.replace(tmp, os.path.join(directory, _ARCHIVE))  # readers see the old archive or the new, whole
    os.unlink(path)


def process_pids(directory: str) -> list[int]:
    """The pids that have a counters file in ``directory``."""
    found = []
    for path in glob.glob(os.path.join(directory, "counters-*.bin")):
        digits = os.path.basename(path)[len("counters-") : -len(".bin")]
        if digits.isdigit():
            found.append(int(digits))
    return found


def wipe(directory: str) -> None:
    """Remove every process file: a new master starts from zero."""
    marks = [os.path.join(directory, "ready")]  # wiring/serve.py's mark for systemd, of an earlier master
    for path in [*glob.glob(os.path.join(directory, "counters-*.bin")), os.path.join(directory, _ARCHIVE), *marks]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


_instances: dict[str, SharedCounters] = {}
_instances_lock = threading.Lock()


def shared_counters(directory: str) -> SharedCounters:
    """The one SharedCounters of this process for ``directory``: two applications in one process
    (tests) must not lay out the same per-process file twice."""
    key = os.path.abspath(directory)
    with _instances_lock:
        instance = _instances.get(key)
        if instance is None:
            instance = _instances[key] = SharedCounters(key)
        return instance
