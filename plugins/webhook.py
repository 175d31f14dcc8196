"""Audit sink ``webhook``: one POST per event to AUDIT_WEBHOOK_URL, optionally signed."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import requests

from dtmf_service import hookimpl
from dtmf_service.config import ConfigError


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`` (X-DTMF-Signature)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class WebhookSink:
    """Any answer but 2xx, and any transport error, is a failure: the core keeps the event."""

    def __init__(self, url: str, timeout_s: float, secret: str | None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.secret = secret
        self.session = requests.Session()
        self.session.trust_env = False

    def deliver(self, event: dict[str, Any]) -> None:
        body = json.dumps(event, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "dtmf-gateway-audit"}
        if self.secret:
            headers["X-DTMF-Signature"] = signature(self.secret, int(time.time()), body)
        response = self.session.post(self.url, data=body, headers=headers, timeout=self.timeout_s)
        response.close()
        if not 200 <= response.status_code < 300:
            raise RuntimeError(f"webhook answered {response.status_code}")

    def close(self) -> None:
        self.session.close()


@hookimpl
def dtmf_audit_sink(name: str, config: Mapping[str, Any]) -> WebhookSink | None:
    if name != "webhook":
        return None
    url = config.get("AUDIT_WEBHOOK_URL")
    if not url or not str(url).startswith(("http://", "https://")):
        raise ConfigError("AUDIT_WEBHOOK_URL: an http:// or https:// URL is required when AUDIT_SINKS includes webhook")
    return WebhookSink(url, float(config["AUDIT_WEBHOOK_TIMEOUT_S"]), config.get("AUDIT_WEBHOOK_SECRET"))
