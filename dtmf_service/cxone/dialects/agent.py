"""The real CXone Agent API (../shared/CXONE-AGENT-API.md), built from public sources.

Token: HTTP Basic client authentication plus a password grant carrying an
access key. Endpoints are discovered from the CXone well-known documents once
per process (single flight; a failure is retried on the next request).
DTMF: ``POST {api}/InContactAPI/services/v{N}/agent-sessions/{session}/send-dtmf``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from dtmf_service.config import ConfigError
from dtmf_service.cxone.dialects.common import get_json, request_token, trusted_endpoint
from dtmf_service.cxone.tokens import DiscoveryError, EndpointCache
from dtmf_service.cxone.transport import Transport

_FOREVER_S = 10.0**9


def check_config(config: Mapping[str, Any]) -> None:
    """Stop start-up, naming every missing key of this dialect."""
    missing = [
        key
        for key in ("CXONE_CLIENT_ID", "CXONE_CLIENT_SECRET", "CXONE_ACCESS_KEY_ID", "CXONE_ACCESS_KEY_SECRET")
        if not config.get(key)
    ]
    if not config.get("CXONE_API_ENDPOINT") and not config.get("CXONE_TENANT_ID"):
        missing.append("CXONE_API_ENDPOINT or CXONE_TENANT_ID")
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required when CXONE_API=agent")
    for key in ("CXONE_AUTH_BASE", "CXONE_API_ENDPOINT", "CXONE_TOKEN_URL"):
        value = config.get(key)
        if value and not str(value).startswith(("http://", "https://")):
            raise ConfigError(f"{key}: must be an http:// or https:// URL")


def basic_authorization(client_id: str, client_secret: str) -> str:
    """``Basic base64(id:secret)``, UTF-8 encoded (a ':' in the secret is fine: only the first splits)."""
    return "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode("ascii")


class AgentDialect:
    """Agent API wire format, with discovery of the token endpoint and the regional API host."""

    def __init__(self, config: Mapping[str, Any], transport: Transport) -> None:
        self._transport = transport
        self._auth_base = str(config["CXONE_AUTH_BASE"]).rstrip("/")
        self._tenant = config.get("CXONE_TENANT_ID")
        self._version = config["CXONE_AGENT_API_VERSION"]
        self._tone_ms = int(config["CXONE_TONE_DURATION_MS"])
        self._spacing_ms = int(config["CXONE_TONE_SPACING_MS"])
        self._budget_s = float(config["CXONE_RETRY_BUDGET_S"])
        self._authorization = basic_authorization(config["CXONE_CLIENT_ID"], config["CXONE_CLIENT_SECRET"])
        self._form = {
            "grant_type": "password",
            "username": config["CXONE_ACCESS_KEY_ID"],
            "password": config["CXONE_ACCESS_KEY_SECRET"],
        }
        token_url = config.get("CXONE_TOKEN_URL")
        api_endpoint = config.get("CXONE_API_ENDPOINT")
        # Discovered values are cached like tokens: one fetch at a time, failures shared, retried next request.
        self.token_endpoint = EndpointCache(
            (lambda _t: (token_url, _FOREVER_S)) if token_url else self._discover_token_endpoint, margin_s=0
        )
        self.api_endpoint = EndpointCache(
            (lambda _t: (api_endpoint.rstrip("/"), _FOREVER_S)) if api_endpoint else self._discover_api_endpoint,
            margin_s=0,
        )

    def _discover_token_endpoint(self, timeout_s: float) -> tuple[str, float]:
        url = f"{self._auth_base}/.well-known/openid-configuration"
        endpoint = get_json(self._transport, url, "token endpoint", timeout_s).get("token_endpoint")
        if not isinstance(endpoint, str) or not trusted_endpoint(endpoint, self._auth_base):
            raise DiscoveryError("CXone openid-configuration has no usable https token_endpoint")
        return endpoint, _FOREVER_S

    def _discover_api_endpoint(self, timeout_s: float) -> tuple[str, float]:
        url = f"{self._auth_base}/.well-known/cxone-configuration?tenantId={quote(str(self._tenant), safe='')}"
        endpoint = get_json(self._transport, url, "API endpoint", timeout_s).get("api_endpoint")
        if not isinstance(endpoint, str) or not trusted_endpoint(endpoint, self._auth_base):
            raise DiscoveryError("CXone cxone-configuration has no usable https api_endpoint")
        return endpoint.rstrip("/"), _FOREVER_S

    def fetch_token(self, timeout_s: float) -> tuple[str, float]:
        started = time.monotonic()
        url = self.token_endpoint.get(timeout_s)
        left = timeout_s - (time.monotonic() - started)
        return request_token(self._transport, url, self._form, {"Authorization": self._authorization}, left)

    def dtmf_request(
        self, interaction_id: str, digits: str, timeout_ms: int, correlation_id: str, timeout_s: float
    ) -> tuple[str, bytes, dict[str, str]]:
        base = self.api_endpoint.get(timeout_s)
        session = quote(interaction_id, safe="")
        url = f"{base}/InContactAPI/services/v{self._version}/agent-sessions/{session}/send-dtmf"
        body = json.dumps(
            {"dtmfSequence": digits, "toneDurationMS": self._tone_ms, "toneSpacingMS": self._spacing_ms},
            separators=(",", ":"),
        ).encode()
        return url, body, {"CorrelationId": correlation_id}

    def retry_budget_s(self, timeout_ms: int) -> float:
        # The caller's collection timeout bounds the whole submission in this dialect.
        return min(self._budget_s, timeout_ms / 1000.0)
