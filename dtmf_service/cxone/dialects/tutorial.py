"""The tutorial's wire format (CONTRACT.md section 3): client-credentials token, /interactions/{id}/dtmf."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from dtmf_service.cxone.dialects.common import request_token
from dtmf_service.cxone.transport import Transport
from dtmf_service.jsontext import compact


class TutorialDialect:
    """``POST <base>/interactions/<id>/dtmf`` with ``{"digits", "timeout"}``."""

    def __init__(self, config: Mapping[str, Any], transport: Transport) -> None:
        self._transport = transport
        self._base_url = config["CXONE_BASE_URL"]
        self._token_url = config["CXONE_TOKEN_URL"]
        self._form = {
            "grant_type": "client_credentials",
            "client_id": config["CXONE_CLIENT_ID"] or "",
            "client_secret": config["CXONE_CLIENT_SECRET"] or "",
            "scope": config["CXONE_SCOPE"] or "",
        }
        self._budget_s = config["CXONE_RETRY_BUDGET_S"]

    def fetch_token(self, timeout_s: float) -> tuple[str, float]:
        return request_token(self._transport, self._token_url, self._form, {}, timeout_s)

    def dtmf_request(
        self, interaction_id: str, digits: str, timeout_ms: int, correlation_id: str, timeout_s: float
    ) -> tuple[str, bytes, dict[str, str]]:
        url = f"{self._base_url}/interactions/{quote(interaction_id, safe='')}/dtmf"
        body = compact({"digits": digits, "timeout": timeout_ms}).encode()
        return url, body, {}

    def retry_budget_s(self, timeout_ms: int) -> float:
        return self._budget_s
