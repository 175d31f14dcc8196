"""Pieces both dialects share."""

from __future__ import annotations

import ipaddress
import json
from typing import Any
from urllib.parse import urlencode, urlsplit

from dtmf_service.cxone.tokens import DiscoveryError, TokenError
from dtmf_service.cxone.transport import Answer, NotSent, Transport, Unknown


def request_token(
    transport: Transport, url: str, form: dict[str, str], headers: dict[str, str], timeout_s: float
) -> tuple[str, float]:
    """POST a token form and read the answer; TokenError on any failure.

    Every value is URL-encoded: '&', '=', '+' in a secret arrive intact (the tutorial's defect 1).
    """
    body = urlencode(form).encode()
    all_headers = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded", **headers}
    try:
        answer = transport.request("POST", url, body, all_headers, timeout_s)
    except (NotSent, Unknown) as exc:
        raise TokenError(f"could not reach the CXone token endpoint ({exc})") from None
    return read_token_response(answer)


def get_json(transport: Transport, url: str, what: str, timeout_s: float) -> dict[str, Any]:
    """GET a JSON object (discovery documents); DiscoveryError on any failure."""
    try:
        answer = transport.request("GET", url, None, {"Accept": "application/json"}, timeout_s)
    except (NotSent, Unknown) as exc:
        raise DiscoveryError(f"CXone {what} discovery failed ({exc})") from None
    if answer.status != 200:
        raise DiscoveryError(f"CXone {what} discovery answered {answer.status}")
    data = _json(answer)
    if not isinstance(data, dict):
        raise DiscoveryError(f"CXone {what} discovery answered without a JSON object")
    return data


def read_token_response(answer: Answer) -> tuple[str, float]:
    """``(access_token, expires_in)`` from a token endpoint's answer, or TokenError.

    The body is never quoted in the error: token endpoints echo client ids and worse.
    """
    if answer.status in (400, 401, 403):
        raise TokenError(f"authentication with CXone failed: token endpoint answered {answer.status}")
    if not 200 <= answer.status < 300:
        raise TokenError(f"CXone token endpoint answered {answer.status}")
    payload = _json(answer)
    try:
        token = payload["access_token"]
        expires_in = float(payload.get("expires_in", 3600))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TokenError("CXone token endpoint answered without a usable access_token") from None
    if not isinstance(token, str) or not token or expires_in != expires_in:
        raise TokenError("CXone token endpoint answered without a usable access_token")
    return token, max(expires_in, 0.0)


def _json(answer: Answer) -> Any:
    try:
        return json.loads(answer.text)
    except ValueError:
        return None


def is_loopback_http(url: str) -> bool:
    """True for ``http://`` URLs on a loopback host (the only place plain http is allowed: tests)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def trusted_endpoint(discovered: Any, configured_base: str) -> bool:
    """A discovered endpoint is followed only over https, or plain http when both it and the
    configured base are on loopback (CONTRACT.md section 3, *rev 2*): a tampered discovery
    document must not send tokens and digits over plain http."""
    if not isinstance(discovered, str):
        return False
    if urlsplit(discovered).scheme == "https" and urlsplit(discovered).hostname:
        return True
    return is_loopback_http(discovered) and is_loopback_http(configured_base)
