"""Why a delivery failed, in words an operator can act on and safe to print anywhere (CONTRACT.md
section 7, *rev 3*): the exception's type and message, digits, secrets and tokens scrubbed, cut to
200 characters. It goes into the warning log line, the dead letter and ``audit dead-letters``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

MAX_CHARS = 200
_HIDDEN = "***"
# A receiver's message may echo what it was sent: keypad digits (3 or more: a CVV), credentials.
_HTTP_STATUS = re.compile(r"HTTP \d{3}\b")
_DIGITS = re.compile(r"[0-9*#]{3,}")
_CREDENTIAL = re.compile(
    r"(?i)\b(bearer|basic|token|secret|password|passwd|pwd|api[_-]?key|authorization)(\s*[:=]\s*|\s+)[^\s,;)]+"
)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
_QUERY = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s?#]*)\?[^\s#]*")


class FailureReasons:
    """Scrubs failure messages; built once per delivery engine from the configuration's secrets."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret that contains another is hidden whole.
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> FailureReasons:
        from dtmf_service import config as cfg

        values: list[str] = []
        for name, key in cfg.KEYS.items():
            value = config.get(name)
            if key.kind in ("secret", "secret_list") and value:
                values.extend(value if isinstance(value, list) else [str(value)])
        return cls(values)

    def describe(self, exc: BaseException) -> str:
        """``<ExceptionType>: <message>``, scrubbed and cut to MAX_CHARS."""
        message = " ".join(str(exc).split())  # one line: no caller byte can break the log
        text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        return self.scrub(text)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, _HIDDEN)
        text = _USERINFO.sub(rf"\1{_HIDDEN}@", text)
        text = _QUERY.sub(rf"\1?{_HIDDEN}", text)
        text = _CREDENTIAL.sub(rf"\1\2{_HIDDEN}", text)
        statuses = _HTTP_STATUS.findall(text)
        text = _DIGITS.sub(_HIDDEN, _HTTP_STATUS.sub("HTTP \0", text))
        for status in statuses:  # the HTTP status stays: it tells credentials from a poison event
            text = text.replace("HTTP \0", status, 1)
        return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 1] + "…"
