"""API keys that never fail open (CONTRACT.md section 8, *rev 3*): the key rules and the keys file.

A key is at least 16 characters of printable ASCII, without spaces or commas. ``API_KEYS_FILE``
holds one key per line; it is read as UTF-8 with or without a BOM, CRLF or LF, at most 1 MiB,
and only when it is a regular file (a symlink to /dev/zero or a FIFO is refused before a byte is
read). A line starting with ``#`` (after optional blanks) is a comment; a key line holds the key
and nothing else: no inline comment, since ``#`` may be part of a key.

Under gunicorn the master reads the file (at start and at each ``kill -HUP``) and the workers it
forks inherit what it read (``held``). A bad file at start stops start-up; at a reload the master
keeps the keys it had, logs why and marks them stale (``/healthz`` says so): a broken edit never
turns authentication off, nor halts the master as a worker's exit 4 would. A file with no byte but
blanks is taken as a broken (truncated) write at a reload; a file whose keys are all commented out
is meant, and accepts no caller.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dtmf_service")

MAX_FILE_BYTES = 1024 * 1024
MIN_KEY_CHARS = 16


class KeysError(ValueError):
    """A key or keys file that breaks the rules; the message never holds key material."""


def key_weakness(key: str) -> str | None:
    """Why ``key`` is refused, or None when it meets the rules."""
    if len(key) < MIN_KEY_CHARS:
        return f"shorter than {MIN_KEY_CHARS} characters"
    if any(not (0x21 <= ord(c) <= 0x7E) for c in key):
        return "not printable ASCII without spaces"
    if "," in key:
        return "holds a comma"
    return None


def check_keys(keys: Iterable[str], source: str) -> list[str]:
    """``keys`` when each meets the rules, else KeysError naming the position (1-based), never the key."""
    checked = list(keys)
    for position, key in enumerate(checked, 1):
        reason = key_weakness(key)
        if reason:
            raise KeysError(f"{source}: key {position} is {reason}")
    return checked


@dataclass(frozen=True)
class KeysFile:
    """What a keys file held: its keys, and whether it held nothing but blanks (a truncated write?)."""

    keys: tuple[str, ...]
    blank: bool


class FileRefused(Exception):  # noqa: N818 - read as "the file was refused"
    """A settings file that cannot be used; the message names the path and why, never its content."""


def read_regular_file(path: str, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file (the API keys file, a secret's K_FILE): a FIFO, a
    device such as /dev/zero or a directory is refused unread, a larger file refused whole."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise FileRefused(f"cannot read {path} ({exc.strerror})") from None
    chunks: list[bytes] = []
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileRefused(f"{path} is not a regular file")
        total = 0
        while total <= limit and (chunk := os.read(fd, min(65536, limit + 1 - total))):
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise FileRefused(f"cannot read {path} ({exc.strerror})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise FileRefused(f"{path} is larger than {limit} bytes")
    return data


def read_keys_file(path: str) -> KeysFile:
    """Read and check a keys file; KeysError (naming the path and the line, never a key) when it breaks a rule."""
    try:
        data = read_regular_file(path, MAX_FILE_BYTES)
    except FileRefused as exc:
        raise KeysError(str(exc)) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise KeysError(f"{path} is not UTF-8") from None
    keys = []
    for number, line in enumerate(text.split("\n"), 1):
        entry = line.rstrip("\r").strip(" \t")
        if not entry or entry.startswith("#"):
            continue
        if any(c in entry for c in " \t"):
            raise KeysError(f"line {number} of {path} holds more than one word (comments go on their own line)")
        reason = key_weakness(entry)
        if reason:
            raise KeysError(f"line {number} of {path}: the key is {reason}")
        keys.append(entry)
    return KeysFile(tuple(keys), blank=not text.strip())


@dataclass(frozen=True)
class HeldKeys:
    """The keys a gunicorn master read, inherited by the workers it forks."""

    path: str
    keys: tuple[str, ...]
    stale: str | None = None  # why the last reload kept these keys (no key material)


_held: HeldKeys | None = None


def hold(path: str) -> HeldKeys:
    """In the gunicorn master at start: read the file (KeysError stops start-up) and keep it for the
    workers (each logs it at error level when it holds no key)."""
    global _held
    _held = HeldKeys(path, read_keys_file(path).keys)
    return _held


def reload_held(logger: Any = log) -> HeldKeys | None:
    """In the gunicorn master at ``kill -HUP``: re-read the file; keep the old keys when it breaks a rule.
    ``logger``: the master's (gunicorn's error log), which has ``error`` and ``info``."""
    global _held
    if _held is None:
        return None
    path = _held.path
    try:
        read = read_keys_file(path)
        if read.blank:
            raise KeysError(f"{path} is empty (a truncated write?); comment every key out to refuse every caller")
    except KeysError as exc:
        _held = HeldKeys(path, _held.keys, stale=str(exc))
        logger.error("dtmf-gateway: API_KEYS_FILE not reloaded, the workers keep the keys they had: %s", exc)
        return _held
    _held = HeldKeys(path, read.keys)
    if not read.keys:
        logger.error("dtmf-gateway: API_KEYS_FILE %s holds no key: every caller is refused", path)
    else:
        logger.info("dtmf-gateway: API_KEYS_FILE reloaded: %d key(s)", len(read.keys))
    return _held


def stale_reason(path: str) -> str | None:
    """Why the master's last reload of this file kept the previous keys, or None."""
    return _held.stale if _held is not None and _held.path == path else None


def current(path: str) -> HeldKeys:
    """The keys for an application starting now: the master's when a gunicorn master read this file,
    else the file's (KeysError when it breaks a rule)."""
    if _held is not None and _held.path == path:
        return _held
    read = read_keys_file(path)
    return HeldKeys(path, read.keys)
