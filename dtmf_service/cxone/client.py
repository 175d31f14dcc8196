"""The synchronous CXone client: one DTMF submission with careful retries.

DTMF is not idempotent (pressing "1" twice moves a caller two menus), so a
request is sent again only when CXone cannot have acted on it: 429, 503, or a
connection that never opened. A read timeout or a connection lost after the
request went out is reported as unknown and never re-sent.

One deadline bounds the whole submission (CONTRACT.md section 3, *rev 2*): from
the first attempt, the token fetch, discovery, every attempt and every wait end
within CXONE_RETRY_BUDGET_S + CXONE_READ_TIMEOUT_S; the transport cuts an answer
that is still trickling in at that moment.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from dtmf_service.cxone.dialects import Dialect, make_dialect
from dtmf_service.cxone.retry import backoff_delay, is_retryable_status, parse_retry_after
from dtmf_service.cxone.tokens import NotReady, TokenCache
from dtmf_service.cxone.transport import Answer, HttpTransport, NotSent, SimulatorTransport, Transport, Unknown
from dtmf_service.simulator import SANDBOX_URL, Simulator

RESPONSE_EXCERPT_CHARS = 1024


class Result(StrEnum):
    """What became of one submission, in CXone's terms."""

    ACCEPTED = "accepted"  # CXone answered 2xx
    NOT_FOUND = "not_found"  # 404: no such interaction, or no longer active
    REJECTED = "rejected"  # another answer that sending again would not change
    RATE_LIMITED = "rate_limited"  # still 429 when the attempts or the budget ran out
    UNREACHABLE = "unreachable"  # no request ever reached CXone
    UNKNOWN = "unknown"  # the request went out and no answer came back: it may have been played
    NOT_READY = "not_ready"  # no token or endpoint could be had, so nothing was sent


@dataclass(frozen=True)
class Submission:
    """What CXone did with one submission. ``dtmf_service.parse`` turns it into the caller's answer."""

    result: Result
    attempts: int
    cxone_status: int | None = None  # CXone's last HTTP status, if it answered
    cxone_response: str | None = None  # the start of CXone's last answer
    retry_after_s: float | None = None  # CXone's last Retry-After, when it was rate limiting
    detail: str | None = None  # why, when NOT_READY (safe to show: never a secret)


def attempt_result(status: int) -> str:
    """The ``result`` label of dtmf_cxone_attempts_total for an answered attempt."""
    if status == 429:
        return "429"
    return f"{min(max(status // 100, 1), 5)}xx"


class CXoneClient:
    """Submits digits to CXone through a dialect, with token reuse and backoff."""

    def __init__(
        self,
        config: Mapping[str, Any],
        dialect: Dialect,
        transport: Transport,
        tokens: TokenCache,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        on_attempt: Callable[[str], None] = lambda result: None,
        simulator: Simulator | None = None,
    ) -> None:
        self._dialect = dialect
        self._transport = transport
        self._tokens = tokens
        self._sleep = sleep
        self._clock = clock
        self._wall_clock = wall_clock
        self._rand = rand
        self._on_attempt = on_attempt  # each DTMF POST's result: 2xx, 4xx, 429, 5xx, not_sent, unknown
        self._max_attempts = int(config["CXONE_MAX_ATTEMPTS"])
        self._base_s = float(config["CXONE_BACKOFF_BASE_S"])
        self._max_s = float(config["CXONE_BACKOFF_MAX_S"])
        self._read_s = float(config["CXONE_READ_TIMEOUT_S"])
        self.simulator = simulator  # sandbox mode: the in-process CXone that answers instead

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        on_attempt: Callable[[str], None] = lambda result: None,
        on_token_fetch: Callable[[str], None] = lambda result: None,
        **overrides: Any,
    ) -> CXoneClient:
        """The client the configuration describes: in sandbox mode (CONTRACT.md section 5) every call
        is answered by an in-process simulator; otherwise by CXone over HTTPS. ``overrides`` replace
        the clock, sleep and randomness (tests)."""
        simulator: Simulator | None = None
        transport: Transport
        if config["SANDBOX"]:
            simulator = Simulator(SANDBOX_URL)
            transport = SimulatorTransport(simulator)
        else:
            transport = HttpTransport(
                float(config["CXONE_CONNECT_TIMEOUT_S"]),
                float(config["CXONE_READ_TIMEOUT_S"]),
                ca_bundle=config.get("CXONE_CA_BUNDLE"),
            )
        dialect = make_dialect(config, transport)
        margin = float(config["CXONE_TOKEN_REFRESH_MARGIN_S"])
        tokens = TokenCache(dialect.fetch_token, margin_s=margin, on_fetch=on_token_fetch)
        return cls(config, dialect, transport, tokens, on_attempt=on_attempt, simulator=simulator, **overrides)

    def submit(
        self,
        interaction_id: str,
        digits: str,
        timeout_ms: int,
        correlation_id: str,
        headers: dict[str, str] | None = None,
    ) -> Submission:
        """Send the digits; never raises for upstream trouble. ``headers`` go on every DTMF POST
        (trace context)."""
        started = self._clock()
        deadline = started + self._dialect.retry_budget_s(timeout_ms)  # no wait may end past this
        hard_deadline = deadline + self._read_s  # nothing at all ends past this
        attempts = 0
        refreshed = False
        retries = 0
        last: tuple[int | None, str | None, str | None] = (None, None, None)  # status, body, Retry-After
        while attempts < self._max_attempts:
            try:
                token = self._tokens.get(hard_deadline - self._clock())
                url, body, extra = self._dialect.dtmf_request(
                    interaction_id, digits, timeout_ms, correlation_id, hard_deadline - self._clock()
                )
            except NotReady as exc:
                return Submission(Result.NOT_READY, attempts, None, last[1], detail=str(exc))
            attempts += 1
            try:
                response = self._post(url, body, token, {**extra, **(headers or {})}, hard_deadline - self._clock())
            except NotSent:
                self._on_attempt("not_sent")
                last = (None, None, None)
                wait = backoff_delay(retries, self._base_s, self._max_s, self._rand)
            except Unknown:
                self._on_attempt("unknown")
                return Submission(Result.UNKNOWN, attempts)
            else:
                status, text = response.status, response.text[:RESPONSE_EXCERPT_CHARS]
                self._on_attempt(attempt_result(status))
                last = (status, text, response.headers.get("Retry-After"))
                if 200 <= status < 300:
                    return Submission(Result.ACCEPTED, attempts, status, text)
                if status == 401 and not refreshed:
                    # The token was revoked or expired early: fetch a new one once and try again now.
                    refreshed = True
                    self._tokens.invalidate(token)
                    continue
                if status == 404:
                    return Submission(Result.NOT_FOUND, attempts, status, text)
                if not is_retryable_status(status):
                    return Submission(Result.REJECTED, attempts, status, text)
                after = parse_retry_after(last[2], self._wall_clock(), self._max_s)
                wait = after if after is not None else backoff_delay(retries, self._base_s, self._max_s, self._rand)
            if attempts >= self._max_attempts or self._clock() + wait > deadline:
                break  # never wait after the last attempt, never wait past the budget
            self._sleep(wait)
            retries += 1
        return self._give_up(last, attempts)

    def _post(self, url: str, body: bytes, token: str, extra: dict[str, str], timeout_s: float) -> Answer:
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            **extra,
        }
        return self._transport.request("POST", url, body, headers, timeout_s)

    def _give_up(self, last: tuple[int | None, str | None, str | None], attempts: int) -> Submission:
        status, text, retry_after = last
        if status == 429:
            after = parse_retry_after(retry_after, self._wall_clock(), self._max_s)
            wait = after if after is not None else self._base_s
            return Submission(Result.RATE_LIMITED, attempts, status, text, retry_after_s=wait)
        if status is None:
            return Submission(Result.UNREACHABLE, attempts)
        return Submission(Result.REJECTED, attempts, status, text)

    def close(self) -> None:
        self._transport.close()
