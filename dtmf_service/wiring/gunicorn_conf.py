"""gunicorn settings for the DTMF gateway (gunicorn.conf.py and `dtmf-gateway serve` load them).
Command-line flags override these.

DTMF_BIND (127.0.0.1:8080), DTMF_WORKERS (one per core), DTMF_THREADS (64).
gthread workers: a request spends most of its life waiting on CXone, so
threads, not processes, carry the concurrency (5 sync workers would cap the
service at 100 requests/s against a 50 ms upstream). 64 threads leave room for requests that
sleep out a 429 back-off without starving other callers; an idle thread costs little.
"""

import logging
import os

from dtmf_service.wiring.lifecycle import LifecycleError, master_lifecycle, request_timeout_s

_log = logging.getLogger("gunicorn.error")
# The same lifecycle granian's launcher drives (dtmf_service/wiring/lifecycle.py): the hooks below
# only call it. Every file the service creates is private (umask 077, CONTRACT.md section 8).
_lifecycle = master_lifecycle(_log)
os.umask(0o077)

bind = os.environ.get("DTMF_BIND", "127.0.0.1:8080")
# The master's pid, for README's `kill -HUP "$(cat $DTMF_PIDFILE)"`; the shipped unit's env file sets it.
pidfile = os.environ.get("DTMF_PIDFILE") or None
# gthread, plus a bound on reading each request (slow clients): DTMF_REQUEST_READ_TIMEOUT_S, default 10.
worker_class = "dtmf_service.worker.ThreadWorker"
workers = int(os.environ.get("DTMF_WORKERS") or (os.cpu_count() or 1))
threads = int(os.environ.get("DTMF_THREADS") or 64)


# Above the longest request (CONTRACT.md section 3), with room to spare; in-flight requests finish on
# a graceful stop (their audit events are already in the outbox).
timeout = graceful_timeout = request_timeout_s()
keepalive = 75  # longer than nginx's upstream keepalive_timeout (60 s) so nginx closes first
# One JSON object per line, every field escaped (dtmf_service/accesslog.py); the path only, no query.
# DTMF_ACCESS_LOG: a path, "-" for stderr (default), or "off".
accesslog = None if os.environ.get("DTMF_ACCESS_LOG", "-") == "off" else os.environ.get("DTMF_ACCESS_LOG", "-")
logger_class = "dtmf_service.accesslog.JsonLogger"
errorlog = "-"
loglevel = os.environ.get("DTMF_GUNICORN_LOG_LEVEL", "info")
proc_name = "dtmf-gateway"
# gunicorn's control socket has one fixed default path: two instances on a host would fight over it.
if os.environ.get("DTMF_CONTROL_SOCKET"):
    control_socket = os.environ["DTMF_CONTROL_SOCKET"]
else:
    control_socket_disable = True

_AUDIT_FLUSH_S = 10.0


def on_starting(server):
    """Master start, before any worker: the lifecycle's checks and preparations, and the host's audit
    delivery process. A bad configuration or plugin stops here with one line (exit 4)."""
    try:
        _lifecycle.starting()
    except LifecycleError as exc:
        _log.error("dtmf-gateway: configuration error: %s", exc)
        raise SystemExit(4) from None


def on_reload(server):
    """kill -HUP (systemctl reload), before the new workers fork: the keys file is read again (a bad
    file keeps the old keys, GET /healthz says stale) and the delivery process is replaced."""
    _lifecycle.reloading()


def child_exit(server, worker):
    """In the master, after any worker exit (kill -9 included): fold its counters into the archive,
    so that reading the totals costs one file per live worker, not one per worker ever started."""
    _lifecycle.worker_exited(worker.pid)


def on_exit(server):
    """The master's last act: stop the host's delivery process."""
    _lifecycle.stopping()


def worker_exit(server, worker):
    """Every way a worker stops (SIGTERM, SIGHUP reload, max_requests, SIGQUIT/SIGINT quick stop,
    SIGABRT timeout kill): this runs in the main thread while request threads may still be running.
    Wait until the last of them has answered and written its audit event (the master's
    graceful_timeout bounds the wait), then close the outbox (its journal into the store)."""
    wait = getattr(worker, "wait_for_requests", None)
    if wait is not None and not wait(worker.cfg.graceful_timeout):
        _log.error(
            "dtmf-gateway: worker %s exits with %d request(s) still running", worker.pid, worker.running_requests()
        )
    components = _components(worker)
    if components is not None:
        components.close(_AUDIT_FLUSH_S)


def _components(worker):
    app = getattr(worker, "wsgi", None)
    extensions = getattr(app, "extensions", None)
    return extensions.get("dtmf") if isinstance(extensions, dict) else None
