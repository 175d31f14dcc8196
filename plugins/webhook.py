"""Audit sink ``webhook``: one POST per event to AUDIT_WEBHOOK_URL, optionally signed."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import urllib3

from dtmf_service import hookimpl
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

    def __init__(self, url: str, timeout_s: float, secret: str | None) -> None:
        self.url = url
        self.secret = secret
        self._pool = urllib3.PoolManager(maxsize=4, retries=False, timeout=urllib3.Timeout(total=timeout_s))

    def deliver(self, event: dict[str, Any]) -> None:
        body = json.dumps(event, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "dtmf-gateway-audit"}
        if self.secret:
            headers["X-DTMF-Signature"] = signature(self.secret, int(time.time()), body)
        response = self._pool.urlopen("POST", self.url, body=body, headers=headers, retries=False, redirect=False)
        if not 200 <= response.status < 300:
            raise RuntimeError(f"webhook answered {response.status}")

    def close(self) -> None:
        self._pool.clear()


@hookimpl
def dtmf_audit_sink(name: str, config: Mapping[str, Any]) -> WebhookSink | None:
    if name != "webhook":
        return None
    url = config.get("AUDIT_WEBHOOK_URL")
    if not url or not str(url).startswith(("http://", "https://")):
        raise ConfigError("AUDIT_WEBHOOK_URL: an http:// or https:// URL is required when AUDIT_SINKS includes webhook")
    return WebhookSink(url, float(config["AUDIT_WEBHOOK_TIMEOUT_S"]), config.get("AUDIT_WEBHOOK_SECRET"))
