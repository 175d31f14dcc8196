"""gunicorn's gthread worker with a bound on how long reading a request may take (slow clients),
and a count of the requests it is running, so that its exit waits for them.

``worker_class = "dtmf_service.worker.ThreadWorker"`` in gunicorn.conf.py. The whole request,
headers and body, must arrive within DTMF_REQUEST_READ_TIMEOUT_S (default 10) of its first
byte; gunicorn alone bounds only the wait for that first byte. nginx's client_header_timeout
and client_body_timeout do the same in front (defence in depth: gunicorn may be exposed).

Every way a worker stops (CONTRACT.md section 7 rev 3) runs gunicorn's ``worker_exit`` hook in the
main thread while request threads may still run: a quick stop (SIGQUIT, SIGINT) or an abort
(SIGABRT, the timeout kill) exits the main loop at once, and the request threads carry on until
they have answered. ``wait_for_requests`` lets the hook close the audit outbox only after the
last of them has written its event.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from gunicorn.workers import gthread

from dtmf_service.deadlines import guard_request_read, request_read_done

DEFAULT_REQUEST_READ_TIMEOUT_S = 10.0


class ThreadWorker(gthread.ThreadWorker):
    def init_process(self) -> None:
        self.request_read_timeout_s = float(
            os.environ.get("DTMF_REQUEST_READ_TIMEOUT_S") or DEFAULT_REQUEST_READ_TIMEOUT_S
        )
        self._running = 0
        self._idle = threading.Condition()
        super().init_process()

    def handle(self, conn: Any) -> Any:
        guard_request_read(conn.sock, self.request_read_timeout_s)
        try:
            return super().handle(conn)
        finally:
            request_read_done()

    def handle_request(self, req: Any, conn: Any) -> Any:
        with self._idle:
            self._running += 1
        try:
            return super().handle_request(req, conn)
        finally:
            with self._idle:
                self._running -= 1
                if not self._running:
                    self._idle.notify_all()

    def running_requests(self) -> int:
        """Requests of this worker inside the application now."""
        with self._idle:
            return self._running

    def wait_for_requests(self, timeout_s: float) -> bool:
        """Wait until no request of this worker is inside the application; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True
