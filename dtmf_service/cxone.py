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

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .auth import TokenCache, TokenError
from .dialects import Dialect
from .retry import backoff_delay, is_retryable_status, parse_retry_after
from .transport import Answer, NotSent, Transport, Unknown

RESPONSE_EXCERPT_CHARS = 1024


@dataclass
class SubmitResult:
    """The outcome of one submission, ready to become an HTTP answer."""

    http_status: int  # what the gateway answers: 200, 404, 502, 503, 504
    status: str  # dtmf_submitted | submission_failed | submission_unknown
    cxone_status: int | None
    cxone_response: str | None
    attempts: int
    error: str | None = None
    retry_after_s: int | None = None


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

    def submit(
        self,
        interaction_id: str,
        digits: str,
        timeout_ms: int,
        correlation_id: str,
        headers: dict[str, str] | None = None,
    ) -> SubmitResult:
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
            except TokenError as exc:
                return self._failed(502, None, last[1], attempts, str(exc))
            attempts += 1
            try:
                response = self._post(url, body, token, {**extra, **(headers or {})}, hard_deadline - self._clock())
            except NotSent:
                self._on_attempt("not_sent")
                last = (None, None, None)
                wait = backoff_delay(retries, self._base_s, self._max_s, self._rand)
            except Unknown:
                self._on_attempt("unknown")
                return SubmitResult(
                    504,
                    "submission_unknown",
                    None,
                    None,
                    attempts,
                    "CXone did not answer after the request was sent; the digits may or may not have been "
                    "played, so they were not sent again",
                )
            else:
                status, text = response.status, response.text[:RESPONSE_EXCERPT_CHARS]
                self._on_attempt(attempt_result(status))
                last = (status, text, response.headers.get("Retry-After"))
                if 200 <= status < 300:
                    return SubmitResult(200, "dtmf_submitted", status, text, attempts)
                if status == 401 and not refreshed:
                    # The token was revoked or expired early: fetch a new one once and try again now.
                    refreshed = True
                    self._tokens.invalidate(token)
                    continue
                if status == 404:
                    return self._failed(404, 404, text, attempts, "CXone: interaction not found or no longer active")
                if not is_retryable_status(status):
                    return self._failed(502, status, text, attempts, f"CXone answered {status}")
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

    def _give_up(self, last: tuple[int | None, str | None, str | None], attempts: int) -> SubmitResult:
        status, text, retry_after = last
        if status == 429:
            after = parse_retry_after(retry_after, self._wall_clock(), self._max_s)
            seconds = max(1, math.ceil(after if after is not None else self._base_s))
            result = self._failed(503, 429, text, attempts, "CXone is still rate limiting; retry later")
            result.retry_after_s = seconds
            return result
        if status is None:
            return self._failed(502, None, None, attempts, "could not connect to CXone")
        return self._failed(502, status, text, attempts, f"CXone answered {status}")

    @staticmethod
    def _failed(http: int, cxone: int | None, text: str | None, attempts: int, error: str) -> SubmitResult:
        return SubmitResult(http, "submission_failed", cxone, text, attempts, error)
