"""Deadlines on blocking sockets: one watchdog thread per process shuts a socket down when its time is up.

A socket timeout bounds each ``recv``, not a whole exchange: a peer that sends one byte
just inside every timeout keeps a thread forever. The watchdog bounds the exchange as a
whole. When a deadline passes it calls ``shutdown()`` on the socket, which wakes the
blocked reader with end-of-file; the code that owns the socket sees a short read and
turns it into its own error. Used for CXone calls (CONTRACT.md section 3, one deadline
per request) and for reading callers' requests (slow clients).
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time

_TICK_S = 0.05


class Alarm:
    """One armed deadline; ``fired`` tells the owner its socket was cut."""

    __slots__ = ("deadline", "sock", "how", "fired", "cancelled")

    def __init__(self, deadline: float, sock: socket.socket, how: int) -> None:
        self.deadline = deadline
        self.sock = sock
        self.how = how
        self.fired = False
        self.cancelled = False


class Watchdog:
    """A heap of alarms and one thread that sleeps until the earliest; restarted after fork."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()
        self._pid: int | None = None

    def arm(self, sock: socket.socket, timeout_s: float, how: int = socket.SHUT_RDWR) -> Alarm:
        """Cut ``sock`` (``shutdown(how)``) ``timeout_s`` from now unless cancelled first."""
        alarm = Alarm(time.monotonic() + max(timeout_s, 0.0), sock, how)
        with self._cond:
            self._ensure_thread()
            heapq.heappush(self._heap, (alarm.deadline, next(self._order), alarm))
            if self._heap[0][2] is alarm:
                self._cond.notify()  # the earliest now: the watchdog recomputes how long to sleep
        return alarm

    def cancel(self, alarm: Alarm | None) -> bool:
        """Disarm; True when the alarm had not fired. Cancelled alarms are dropped lazily."""
        if alarm is None:
            return True
        with self._cond:
            alarm.cancelled = True
            return not alarm.fired

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid():
            return
        # After fork the parent's thread does not exist here, and its alarms name the parent's sockets.
        self._pid = os.getpid()
        self._heap = []
        threading.Thread(target=self._run, name="deadline-watchdog", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)  # most alarms are cancelled long before they are due
                    if self._heap and self._heap[0][0] <= time.monotonic():
                        break
                    # At most every _TICK_S: waking for each cancelled alarm as it came due would cost
                    # a GIL hand-off per request; a deadline fires up to _TICK_S late instead.
                    wait = max(self._heap[0][0] - time.monotonic(), _TICK_S) if self._heap else None
                    self._cond.wait(wait)
                _, _, alarm = heapq.heappop(self._heap)
                alarm.fired = True
            try:
                # The plain socket method, also for an SSLSocket: its own shutdown() would drop the
                # TLS object under the reading thread's feet.
                socket.socket.shutdown(alarm.sock, alarm.how)
            except OSError:
                pass  # already closed: nothing left to cut


WATCHDOG = Watchdog()


# -- reading a caller's request ------------------------------------------------------------------
# gunicorn's gthread worker waits a bounded time for a request's first byte, but none at all
# after it: one byte then silence holds a thread for ever, and a few such connections starve
# the worker. The worker arms an alarm when it starts reading a request; the application
# disarms it once the body is in (or at once for a request without one). An alarm that fires
# shuts the socket for reading, so the blocked read sees end-of-file.
_request = threading.local()


def guard_request_read(sock: socket.socket, timeout_s: float) -> None:
    """Arm this thread's request-read alarm on the caller's socket."""
    _request.alarm = WATCHDOG.arm(sock, timeout_s, socket.SHUT_RD)


def request_read_done() -> bool:
    """Disarm this thread's request-read alarm; False when it had already cut the socket."""
    alarm = getattr(_request, "alarm", None)
    _request.alarm = None
    return WATCHDOG.cancel(alarm)
