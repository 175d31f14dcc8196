"""``dtmf-gateway serve``: the service under the server DTMF_SERVER names.

- ``gunicorn`` (the default): exactly ``gunicorn -c gunicorn.conf.py app:app``; this process
  becomes gunicorn's master (exec), so systemd's signals reach it directly.
- ``granian`` (``pip install 'dtmf-gateway[granian]'``): granian's native HTTP stack runs the same
  WSGI application; this process is granian's master and drives the same lifecycle
  (lifecycle.py) through granian's start, reload and shutdown hooks.

Both read DTMF_BIND (``host:port`` or ``unix:/path``, default 127.0.0.1:8080), DTMF_WORKERS (one
per core), DTMF_THREADS (64 request threads per worker) and DTMF_PIDFILE. README ("Servers")
states what differs between the two.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dtmf_service import _configure_logging
from dtmf_service.wiring.lifecycle import LifecycleError, master_lifecycle, request_timeout_s

SERVERS = ("gunicorn", "granian")
_GRANIAN: Any = None  # granian's server object in the master; each forked worker holds a copy
TARGET = "dtmf_service.wiring.wsgi:app"
CONF = Path(__file__).with_name("gunicorn_conf.py")


def settings() -> dict[str, str | int]:
    """What DTMF_SERVER, DTMF_BIND, DTMF_WORKERS and DTMF_THREADS say, checked."""
    server = os.environ.get("DTMF_SERVER") or "gunicorn"
    if server not in SERVERS:
        raise ValueError(f"DTMF_SERVER: expected one of {', '.join(SERVERS)}, got {server!r}")
    values: dict[str, str | int] = {"server": server, "bind": os.environ.get("DTMF_BIND") or "127.0.0.1:8080"}
    for name, default in (("WORKERS", os.cpu_count() or 1), ("THREADS", 64)):
        raw = os.environ.get(f"DTMF_{name}") or str(default)
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"DTMF_{name}: expected a whole number of at least 1, got {raw!r}")
        values[name.lower()] = int(raw)
    return values


def serve() -> int:
    try:
        chosen = settings()
    except ValueError as exc:
        print(f"dtmf-gateway serve: {exc}", file=sys.stderr)
        return 2
    if chosen["server"] == "gunicorn":
        _exec_gunicorn()
    return run_granian(str(chosen["bind"]), int(chosen["workers"]), int(chosen["threads"]))


def _exec_gunicorn() -> None:
    # gunicorn reads DTMF_BIND, DTMF_WORKERS and DTMF_THREADS itself (gunicorn_conf.py).
    argv = [sys.executable, "-m", "gunicorn", "-c", str(CONF), TARGET]
    os.execv(sys.executable, argv)  # noqa: S606 - argv is ours, no shell involved


def _address(bind: str) -> dict[str, object]:
    if bind.startswith("unix:"):
        return {"uds": Path(bind[len("unix:") :])}
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"DTMF_BIND: expected host:port or unix:/path, got {bind!r}")
    return {"address": host.strip("[]") or "127.0.0.1", "port": int(port)}


def run_granian(bind: str, workers: int, threads: int) -> int:
    try:
        from granian.constants import Interfaces
        from granian.http import HTTP1Settings
        from granian.log import LogLevels
        from granian.server import Server
    except ImportError:
        print("dtmf-gateway serve: DTMF_SERVER=granian needs granian: pip install 'dtmf-gateway[granian]'",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        address = _address(bind)
    except ValueError as exc:
        print(f"dtmf-gateway serve: {exc}", file=sys.stderr)
        return 2
    _configure_logging("INFO")  # the app's own log format, for the master's lines too
    log = logging.getLogger("dtmf_service")
    lifecycle = master_lifecycle(log)
    try:
        lifecycle.starting()  # before granian binds or forks anything
    except LifecycleError as exc:
        print(f"dtmf-gateway: configuration error: {exc}", file=sys.stderr, flush=True)
        return 4
    timeout_s = request_timeout_s()
    header_s = float(os.environ.get("DTMF_REQUEST_READ_TIMEOUT_S") or 10)
    server = _granian_server(Server)(
        TARGET,
        interface=Interfaces.WSGI,
        workers=workers,
        blocking_threads=threads,
        # gunicorn's own defaults, as far as granian has them: a dead worker is replaced, a stopping
        # worker gets the longest request's time to finish, a client its header-read bound.
        respawn_failed_workers=True,
        workers_kill_timeout=timeout_s,
        http1_settings=HTTP1Settings(header_read_timeout=int(header_s * 1000)),
        log_access=False,  # the workers write the JSON access log themselves (wsgi.py)
        log_level=LogLevels(os.environ.get("DTMF_GUNICORN_LOG_LEVEL", "info")),
        pid_file=Path(os.environ["DTMF_PIDFILE"]) if os.environ.get("DTMF_PIDFILE") else None,
        **address,
    )
    global _GRANIAN
    _GRANIAN = server
    server.on_reload(lifecycle.reloading)
    server.on_shutdown(lifecycle.stopping)
    if os.environ.get("NOTIFY_SOCKET"):
        # The unit is Type=notify (gunicorn tells systemd itself); granian does not: say READY=1
        # once a worker has loaded the app.
        threading.Thread(target=_notify_when_serving, daemon=True).start()
    server.serve()
    return 0


def _granian_server(base: type) -> type:
    """granian's master, with gunicorn's rule for dead workers (granian 2.8's own: a worker slot that
    dies again within 5.5 s of its respawn, or of a reload, stops the whole server, exit 1). A worker
    killed under load (OOM killer, an operator's kill -9) must cost its requests, not the service.
    One exception, as gunicorn's "Worker failed to boot": a worker that exited 4 refused its
    configuration, which every new worker would refuse too, so the server stops."""

    class GatewayGranian(base):
        def _respawn_workers(self, workers: list[int], spawn_target: Any, target_loader: Any, delay: float = 0) -> Any:
            refused = [idx for idx in workers if idx < len(self.wrks) and self.wrks[idx].inner.exitcode == 4]
            if refused:
                logging.getLogger("dtmf_service").error(
                    "dtmf-gateway: a worker refused the configuration (exit 4): stopping the server"
                )
                self.interrupt_children.extend(refused)
                self.interrupt_signal = True
                self.main_loop_interrupt.set()
                return None
            gone = [self.wrks[idx].inner.pid for idx in workers if idx < len(self.wrks)]
            result = super()._respawn_workers(workers, spawn_target, target_loader, delay)
            self.respawned_wrks.clear()  # no crash-loop exit: see the function's text
            for pid in gone:  # dead or stopped by now: gunicorn's child_exit
                master_lifecycle().worker_exited(pid)
            return result

    return GatewayGranian


def guard_granian_worker() -> None:
    """Two gaps of granian 2.8's workers, closed from inside the worker (wsgi.py calls this while the
    app loads, in the worker's main thread):

    - A SIGTERM that arrives while the worker boots is lost (the handler it inherited from the master
      flags the master's copy of the server; its own is installed only after the app has loaded), so
      the worker never stops and the master waits out its kill timeout. Until granian's handler is
      in place, a stop is remembered here and sent again once it is.
    - A worker whose master was killed (SIGKILL) keeps serving on the shared port for ever. gunicorn's
      workers notice the master is gone and stop; so do these: a graceful stop, at most a second later.
    """
    parent = int(os.environ.get("DTMF_LIFECYCLE") or os.getppid())  # the master, even if already gone
    requested = threading.Event()

    def during_boot(signum: int, frame: Any) -> None:
        requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, during_boot)

    def watch() -> None:
        while signal.getsignal(signal.SIGTERM) is during_boot:
            time.sleep(0.05)
        if requested.is_set() or getattr(_GRANIAN, "interrupt_signal", False):
            os.kill(os.getpid(), signal.SIGTERM)
            return
        while os.getppid() == parent:
            time.sleep(1.0)
        logging.getLogger("dtmf_service").error("dtmf-gateway: worker %d: the master is gone; stopping", os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="dtmf-granian-guard", daemon=True).start()


READY_MARK = "ready"  # in DTMF_METRICS_DIR: a granian worker has loaded the app (wsgi.py)


def mark_worker_ready() -> None:
    """A granian worker has the app loaded: the master may tell systemd (its own probe of the port
    could land on a listening socket no worker accepts from)."""
    directory = os.environ.get("DTMF_METRICS_DIR")
    if directory and os.environ.get("NOTIFY_SOCKET"):
        with open(os.path.join(directory, READY_MARK), "w", encoding="ascii") as mark:
            mark.write(str(os.getpid()))


def _notify_when_serving(timeout_s: float = 120.0) -> None:
    mark = os.path.join(os.environ.get("DTMF_METRICS_DIR", ""), READY_MARK)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(mark):
            sd_notify(f"READY=1\nMAINPID={os.getpid()}")
            return
        time.sleep(0.1)


def sd_notify(message: str) -> None:
    """systemd's notification protocol: one datagram to NOTIFY_SOCKET (an abstract name when it
    starts with @)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)
