"""gunicorn's gthread worker with a bound on how long reading a request may take (slow clients).

``worker_class = "dtmf_service.worker.ThreadWorker"`` in gunicorn.conf.py. The whole request,
headers and body, must arrive within DTMF_REQUEST_READ_TIMEOUT_S (default 10) of its first
byte; gunicorn alone bounds only the wait for that first byte. nginx's client_header_timeout
and client_body_timeout do the same in front (defence in depth: gunicorn may be exposed).
"""

from __future__ import annotations

import os
from typing import Any

from gunicorn.workers import gthread

from dtmf_service.deadlines import guard_request_read, request_read_done

DEFAULT_REQUEST_READ_TIMEOUT_S = 10.0


class ThreadWorker(gthread.ThreadWorker):
    def init_process(self) -> None:
        self.request_read_timeout_s = float(
            os.environ.get("DTMF_REQUEST_READ_TIMEOUT_S") or DEFAULT_REQUEST_READ_TIMEOUT_S
        )
        super().init_process()

    def handle(self, conn: Any) -> Any:
        guard_request_read(conn.sock, self.request_read_timeout_s)
        try:
            return super().handle(conn)
        finally:
            request_read_done()
