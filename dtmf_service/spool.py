"""The audit spool: events not yet delivered, on disk, shared by every worker.

One folder per sink; each file ("segment") holds JSON lines and is written
whole (temporary name, fsync, rename), so a reader never sees half a file. A
reader claims a segment with an exclusive non-blocking flock, which the kernel
releases when the process dies: no segment is delivered by two workers at once
and none is stranded by a crash. The event count is in the file name, so the
backlog is known from a directory listing.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .metrics import pid_alive

log = logging.getLogger("dtmf_service.audit")

_SEGMENT = re.compile(r"^(\d{20})-(\d+)-(\d+)-n(\d+)\.jsonl$")
_TMP_PREFIX = ".tmp-"
_sequence = itertools.count()


@dataclass(frozen=True)
class Segment:
    path: str
    count: int


class Spool:
    """The spool of one sink, within a shared root bounded to ``max_bytes`` across all sinks."""

    def __init__(self, root: str, sink: str, max_bytes: int, on_drop: Callable[[int], None]) -> None:
        self.root = root
        self.sink = sink
        self.directory = os.path.join(root, sink)
        self.max_bytes = max_bytes
        self._on_drop = on_drop
        self._lock = threading.Lock()
        os.makedirs(self.directory, exist_ok=True)
        self._remove_dead_temporaries()

    def append(self, events: list[dict[str, Any]]) -> None:
        """Write events as one new segment, then keep the whole spool under its bound."""
        if not events:
            return
        data = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events).encode()
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(_sequence)}-n{len(events)}.jsonl"
        tmp = os.path.join(self.directory, f"{_TMP_PREFIX}{os.getpid()}-{name}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:
            # The folder was deleted under us (a clean-up gone wrong): make it again, never drop for that.
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            log.warning("audit spool %s: folder was missing and has been recreated", self.sink)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.directory, name))
        self._enforce_bound()

    def segments(self) -> list[Segment]:
        """This sink's segments, oldest first."""
        return sorted(_list(self.directory), key=lambda s: os.path.basename(s.path))

    def pending(self) -> int:
        """Events waiting in this sink's spool (from the file names: no file is read)."""
        return sum(s.count for s in _list(self.directory))

    @contextmanager
    def claim(self, segment: Segment) -> Iterator[list[dict[str, Any]] | None]:
        """Lock a segment and read it; yields None when another process holds it or it is gone."""
        try:
            fd = os.open(segment.path, os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(segment.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # consumed and unlinked by another process between open and lock
                yield None
                return
            yield self._read(fd, segment)
        finally:
            os.close(fd)

    def consume(self, segment: Segment, rest: list[dict[str, Any]]) -> None:
        """Called under claim(): the segment is done; ``rest`` (undelivered) goes back as a new segment."""
        if rest:
            self.append(rest)
        try:
            os.unlink(segment.path)
        except FileNotFoundError:
            pass

    def _read(self, fd: int, segment: Segment) -> list[dict[str, Any]]:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        events = []
        for number, line in enumerate(b"".join(chunks).splitlines(), 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
                if not isinstance(event, dict):
                    raise ValueError("not an object")
            except ValueError:
                log.error("audit spool %s: skipped unreadable line %d of %s", self.sink, number, segment.path)
                self._on_drop(1)
                continue
            events.append(event)
        return events

    def _enforce_bound(self) -> None:
        with self._lock:
            everything = [s for d in _sink_dirs(self.root) for s in _list(d)]
            sizes = {s.path: _size(s.path) for s in everything}
            total = sum(sizes.values())
            if total <= self.max_bytes:
                return
            for segment in sorted(everything, key=lambda s: os.path.basename(s.path)):
                if total <= self.max_bytes:
                    break
                try:
                    os.unlink(segment.path)
                except FileNotFoundError:
                    continue
                total -= sizes[segment.path]
                self._on_drop(segment.count)
                log.error(
                    "audit spool full (AUDIT_SPOOL_MAX_MB): dropped %d oldest events of sink %s",
                    segment.count,
                    os.path.basename(os.path.dirname(segment.path)),
                )

    def _remove_dead_temporaries(self) -> None:
        # A temporary file is only ever complete once renamed; one left by a dead process is garbage.
        for name in os.listdir(self.directory):
            if not name.startswith(_TMP_PREFIX):
                continue
            pid = name[len(_TMP_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                try:
                    os.unlink(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass


def _list(directory: str) -> list[Segment]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _SEGMENT.match(name)
        if match:
            found.append(Segment(os.path.join(directory, name), int(match.group(4))))
    return found


def _sink_dirs(root: str) -> list[str]:
    try:
        return [os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))]
    except FileNotFoundError:
        return []


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
