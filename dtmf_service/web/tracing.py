"""W3C Trace Context (``traceparent``): follow one key press from the caller through CXone to the audit record.

A caller's valid ``traceparent`` is continued; an absent or malformed one starts a new trace. The
trace id goes into the audit event (``trace_id``), the log lines and the access log; each call the
gateway makes (the DTMF POST, a webhook delivery of one event) carries a ``traceparent`` of its own
span in the same trace. No tracing SDK is needed for that.
"""

from __future__ import annotations

import re

from dtmf_service.ids import hex_id

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def trace_from_header(header: str | None) -> tuple[str, str]:
    """(trace id, flags) from a caller's traceparent, or a new trace when it is absent or invalid."""
    match = _TRACEPARENT.match((header or "").strip().lower())
    if match:
        version, trace_id, parent_id, flags = match.groups()
        # Version ff is invalid; all-zero ids are invalid (W3C Trace Context, section 3.2).
        if version != "ff" and trace_id != "0" * 32 and parent_id != "0" * 16:
            return trace_id, flags
    return hex_id(16), "01"


def child_traceparent(trace_id: str, flags: str = "01") -> str:
    """A traceparent for a call this service makes: same trace, a new span id."""
    return f"00-{trace_id}-{hex_id(8)}-{flags}"
