"""Audit sink ``webhook``: one POST per event to AUDIT_WEBHOOK_URL, optionally signed."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import urllib3

from dtmf_service import DeliveryIncomplete, hookimpl
from dtmf_service.config import ConfigError


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`` (X-DTMF-Signature)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class WebhookSink:
    """Any answer but 2xx, and any transport error, is a failure: the core keeps the event.

    urllib3's keep-alive pool directly (requests' own transport): a POST per event at full load
    makes requests' per-call machinery the largest cost of auditing.
    """

    def __init__(self, url: str, timeout_s: float, secret: str | None, concurrency: int = 8) -> None:
        self.url = url
        self.secret = secret
        self.concurrency = concurrency
        self._pool = urllib3.PoolManager(maxsize=concurrency, retries=False, timeout=urllib3.Timeout(total=timeout_s))
        self._executor: ThreadPoolExecutor | None = None
        self._pid: int | None = None

    def deliver(self, event: dict[str, Any]) -> None:
        body = json.dumps(event, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "dtmf-gateway-audit"}
        if self.secret:
            headers["X-DTMF-Signature"] = signature(self.secret, int(time.time()), body)
        response = self._pool.urlopen("POST", self.url, body=body, headers=headers, retries=False, redirect=False)
        if not 200 <= response.status < 300:
            raise RuntimeError(f"webhook answered {response.status}")

    def deliver_many(self, events: list[dict[str, Any]]) -> None:
        """One POST per event, up to ``concurrency`` at once: a receiver answering in 50 ms still
        takes 160 events/s from each worker instead of 20. The events that failed are reported with
        DeliveryIncomplete, so the core sends again only those."""
        if len(events) == 1 or self.concurrency == 1:
            for done, event in enumerate(events):
                try:
                    self.deliver(event)
                except Exception as exc:
                    raise DeliveryIncomplete(events[done:]) from exc
            return
        if self._executor is None or self._pid != os.getpid():
            self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="audit-webhook")
            self._pid = os.getpid()
        futures = [self._executor.submit(self.deliver, event) for event in events]
        failed = [(event, future.exception()) for event, future in zip(events, futures, strict=True)]
        failed = [(event, error) for event, error in failed if error is not None]
        if failed:
            raise DeliveryIncomplete([event for event, _ in failed]) from failed[0][1]

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
    return WebhookSink(
        url,
        float(config["AUDIT_WEBHOOK_TIMEOUT_S"]),
        config.get("AUDIT_WEBHOOK_SECRET"),
        int(config.get("AUDIT_WEBHOOK_CONCURRENCY", 8)),
    )
