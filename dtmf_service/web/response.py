"""The gateway's responses: a body already in memory goes to the server as a list.

werkzeug hands the server an iterator to step through and close (``ClosingIterator``) even for a
body it holds whole. Under granian every step and the close are calls back into Python from its
own threads, each a GIL acquisition against the request threads; given a list, granian sends the
body in one piece (``response_bytes``) without coming back. WSGI allows a list, and nothing is
skipped by it: a list of bytes has nothing to close. A response that streams, passes its body
through, or has close callbacks (``call_on_close``) keeps werkzeug's iterator.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flask import Response as FlaskResponse


class Response(FlaskResponse):
    def get_app_iter(self, environ: dict[str, Any]) -> Iterable[bytes]:
        if self.direct_passthrough or self._on_close or not isinstance(self.response, list):
            return super().get_app_iter(environ)
        status = self.status_code
        if environ["REQUEST_METHOD"] == "HEAD" or 100 <= status < 200 or status in (204, 304):
            return []  # werkzeug's rule: no body for these
        return list(self.iter_encoded())
