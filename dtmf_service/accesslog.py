"""An access log whose every line is valid JSON (CONTRACT.md section 9, *rev 2*), under either server:
gunicorn's logger class (``JsonLogger``), and for granian, whose own access line is plain text with
the caller's characters unescaped, a WSGI wrapper writing the same lines (``JsonAccessLog``).

gunicorn fills ``access_log_format`` by %-substitution and escapes only ``"``: a ``%0A`` in the
path writes a second, forged line, and a trailing backslash in a header breaks the JSON.
Here each line is ``json.dumps`` of the fields, so every character a caller sends is escaped.
The query string is never logged (it is not ours, and a caller could put digits in it).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from gunicorn.glogging import Logger


def access_record(resp: Any, environ: dict[str, Any], request_time: dt.timedelta) -> dict[str, Any]:
    """The fields of one access-log line."""
    status = resp.status
    if isinstance(status, str):
        status = status.split(None, 1)[0]
    headers = dict((k.lower(), v) for k, v in (resp.headers or []))
    return {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "remote": environ.get("REMOTE_ADDR"),
        "request_id": headers.get("x-request-id"),
        "method": environ.get("REQUEST_METHOD"),
        "path": environ.get("PATH_INFO"),
        "status": int(status) if str(status).isdigit() else status,
        "bytes": getattr(resp, "sent", None),
        "duration_ms": round(request_time.total_seconds() * 1000, 3),
        "user_agent": environ.get("HTTP_USER_AGENT"),
        "trace_id": environ.get("dtmf.trace_id"),
    }


class JsonLogger(Logger):
    """``logger_class = "dtmf_service.accesslog.JsonLogger"``."""

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: dt.timedelta) -> None:
        if not self.access_log_enabled:
            return
        try:
            line = json.dumps(access_record(resp, environ, request_time), separators=(",", ":"))
            self.access_log.info("%s", line)
        except Exception:  # noqa: BLE001 - a log line must never fail a request
            self.error("access log: could not write a line")


class _Answered:
    """What ``access_record`` reads of a response, as a WSGI wrapper sees it."""

    def __init__(self) -> None:
        self.status: str = ""
        self.headers: list[tuple[str, str]] = []
        self.sent: int | None = None


class JsonAccessLog:
    """``app.wsgi_app = JsonAccessLog(app.wsgi_app, target)``: one JSON line per request to ``target``
    (a path, appended with one write per line, so the workers' lines never interleave; ``-`` for
    stderr). The line is written when the application has answered, before the body is sent."""

    def __init__(self, app: Callable[..., Iterable[bytes]], target: str) -> None:
        self.app = app
        self.fd = 2 if target == "-" else os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.perf_counter()
        answered = _Answered()

        def recording(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            answered.status, answered.headers = status, headers
            return start_response(status, headers, exc_info)

        result = self.app(environ, recording)
        try:
            length = next((v for k, v in answered.headers if k.lower() == "content-length"), None)
            answered.sent = int(length) if length is not None and length.isdigit() else None
            elapsed = dt.timedelta(seconds=time.perf_counter() - started)
            line = json.dumps(access_record(answered, environ, elapsed), separators=(",", ":")) + "\n"
            os.write(self.fd, line.encode())
        except Exception:  # noqa: BLE001, S110 - a log line must never fail a request
            pass
        return result
