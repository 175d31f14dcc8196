"""gunicorn's logger with an access log whose every line is valid JSON (CONTRACT.md section 9, *rev 2*).

gunicorn fills ``access_log_format`` by %-substitution and escapes only ``"``: a ``%0A`` in the
path writes a second, forged line, and a trailing backslash in a header breaks the JSON.
Here each line is ``json.dumps`` of the fields, so every character a caller sends is escaped.
The query string is never logged (it is not ours, and a caller could put digits in it).
"""

from __future__ import annotations

import datetime as dt
import json
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
