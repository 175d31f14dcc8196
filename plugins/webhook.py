"""Audit sink ``webhook``: events POSTed to AUDIT_WEBHOOK_URL, optionally signed.

One event per POST as ``application/json`` (the default), or with AUDIT_WEBHOOK_BATCH_MAX above 1
up to that many per POST as ``application/x-ndjson``, one event per line, signed over the whole
body (CONTRACT.md section 7, *rev 2*). A 2xx delivers; a 4xx other than 408, 425 and 429 is a
refusal for good (the core makes it a dead letter after its attempts); anything else is a failure
to try again. When a batch is refused, its events are sent one by one to find which the receiver
refuses, so one bad event never takes its batch with it.

Signing (CONTRACT.md section 8, *rev 3*): AUDIT_WEBHOOK_SECRET may hold several secrets, comma
separated, the first current; each POST then carries one ``v1=`` per secret, as Stripe does, so a
receiver switches secrets without a gap. AUDIT_WEBHOOK_CA_BUNDLE adds trust for a private CA.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import urllib3

from dtmf_service import DeliveryIncomplete, DeliveryRejected, event_json, hookimpl
from dtmf_service.config import ConfigError
from dtmf_service.cxone.transport import tls_context
from dtmf_service.web.tracing import child_traceparent

_TRY_AGAIN = frozenset({408, 425, 429})
_ChunkResult = tuple[list[dict[str, Any]], list[dict[str, Any]], BaseException | None]


def signature(secrets: str | Sequence[str], timestamp: int, body: bytes) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`` (X-DTMF-Signature), one ``v1=``
    per secret, the current one first."""
    signed = f"{timestamp}.".encode() + body
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    macs = ",".join(f"v1={hmac.new(key.encode(), signed, hashlib.sha256).hexdigest()}" for key in keys)
    return f"t={timestamp},{macs}"


def _refused(status: int) -> bool:
    return 400 <= status < 500 and status not in _TRY_AGAIN


class WebhookSink:
    """urllib3's keep-alive pool directly (requests' own transport), one pool for every thread."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        secret: str | Sequence[str] | None,
        concurrency: int = 8,
        batch_max: int = 1,
        ca_bundle: str | None = None,
    ) -> None:
        self.url = url
        self.secrets = [secret] if isinstance(secret, str) else list(secret or ())
        self.concurrency = concurrency
        self.batch_max = batch_max
        # Verification always on; the bundle adds a private CA to the system's trust.
        self._pool = urllib3.PoolManager(
            maxsize=concurrency,
            retries=False,
            timeout=urllib3.Timeout(total=timeout_s),
            ssl_context=tls_context(ca_bundle),
        )
        self._executor: ThreadPoolExecutor | None = None
        self._pid: int | None = None

    def _post(self, body: bytes, content_type: str, trace_id: str | None = None) -> int:
        headers = {"Content-Type": content_type, "User-Agent": "dtmf-gateway-audit"}
        if trace_id:
            headers["traceparent"] = child_traceparent(trace_id)  # one event: its request's trace
        if self.secrets:
            headers["X-DTMF-Signature"] = signature(self.secrets, int(time.time()), body)
        return self._pool.urlopen("POST", self.url, body=body, headers=headers, retries=False, redirect=False).status

    def deliver(self, event: dict[str, Any]) -> None:
        status = self._post(event_json(event).encode(), "application/json", event.get("trace_id"))
        if _refused(status):
            raise DeliveryRejected(f"webhook refused the event (HTTP {status})")
        if not 200 <= status < 300:
            raise RuntimeError(f"webhook answered HTTP {status}")

    def _deliver_chunk(self, chunk: list[dict[str, Any]]) -> _ChunkResult:
        """(undelivered, refused for good, the first error) of one POST's worth of events."""
        if len(chunk) == 1:
            try:
                self.deliver(chunk[0])
            except DeliveryRejected as exc:
                return chunk, chunk, exc
            except Exception as exc:  # noqa: BLE001 - reported to the core as undelivered
                return chunk, [], exc
            return [], [], None
        body = "".join(event_json(e) + "\n" for e in chunk).encode()
        try:
            status = self._post(body, "application/x-ndjson")
        except Exception as exc:  # noqa: BLE001
            return chunk, [], exc
        if 200 <= status < 300:
            return [], [], None
        if not _refused(status):
            return chunk, [], RuntimeError(f"webhook answered HTTP {status}")
        undelivered, refused, first = [], [], None
        for event in chunk:  # find the event(s) the receiver will not take
            left, bad, error = self._deliver_chunk([event])
            undelivered += left
            refused += bad
            first = first or error
        return undelivered, refused, first

    def deliver_many(self, events: list[dict[str, Any]]) -> None:
        """Up to ``batch_max`` events per POST, up to ``concurrency`` POSTs at once. The events that
        were not delivered are reported with DeliveryIncomplete, raised from the first failure (its
        HTTP status is in the message), so the core sends again only those and can say why."""
        size = self.batch_max
        chunks = [events[i : i + size] for i in range(0, len(events), size)]
        if len(chunks) == 1 or self.concurrency == 1:
            results = [self._deliver_chunk(chunk) for chunk in chunks]
        else:
            if self._executor is None or self._pid != os.getpid():
                self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="audit-webhook")
                self._pid = os.getpid()
            results = list(self._executor.map(self._deliver_chunk, chunks))
        undelivered = [e for left, _, _ in results for e in left]
        refused = [e for _, bad, _ in results for e in bad]
        if undelivered:
            first = next((error for _, _, error in results if error is not None), None)
            raise DeliveryIncomplete(undelivered, refused) from first or RuntimeError(
                f"webhook: {len(undelivered)} of {len(events)} events not delivered"
            )

    def close(self) -> None:
        if self._executor is not None and self._pid == os.getpid():
            self._executor.shutdown(wait=True)
        self._pool.clear()


@hookimpl
def dtmf_audit_sink(name: str, config: Mapping[str, Any]) -> WebhookSink | None:
    if name != "webhook":
        return None
    url = config.get("AUDIT_WEBHOOK_URL")
    if not url or not str(url).startswith(("http://", "https://")):
        raise ConfigError("AUDIT_WEBHOOK_URL: an http:// or https:// URL is required when AUDIT_SINKS includes webhook")
    ca_bundle = config.get("AUDIT_WEBHOOK_CA_BUNDLE")
    try:
        return WebhookSink(
            url,
            float(config["AUDIT_WEBHOOK_TIMEOUT_S"]),
            config.get("AUDIT_WEBHOOK_SECRET"),
            int(config.get("AUDIT_WEBHOOK_CONCURRENCY", 8)),
            int(config.get("AUDIT_WEBHOOK_BATCH_MAX", 1)),
            ca_bundle,
        )
    except OSError as exc:  # ssl.SSLError included: a file that is not PEM
        raise ConfigError(f"AUDIT_WEBHOOK_CA_BUNDLE: cannot load {ca_bundle!r} ({type(exc).__name__})") from None
