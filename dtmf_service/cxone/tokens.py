"""Values fetched from CXone before a DTMF POST can go out: the OAuth access token and, in the
Agent dialect, the discovered endpoints. One cached value per process, one fetch at a time."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("dtmf_service")


class NotReady(Exception):
    """Nothing could be sent: a value the DTMF POST needs could not be had. The message is safe to
    show: it never holds a secret."""


class TokenError(NotReady):
    """No access token could be had."""


class DiscoveryError(NotReady):
    """A CXone endpoint could not be discovered."""


@dataclass(frozen=True)
class Token:
    value: str
    refresh_at: float  # on the cache's monotonic clock


class _Flight:
    """One fetch in progress; every thread waiting on it shares its outcome."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.token: Token | None = None
        self.error: NotReady | None = None


class SingleFlightCache:
    """Caches one fetched value and fetches it again ``margin_s`` before it expires.

    ``fetch(timeout_s)`` returns ``(value, expires_in_seconds)`` within ``timeout_s``
    or raises ``error`` (a NotReady). Concurrent callers that find no valid value join a single
    in-flight fetch and share its result or its failure, so a failing endpoint sees one
    request per burst, not one per thread. A caller waits for the fetch no longer than its
    own ``timeout_s``: a fetch never stretches a request past its deadline.
    """

    error: type[NotReady] = NotReady  # what a failure is raised as
    what = "CXone"  # what is fetched, for the messages

    def __init__(
        self,
        fetch: Callable[[float], tuple[str, float]],
        margin_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_fetch: Callable[[str], None] = lambda result: None,
    ) -> None:
        self._fetch = fetch
        self._on_fetch = on_fetch  # each fetch's result: ok or error (dtmf_cxone_token_fetches_total)
        self._margin_s = margin_s
        self._clock = clock
        self._lock = threading.Lock()
        self._token: Token | None = None
        self._flight: _Flight | None = None

    def get(self, timeout_s: float = 60.0) -> str:
        """Return a valid value, fetching one if needed, within ``timeout_s``."""
        with self._lock:
            token = self._token
            if token is not None and self._clock() < token.refresh_at:
                return token.value
            flight = self._flight
            leader = flight is None
            if leader:
                flight = self._flight = _Flight()
        assert flight is not None
        if leader:
            self._lead(flight, timeout_s)
        elif not flight.done.wait(max(timeout_s, 0.0)):
            raise self.error(f"timed out waiting for the {self.what}")
        if flight.error is not None:
            raise flight.error
        assert flight.token is not None
        return flight.token.value

    def invalidate(self, stale: str) -> None:
        """Drop ``stale`` after CXone rejected it; a newer token is kept."""
        with self._lock:
            if self._token is not None and self._token.value == stale:
                self._token = None

    def _lead(self, flight: _Flight, timeout_s: float) -> None:
        try:
            value, expires_in = self._fetch(timeout_s)
            lifetime = max(float(expires_in), 0.0)
            # Refreshed ``margin_s`` before expiry, but never later than half its life: a token that
            # lives less than twice the margin (under a minute with the default 30 s) is used for
            # the first half of its life instead of being fetched again on every call.
            flight.token = Token(value, self._clock() + lifetime - min(self._margin_s, lifetime / 2))
        except NotReady as exc:
            flight.error = exc
        except Exception as exc:  # noqa: BLE001 - never let one thread's surprise strand the waiters
            flight.error = self.error(f"request to the {self.what} failed ({type(exc).__name__})")
        finally:
            # Whatever happened above (even a BaseException), the flight ends here: otherwise every
            # later caller would join it and wait out its own deadline.
            self._land(flight)
        try:
            self._on_fetch("error" if flight.error is not None else "ok")
        except Exception:  # noqa: BLE001 - a metrics write (full disk, bad exporter) never fails a fetch
            log.warning("could not count a %s fetch", self.what, exc_info=False)

    def _land(self, flight: _Flight) -> None:
        if flight.token is None and flight.error is None:
            flight.error = self.error(f"request to the {self.what} was interrupted")
        with self._lock:
            if flight.token is not None:
                self._token = flight.token
            self._flight = None
        flight.done.set()


class TokenCache(SingleFlightCache):
    """The bearer token, refreshed ``margin_s`` before it expires."""

    error = TokenError
    what = "CXone token endpoint"


class EndpointCache(SingleFlightCache):
    """A discovered endpoint (fetched once, again after a failure)."""

    error = DiscoveryError
    what = "CXone discovery documents"
