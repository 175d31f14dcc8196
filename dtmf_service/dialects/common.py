"""Pieces both dialects share."""

from __future__ import annotations

import requests

from ..auth import TokenError


def request_token(
    session: requests.Session,
    url: str,
    form: dict[str, str],
    headers: dict[str, str],
    timeout: tuple[float, float],
) -> tuple[str, float]:
    """POST a token form and read the answer; TokenError on any failure.

    requests URL-encodes every value of a dict body: '&', '=', '+' in a secret arrive intact.
    """
    try:
        response = session.post(url, data=form, headers={"Accept": "application/json", **headers}, timeout=timeout)
    except requests.RequestException as exc:
        raise TokenError(f"could not reach the CXone token endpoint ({type(exc).__name__})") from None
    return read_token_response(response)


def read_token_response(response: requests.Response) -> tuple[str, float]:
    """``(access_token, expires_in)`` from a token endpoint's answer, or TokenError.

    The body is never quoted in the error: token endpoints echo client ids and worse.
    """
    if response.status_code in (400, 401, 403):
        raise TokenError(f"authentication with CXone failed: token endpoint answered {response.status_code}")
    if not 200 <= response.status_code < 300:
        raise TokenError(f"CXone token endpoint answered {response.status_code}")
    try:
        payload = response.json()
        token = payload["access_token"]
        expires_in = float(payload.get("expires_in", 3600))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TokenError("CXone token endpoint answered without a usable access_token") from None
    if not isinstance(token, str) or not token or expires_in != expires_in:
        raise TokenError("CXone token endpoint answered without a usable access_token")
    return token, max(expires_in, 0.0)
