"""Pure retry rules: what may be retried, how long to wait, how to read Retry-After."""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Callable

# CXone cannot have acted on the digits when it answers these: safe to send again.
RETRYABLE_STATUSES = frozenset({429, 503})


def is_retryable_status(status: int) -> bool:
    """True when an upstream answer says the request was not acted upon."""
    return status in RETRYABLE_STATUSES


def backoff_delay(retry_number: int, base_s: float, max_s: float, rand: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, base * 2**n)].

    ``retry_number`` counts from 0 for the wait before the second attempt.
    """
    ceiling = min(max_s, base_s * (2 ** min(retry_number, 62)))
    return ceiling * rand()


def parse_retry_after(value: str | None, now: float, cap_s: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date).

    Never negative, never above ``cap_s``; None when absent or unreadable.
    ``now`` is the current wall-clock time (Unix seconds), used for HTTP dates.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        seconds = float(int(text))
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), cap_s)
