"""Upstream dialects: the wire format of one CXone API each.

A dialect knows how to get a token and how to shape the DTMF request; the
retry loop and budget are shared (dtmf_service.cxone.client).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from dtmf_service.cxone.transport import Transport


class Dialect(Protocol):
    """What the CXone client needs from an upstream dialect."""

    def fetch_token(self, timeout_s: float) -> tuple[str, float]:
        """Fetch a new access token: ``(token, expires_in_seconds)``; raise TokenError."""

    def dtmf_request(
        self, interaction_id: str, digits: str, timeout_ms: int, correlation_id: str, timeout_s: float
    ) -> tuple[str, bytes, dict[str, str]]:
        """The DTMF POST for one submission: ``(url, body, extra headers)``; raise DiscoveryError."""

    def retry_budget_s(self, timeout_ms: int) -> float:
        """How long all attempts of one submission may take, waits included."""


def make_dialect(config: Mapping[str, Any], transport: Transport) -> Dialect:
    """The dialect named by ``CXONE_API``; every call it makes goes through ``transport``."""
    if config["CXONE_API"] == "agent":
        from dtmf_service.cxone.dialects.agent import AgentDialect

        return AgentDialect(config, transport)
    from dtmf_service.cxone.dialects.tutorial import TutorialDialect

    return TutorialDialect(config, transport)
