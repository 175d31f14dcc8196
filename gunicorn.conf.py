"""gunicorn settings for the DTMF gateway. Command-line flags override these.

DTMF_BIND (127.0.0.1:8080), DTMF_WORKERS (one per core), DTMF_THREADS (64).
gthread workers: a request spends most of its life waiting on CXone, so
threads, not processes, carry the concurrency (5 sync workers would cap the
service at 100 requests/s against a 50 ms upstream). 64 threads leave room for requests that
sleep out a 429 back-off without starving other callers; an idle thread costs little.
"""

import logging
import os
import tempfile

from dtmf_service import config as _cfg
from dtmf_service.metrics import counters as _counters

# Every file the service creates is the service user's alone (CONTRACT.md section 8, *rev 3*), whatever
# umask it was started with; AUDIT_FILE_MODE widens the audit file only. The unit sets UMask=0077 too.
os.umask(0o077)

bind = os.environ.get("DTMF_BIND", "127.0.0.1:8080")
# The master's pid, for README's `kill -HUP "$(cat $DTMF_PIDFILE)"`; the shipped unit's env file sets it.
pidfile = os.environ.get("DTMF_PIDFILE") or None
# gthread, plus a bound on reading each request (slow clients): DTMF_REQUEST_READ_TIMEOUT_S, default 10.
worker_class = "dtmf_service.worker.ThreadWorker"
workers = int(os.environ.get("DTMF_WORKERS") or (os.cpu_count() or 1))
threads = int(os.environ.get("DTMF_THREADS") or 64)


def _longest_request_s():
    """CONTRACT.md section 3's deadline, from the sources the workers read (environment and
    DTMF_CONFIG_FILE). A bad configuration is reported, with one line, by on_starting."""
    probe = {}
    try:
        _cfg.load_sources(probe)
        _cfg.finalise(probe)
    except _cfg.ConfigError:
        return _cfg.request_deadline_s({k: key.default for k, key in _cfg.KEYS.items()})
    return _cfg.request_deadline_s(probe)


# Above the longest request, with room to spare; in-flight requests finish on a graceful stop
# (their audit events are already in the outbox).
timeout = graceful_timeout = int(_longest_request_s() + 10)
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
    """Master start: one metrics directory for all workers, wiped so totals start from zero."""
    directory = os.environ.get("DTMF_METRICS_DIR")
    if not directory:
        directory = tempfile.mkdtemp(prefix="dtmf-metrics-")
        os.environ["DTMF_METRICS_DIR"] = directory
    os.makedirs(directory, mode=0o700, exist_ok=True)
    _counters.wipe(directory)
    # Fail fast in the master, with one line, on a bad configuration or an unknown plugin name.
    from dtmf_service.audit.outbox import open_outbox
    from dtmf_service.idempotency import Idempotency
    from dtmf_service.pluginmanager import check_plugins_isolated
    from dtmf_service.web import apikeys

    probe = {}
    try:
        _cfg.load_sources(probe)
        _cfg.finalise(probe)
        if probe["API_KEYS_FILE"]:
            # The master reads the keys file; the workers it forks inherit the keys (and at a reload,
            # keep the old ones when the file is bad: see on_reload).
            apikeys.hold(probe["API_KEYS_FILE"])
        # In a child process: a plugin imported here would stay in every forked worker, and a
        # reload would never run a newly installed version.
        check_plugins_isolated()
        # Prepare the idempotency store once here, so the workers do not all race to create it.
        Idempotency.from_config(probe).close()
        if probe["AUDIT_SINKS"]:
            outbox = open_outbox(probe, probe["AUDIT_SINKS"])  # the audit outbox too
            outbox.import_legacy_spool()  # an earlier version's spool, before any worker exists
            outbox.close()
    except (_cfg.ConfigError, apikeys.KeysError) as exc:
        logging.getLogger("gunicorn.error").error("dtmf-gateway: configuration error: %s", exc)
        raise SystemExit(4) from None


def on_reload(server):
    """kill -HUP (systemctl reload), before the new workers fork: re-read API_KEYS_FILE; a bad file
    keeps the old keys (logged, GET /healthz says stale) instead of new workers exiting 4 and the
    master halting."""
    from dtmf_service.web import apikeys

    apikeys.reload_held(server.log)


def post_worker_init(worker):
    """Start audit delivery now, so events left by an earlier process are delivered without waiting."""
    components = _components(worker)
    if components is not None and components.delivery is not None:
        components.delivery.start()


def child_exit(server, worker):
    """In the master, after any worker exit (kill -9 included): fold its counters into the archive,
    so that reading the totals costs one file per live worker, not one per worker ever started."""
    directory = os.environ.get("DTMF_METRICS_DIR")
    if directory:
        try:
            _counters.fold_dead(directory, worker.pid)
        except OSError as exc:
            logging.getLogger("gunicorn.error").error("dtmf-gateway: could not fold worker counters: %s", exc)


def worker_exit(server, worker):
    """Every way a worker stops (SIGTERM, SIGHUP reload, max_requests, SIGQUIT/SIGINT quick stop,
    SIGABRT timeout kill): this runs in the main thread while request threads may still be running.
    Wait until the last of them has answered and written its audit event (the master's
    graceful_timeout bounds the wait), then stop delivering; the outbox keeps the rest."""
    wait = getattr(worker, "wait_for_requests", None)
    if wait is not None and not wait(worker.cfg.graceful_timeout):
        logging.getLogger("gunicorn.error").error(
            "dtmf-gateway: worker %s exits with %d request(s) still running", worker.pid, worker.running_requests()
        )
    components = _components(worker)
    if components is not None:
        components.close(_AUDIT_FLUSH_S)


def _components(worker):
    app = getattr(worker, "wsgi", None)
    extensions = getattr(app, "extensions", None)
    return extensions.get("dtmf") if isinstance(extensions, dict) else None
