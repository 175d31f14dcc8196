"""The process's audit journal: durable, in memory-mapped slots, before the outbox has the event.

A request must not answer before its audit event outlives the process (CONTRACT.md section 7),
and must leave a placeholder before the DTMF POST. Writing both through SQLite costs two waits
for a commit per request. Here each is a copy into a slot of a file mapped into memory: once
the copy is done it is in the kernel's page cache and survives any crash of the process (as
prometheus_client's multiprocess files do for counters). The outbox's writer thread then moves
final events into SQLite in batches and frees their slots; nobody waits for that.

Each slot holds two halves, written alternately with a sequence number and a CRC, so a process
killed in the middle of a copy leaves the previous version intact. The process holds an
exclusive ``flock`` on its journal for its whole life; the kernel drops it when the process
dies, which is how another process knows the journal is an orphan and takes it over
(``recover_orphans``): placeholders become ``submission_unknown`` events, final events are moved
as they are (a final event already moved is moved again: a duplicate with the same event_id and
the same content, which receivers drop).
"""

from __future__ import annotations

import fcntl
import glob
import mmap
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator

INTENT, FINAL = 1, 2
_HALF = 8192  # an event is well under 2 KiB; its cxone_response, JSON-escaped, is the only large part
_SLOT = 2 * _HALF
_HEAD = struct.Struct("<HBxIII")  # magic, state, sequence, length, crc32
_MAGIC = 0xD7F1


class JournalFull(Exception):
    """No free slot, or the event does not fit one: the caller writes through the outbox instead."""


class Journal:
    """This process's slots; one per request in flight plus the final events not yet moved."""

    def __init__(self, directory: str, slots: int = 128) -> None:
        self.directory = directory
        self.slots = slots
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._map: mmap.mmap | None = None
        self._fd = -1
        self._free: list[int] = []
        self._halves = bytearray(slots)  # the half each slot writes next: intent and final never share one
        self._sequence = 0
        self.path = ""

    def _open(self) -> None:
        # A forked child gets a journal of its own (the parent's lock and map are not its to use).
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(self.directory, f"journal-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel when this process dies
            # Reserve the blocks now: writing into a mapped page that a full disk cannot back is
            # SIGBUS, which kills the process. A disk already full refuses here instead (JournalFull).
            os.posix_fallocate(fd, 0, self.slots * _SLOT)
            self._map = mmap.mmap(fd, self.slots * _SLOT)
        except OSError as exc:
            os.close(fd)
            os.unlink(self.path)
            raise JournalFull(f"cannot make a journal ({exc.strerror})") from None
        self._fd = fd
        self._free = list(range(self.slots - 1, -1, -1))
        self._halves = bytearray(self.slots)

    def in_use(self) -> int:
        with self._lock:
            return self.slots - len(self._free) if self._pid == os.getpid() else 0

    def acquire(self) -> int:
        """A free slot; JournalFull when every one is taken."""
        with self._lock:
            if not self.slots:
                raise JournalFull("no journal slots")
            if self._pid != os.getpid():
                self._pid = os.getpid()  # tried once per process: without a journal, SQLite directly
                self._free = []
                self._open()
            if not self._free:
                raise JournalFull("every journal slot is taken")
            return self._free.pop()

    def write(self, slot: int, state: int, payload: bytes) -> None:
        """Copy ``payload`` into the slot's other half; once this returns it survives the process."""
        if len(payload) > _HALF - _HEAD.size:
            raise JournalFull("the event does not fit a journal slot")
        crc = zlib.crc32(payload)
        with self._lock:  # held across the copy: ensure_file() may swap the map underneath
            assert self._map is not None
            self._sequence += 1
            sequence = self._sequence
            half = self._halves[slot]
            self._halves[slot] = 1 - half
            base = slot * _SLOT + half * _HALF
            self._map[base + _HEAD.size : base + _HEAD.size + len(payload)] = payload
            # The header last: a copy cut short leaves a half whose CRC fails, and the other half stands.
            self._map[base : base + _HEAD.size] = _HEAD.pack(_MAGIC, state, sequence, len(payload), crc)

    def release(self, slot: int) -> None:
        """The slot's event is in the outbox: clear both halves and make the slot free again."""
        base = slot * _SLOT
        with self._lock:
            assert self._map is not None
            self._map[base : base + _HEAD.size] = b"\0" * _HEAD.size
            self._map[base + _HALF : base + _HALF + _HEAD.size] = b"\0" * _HEAD.size
            self._free.append(slot)

    def ensure_file(self) -> bool:
        """If this journal's file was deleted or replaced under us (a clean-up gone wrong), write what
        the map holds into a new file and carry on there; True when that happened."""
        with self._lock:
            if self._map is None or self._pid != os.getpid():
                return False
            try:
                if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                    return False
            except FileNotFoundError:
                pass
            old_map, old_fd = self._map, self._fd
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            path = os.path.join(self.directory, f"journal-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.posix_fallocate(fd, 0, len(old_map))
            new_map = mmap.mmap(fd, len(old_map))
            new_map[:] = old_map[:]
            self._map, self._fd, self.path = new_map, fd, path
            old_map.close()
            os.close(old_fd)
            return True

    def sync(self) -> None:
        """msync: survive a machine crash too (AUDIT_OUTBOX_FSYNC); the default relies on the page cache."""
        if self._map is not None:
            self._map.flush()

    def close(self, remove: bool) -> None:
        if self._map is None or self._pid != os.getpid():
            return
        self._map.close()
        os.close(self._fd)
        self._map = None
        if remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def read_slots(data: bytes | mmap.mmap) -> Iterator[tuple[int, bytes]]:
    """(state, payload) of every slot in use: the newer valid half of each."""
    for base in range(0, len(data) - _SLOT + 1, _SLOT):
        best: tuple[int, int, bytes] | None = None
        for half in (base, base + _HALF):
            magic, state, sequence, length, crc = _HEAD.unpack_from(data, half)
            if magic != _MAGIC or state not in (INTENT, FINAL) or length > _HALF - _HEAD.size:
                continue
            payload = bytes(data[half + _HEAD.size : half + _HEAD.size + length])
            if zlib.crc32(payload) != crc:
                continue  # a copy the process did not finish
            if best is None or sequence > best[0]:
                best = (sequence, state, payload)
        if best is not None:
            yield best[1], best[2]


def recover_orphans(directory: str, move: Callable[[list[tuple[int, bytes]]], None]) -> int:
    """Hand the slots of every journal whose process is gone to ``move``, then delete the journal."""
    recovered = 0
    for path in glob.glob(os.path.join(directory, "journal-*.bin")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process is alive
            try:
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    continue  # taken over and removed by another process meanwhile
            except FileNotFoundError:
                continue
            size = os.fstat(fd).st_size
            entries = []
            if size:
                with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as data:
                    entries = list(read_slots(data))
            if entries:
                move(entries)
            recovered += len(entries)
            os.unlink(path)
        finally:
            os.close(fd)
    return recovered
