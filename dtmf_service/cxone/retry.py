"""Pure retry rules: what may be retried, how long to wait, how to read Retry-After."""

from __future__ import annotations

import email.utils
import math
import random
import re
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

    Never negative, never above ``cap_s``; None when absent or unreadable. ``now`` is the current
    wall-clock time (Unix seconds), used for HTTP dates. CONTRACT.md section 3 *rev 3*: a value that
    cannot be read, however odd, counts as absent; this function never raises. Unreadable includes
    non-ASCII digits (``\u00b2``, ``\u0967``), more than 10 digits (``int()`` refuses over 4,300) and
    dates in year 9999 or later (the "never" sentinel, or past what ``datetime`` can hold).
    """
    try:
        return _parse_retry_after(value, now, cap_s)
    except Exception:  # noqa: BLE001 - whatever the parsers raise on a header we did not foresee
        return None


_DELTA_SECONDS = re.compile(r"[0-9]{1,10}")


def _parse_retry_after(value: str | None, now: float, cap_s: float) -> float | None:
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _DELTA_SECONDS.fullmatch(text):
        seconds = float(int(text))
    else:
        when = email.utils.parsedate_to_datetime(text)
        if when is None or when.tzinfo is None or when.year >= 9999:
            return None
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), cap_s)
