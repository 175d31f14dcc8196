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
the same content, which receivers drop). A journal file gets its name only once its owner holds
the lock (created under a temporary name, locked, renamed), so no recovery ever sees it unlocked.

When every slot is taken (the outbox is locked by another process, slow, or full), events spill
into append-only files beside the journal instead of waiting (CONTRACT.md section 7 rev 3, audit
never holds a caller back): whole records, the newest record of an event wins, a file deleted
once none of its events is still waiting for the outbox. The spill is bounded by the spool size.

The journal stays usable until the process's last request has written (section 7 rev 3, every
way a worker stops): ``close()`` leaves a journal that still holds events mapped, and a write
after ``close()`` opens a new one.

Longer than the project's usual module: the slots, the spill files and their recovery share one
lock, one record format and one way of creating a file locked; apart, each would need the others'
internals.
"""

from __future__ import annotations

import fcntl
import glob
import json
import mmap
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator

INTENT, FINAL = 1, 2
_HALF = 8192  # an event is well under 2 KiB; its cxone_response, JSON-escaped, is the only large part
_SLOT = 2 * _HALF
_HEAD = struct.Struct("<HBxIII")  # magic, state, sequence, length, crc32
_MAGIC = 0xD7F1
_SPILL_ROLL = 8 << 20  # a spill file takes new events up to this size, then the next one does
_PATTERNS = ("journal-*.bin", "spill-*.log")
# The last page of a journal file: how many final events of its process wait for the outbox (slots
# and spill files), so that the backlog figures count them as pending (``waiting_in``).
_COUNT = struct.Struct("<8sQ")
_COUNT_MAGIC = b"dtmfwait"
_COUNT_PAGE = 4096
_ABANDONED_S = 60.0


class JournalFull(Exception):
    """No free slot and no room to spill, or the event does not fit a slot: the caller writes
    through the outbox instead."""


class _Spill:
    """One append-only spill file and how many of its events still wait for the outbox."""

    __slots__ = ("path", "fd", "size", "waiting", "sealed", "closed")

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd, self.size, self.waiting, self.sealed, self.closed = path, fd, 0, 0, False, False


class SpillTicket:
    """An event's place in a spill file (what ``acquire`` gives when no slot is free)."""

    __slots__ = ("spill", "final")

    def __init__(self, spill: _Spill) -> None:
        self.spill = spill
        self.final = False


Ticket = int | SpillTicket


def create_locked(directory: str, name: str, size: int = 0) -> int:
    """Create ``directory/name`` already locked by this process: made under a temporary name that no
    recovery looks at, flocked (and ``size`` bytes reserved), then renamed into place. An open file
    descriptor, locked until it is closed or the process dies."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    temporary = os.path.join(directory, f".{name}.tmp")
    fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel when this process dies
        if size:
            # Reserve the blocks now: writing into a mapped page that a full disk cannot back is
            # SIGBUS, which kills the process. A disk already full refuses here instead.
            os.posix_fallocate(fd, 0, size)
        os.rename(temporary, os.path.join(directory, name))
    except OSError:
        os.close(fd)
        _unlink(temporary)
        raise
    return fd


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Journal:
    """This process's slots (one per request in flight plus the final events not yet moved), and
    its spill files when the slots run out."""

    def __init__(self, directory: str, slots: int = 128, spill_max_bytes: int = 0) -> None:
        self.directory = directory
        self.slots = slots  # 0: no journal at all (every write goes through the outbox)
        self.spill_max_bytes = spill_max_bytes  # 0: no spill files (JournalFull once every slot is taken)
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._map: mmap.mmap | None = None
        self._fd = -1
        self._free: list[int] = []
        self._halves = bytearray(slots)  # the half each slot writes next: intent and final never share one
        self._sequence = 0
        self._spills: list[_Spill] = []  # the last one takes new events
        self._gave_up = False  # the journal could not be made in this process
        self._finals = bytearray(slots)  # which slots hold a final event (it waits for the outbox)
        self._waiting = 0
        # Tickets of the current journal are base..base+slots-1: a ticket of a journal closed since
        # (the writer freeing a moved event late) never touches a slot of the next one.
        self._base = self._next_base = 0
        self.path = ""

    def _open(self) -> None:
        # A forked child gets a journal of its own (the parent's lock and map are not its to use).
        name = f"journal-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
        size = self.slots * _SLOT + _COUNT_PAGE
        try:
            fd = create_locked(self.directory, name, size)
        except OSError as exc:
            raise JournalFull(f"cannot make a journal ({exc.strerror})") from None
        try:
            self._map = mmap.mmap(fd, size)
        except OSError as exc:
            os.close(fd)
            _unlink(os.path.join(self.directory, name))
            raise JournalFull(f"cannot map a journal ({exc.strerror})") from None
        self.path = os.path.join(self.directory, name)
        self._fd = fd
        self._base, self._next_base = self._next_base, self._next_base + self.slots
        self._free = list(range(self.slots - 1, -1, -1))
        self._halves = bytearray(self.slots)
        self._finals = bytearray(self.slots)
        self._spills = []
        self._waiting = 0
        self._count(0)

    def _count(self, delta: int) -> None:
        """Final events waiting for the outbox, kept in the file's last page (under the lock)."""
        self._waiting += delta
        if self._map is not None:
            self._map[self.slots * _SLOT : self.slots * _SLOT + _COUNT.size] = _COUNT.pack(_COUNT_MAGIC, self._waiting)

    def in_use(self) -> int:
        """Events of this process in the journal that the outbox does not have yet (placeholders too)."""
        with self._lock:
            return self._in_use() if self._pid == os.getpid() else 0

    def _in_use(self) -> int:
        return (self.slots - len(self._free) if self._map is not None else 0) + sum(s.waiting for s in self._spills)

    def spilled(self) -> int:
        """Events of this process waiting in spill files (every slot was taken)."""
        with self._lock:
            return sum(s.waiting for s in self._spills) if self._pid == os.getpid() else 0

    def acquire(self) -> Ticket:
        """A free slot, else a place in a spill file; JournalFull when neither can be had."""
        with self._lock:
            if not self.slots:
                raise JournalFull("no journal slots")
            if self._pid != os.getpid() or (self._map is None and not self._gave_up):
                # Tried once per process (and again after close()): without one, SQLite directly.
                self._pid, self._gave_up = os.getpid(), True
                self._free, self._spills, self._map = [], [], None
                self._open()
                self._gave_up = False
            if self._map is None:
                raise JournalFull("no journal in this process")
            if self._free:
                return self._base + self._free.pop()
            spill = self._spill_target()
            spill.waiting += 1
            return SpillTicket(spill)

    def _spill_target(self) -> _Spill:
        current = self._spills[-1] if self._spills else None
        if current is not None and current.size < _SPILL_ROLL:
            return current
        if sum(s.size for s in self._spills) >= self.spill_max_bytes:
            raise JournalFull("the journal's spill files reached the spool bound")
        if current is not None:
            current.sealed = True
        name = f"spill-{os.getpid()}-{uuid.uuid4().hex[:8]}.log"
        try:
            fd = create_locked(self.directory, name)
        except OSError as exc:
            raise JournalFull(f"cannot make a spill file ({exc.strerror})") from None
        spill = _Spill(os.path.join(self.directory, name), fd)
        self._spills.append(spill)
        return spill

    def current(self, ticket: Ticket) -> bool:
        """Whether ``ticket`` belongs to this process's open journal (not to one closed since)."""
        with self._lock:
            if isinstance(ticket, SpillTicket):
                return not ticket.spill.closed
            return self._local(ticket) is not None

    def _local(self, ticket: int) -> int | None:
        slot = ticket - self._base
        return slot if self._map is not None and 0 <= slot < self.slots else None

    def write(self, slot: Ticket, state: int, payload: bytes) -> None:
        """Copy ``payload`` into the slot's other half (or append it to the spill file); once this
        returns it survives the process."""
        if isinstance(slot, SpillTicket):
            self._append(slot.spill, state, payload)
            if state == FINAL and not slot.final:
                slot.final = True
                with self._lock:
                    self._count(1)
            return
        if len(payload) > _HALF - _HEAD.size:
            raise JournalFull("the event does not fit a journal slot")
        crc = zlib.crc32(payload)
        with self._lock:  # held across the copy: ensure_file() may swap the map underneath
            ticket, local = slot, self._local(slot)
            if local is None or self._map is None:
                raise JournalFull(f"journal slot {ticket} was closed")  # close() keeps it while in flight
            slot = local
            self._sequence += 1
            sequence = self._sequence
            half = self._halves[slot]
            self._halves[slot] = 1 - half
            base = slot * _SLOT + half * _HALF
            self._map[base + _HEAD.size : base + _HEAD.size + len(payload)] = payload
            # The header last: a copy cut short leaves a half whose CRC fails, and the other half stands.
            self._map[base : base + _HEAD.size] = _HEAD.pack(_MAGIC, state, sequence, len(payload), crc)
            if state == FINAL and not self._finals[slot]:
                self._finals[slot] = 1
                self._count(1)

    def _append(self, spill: _Spill, state: int, payload: bytes) -> None:
        with self._lock:
            if spill.closed:
                raise JournalFull("the spill file was closed")
            self._sequence += 1
            record = _HEAD.pack(_MAGIC, state, self._sequence, len(payload), zlib.crc32(payload)) + payload
            try:
                written = os.pwrite(spill.fd, record, spill.size)
            except OSError as exc:
                raise JournalFull(f"cannot spill ({exc.strerror})") from None
            if written != len(record):
                raise JournalFull("cannot spill (short write)")  # the next record overwrites this one
            spill.size += written

    def release(self, slot: Ticket) -> None:
        """The slot's event is in the outbox: clear both halves and make the slot free again."""
        if isinstance(slot, SpillTicket):
            self._release_spill(slot)
            return
        with self._lock:
            local = self._local(slot)
            if local is None or self._map is None:
                return  # its journal was closed: left on disk, another process takes it over
            slot, base = local, local * _SLOT
            self._map[base : base + _HEAD.size] = b"\0" * _HEAD.size
            self._map[base + _HALF : base + _HALF + _HEAD.size] = b"\0" * _HEAD.size
            if self._finals[slot]:
                self._finals[slot] = 0
                self._count(-1)
            self._free.append(slot)

    def _release_spill(self, ticket: SpillTicket) -> None:
        spill = ticket.spill
        with self._lock:
            if spill.closed:
                return  # closed with the journal: left on disk, another process takes it over
            if ticket.final:
                ticket.final = False
                self._count(-1)
            spill.waiting -= 1
            if spill.waiting:
                return
            if spill.sealed:
                _unlink(spill.path)  # nothing in it waits any more: gone, lock and all
                os.close(spill.fd)
                self._spills.remove(spill)
            else:
                os.ftruncate(spill.fd, 0)  # the current spill file, emptied: its space back
                spill.size = 0

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
            name = f"journal-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
            fd = create_locked(self.directory, name, len(old_map))
            new_map = mmap.mmap(fd, len(old_map))
            new_map[:] = old_map[:]
            self._map, self._fd, self.path = new_map, fd, os.path.join(self.directory, name)
            old_map.close()
            os.close(old_fd)
            return True

    def sync(self) -> None:
        """msync and fdatasync: survive a machine crash too (AUDIT_OUTBOX_FSYNC); the default relies
        on the page cache."""
        with self._lock:
            if self._map is not None and self._pid == os.getpid():
                self._map.flush()
                for spill in self._spills:
                    os.fdatasync(spill.fd)

    def close(self, remove: bool) -> None:
        """Unmap and close, unless a request of this process is still running (it holds a
        placeholder without its final event): then the journal stays mapped, so that late writer
        still writes (every way a worker stops), and what is left is taken over once the process is
        gone. Final events still waiting for the outbox stay on disk for another process to take
        over. A write after this opens a new journal."""
        with self._lock:
            if self._map is None or self._pid != os.getpid():
                return
            in_use = self._in_use()
            if in_use - self._waiting > 0:
                return
            self._map.close()
            os.close(self._fd)
            self._map = None
            for spill in self._spills:
                spill.closed = True
                os.close(spill.fd)
                if not spill.waiting:
                    _unlink(spill.path)
            self._spills = []
            if remove and not in_use:
                _unlink(self.path)


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


def waiting_in(directory: str) -> int:
    """Final events that the journals of ``directory`` hold and the outbox does not have yet (live
    processes' and dead ones' not yet taken over): one small read per process, whatever the backlog."""
    waiting = 0
    for path in glob.glob(os.path.join(directory, "journal-*.bin")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            size = os.fstat(fd).st_size
            if size % _SLOT == _COUNT_PAGE:
                magic, count = _COUNT.unpack(os.pread(fd, _COUNT.size, size - _COUNT_PAGE).ljust(_COUNT.size, b"\0"))
                waiting += count if magic == _COUNT_MAGIC else 0
        finally:
            os.close(fd)
    return waiting


def read_spill(data: bytes | mmap.mmap) -> list[tuple[int, bytes]]:
    """(state, payload) of each event in a spill file: its newest whole record (a final event
    replaces its placeholder). Reading stops at a record cut short."""
    newest: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while offset + _HEAD.size <= len(data):
        magic, state, _sequence, length, crc = _HEAD.unpack_from(data, offset)
        payload = bytes(data[offset + _HEAD.size : offset + _HEAD.size + length])
        if magic != _MAGIC or state not in (INTENT, FINAL) or len(payload) != length or zlib.crc32(payload) != crc:
            break  # the process died in the middle of this record: nothing follows it
        offset += _HEAD.size + length
        try:
            key = str(json.loads(payload)["event_id"])
        except (ValueError, KeyError, TypeError):
            key = f"@{offset}"
        newest.pop(key, None)
        newest[key] = (state, payload)
    return list(newest.values())


def recover_orphans(
    directory: str, move: Callable[[list[tuple[int, bytes]]], None], ready: Callable[[], bool] | None = None
) -> int:
    """Hand the events of every journal (and spill file) whose process is gone to ``move``, then
    delete the file. ``ready`` is asked once, before the first orphan is read: False (the store
    cannot take them now) leaves every orphan for a later round, unread."""
    recovered = 0
    asked = False
    paths = [path for pattern in _PATTERNS for path in glob.glob(os.path.join(directory, pattern))]
    for path in paths:
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
            if ready is not None and not asked:
                asked = True
                if not ready():
                    return recovered
            size = os.fstat(fd).st_size
            entries: list[tuple[int, bytes]] = []
            if size:
                with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as data:
                    entries = read_spill(data) if path.endswith(".log") else list(read_slots(data))
            if entries:
                move(entries)
            recovered += len(entries)
            os.unlink(path)
        finally:
            os.close(fd)
    _remove_abandoned(directory)
    return recovered


def _remove_abandoned(directory: str, now: float | None = None) -> None:
    """Temporary files of processes that died between creating and renaming one (empty): those
    older than a minute, so one whose owner is about to lock it is left alone."""
    now = time.time() if now is None else now
    for path in glob.glob(os.path.join(directory, ".*.tmp")):
        try:
            if now - os.stat(path).st_mtime < _ABANDONED_S:
                continue
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _unlink(path)
        except BlockingIOError:
            pass  # its owner is between creating and renaming it
        finally:
            os.close(fd)
