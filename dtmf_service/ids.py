"""Random ids for the request path (event ids, request ids, trace and span ids) from the OS's CSPRNG,
drawn in blocks.

``os.urandom`` releases the GIL around its ``getrandom`` call. A request drew four ids, so under
load each request handed the GIL away four more times, and every hand-off is a chance for one of
the other request threads to take it (a context switch each, measured 16 per request under
granian). The bytes are the same kind (the kernel's CSPRNG); they are taken 4 KiB at a time per
thread and handed out once each. A forked child never reuses its parent's block: the generation
moves on at every fork, and a thread's block from before is dropped.
"""

from __future__ import annotations

import os
import threading
import uuid

_BLOCK = 4096
_local = threading.local()
_generation = 0


def _forked() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_forked)


def random_bytes(count: int) -> bytes:
    """``count`` (at most 4096) bytes from the OS's CSPRNG, never handed out twice."""
    local = _local
    block: bytes | None = getattr(local, "block", None)
    at: int = getattr(local, "at", 0)
    if block is None or local.generation != _generation or at + count > len(block):
        block, at = os.urandom(_BLOCK), 0
        local.block, local.generation = block, _generation
    local.at = at + count
    return block[at : at + count]


def uuid4() -> str:
    """A random (version 4) UUID as text, as ``str(uuid.uuid4())``."""
    return str(uuid.UUID(bytes=random_bytes(16), version=4))


def hex_id(count: int) -> str:
    """``count`` random bytes in hex, as ``secrets.token_hex(count)``."""
    return random_bytes(count).hex()
