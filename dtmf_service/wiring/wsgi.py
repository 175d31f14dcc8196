"""The WSGI application every server loads: ``app:app`` (app.py re-exports it) or
``dtmf_service.wiring.wsgi:app`` (``dtmf-gateway serve``).

It serves only under the service's lifecycle (lifecycle.py), which ``dtmf-gateway serve`` and
gunicorn.conf.py run: a server that ran none of it (uWSGI, ``gunicorn app:app`` without the
configuration file) would serve without the metrics directory, journal recovery or audit delivery,
so the import stops with one line naming what is missing. Flask's own commands (``flask --app app
dtmf ...``, ``flask run`` for development) deliver in-process instead and are let through.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from multiprocessing import util

from dtmf_service import create_app
from dtmf_service.accesslog import JsonAccessLog
from dtmf_service.config import ConfigError
from dtmf_service.wiring.lifecycle import FLUSH_S, under_lifecycle
from dtmf_service.wiring.serve import guard_granian_worker, mark_worker_ready

MISSING = (
    "dtmf-gateway: refusing to serve: this server ran none of the gateway's lifecycle "
    "(metrics directory, configuration and plugin check, journal recovery, audit delivery process, keys file); "
    "start it with `dtmf-gateway serve` or `gunicorn -c gunicorn.conf.py app:app`"
)


def _flask_command() -> bool:
    return os.environ.get("FLASK_RUN_FROM_CLI") == "true"


if not under_lifecycle() and not _flask_command():
    print(MISSING, file=sys.stderr, flush=True)
    sys.exit(4)

try:
    app = create_app()
except ConfigError as exc:
    # One clear line, then exit code 4: the server's "App failed to load", which stops its master too.
    print(f"dtmf-gateway: configuration error: {exc}", file=sys.stderr, flush=True)
    sys.exit(4)

if multiprocessing.parent_process() is not None:
    guard_granian_worker()  # a stop during boot, a master that is gone (serve.py)
    # A granian worker (a multiprocessing child; gunicorn forks its own): close the outbox, which
    # moves what the journal holds into the store, when the worker ends gracefully (granian runs no
    # atexit handler there). A worker that does not (SIGKILL) leaves its journal to the delivery
    # process's recovery.
    util.Finalize(None, app.extensions["dtmf"].close, args=(FLUSH_S,), exitpriority=10)
    # granian's own access line is plain text with the caller's characters unescaped: the same JSON
    # lines as under gunicorn instead (DTMF_ACCESS_LOG: a path, "-" for stderr, the default, or "off").
    _target = os.environ.get("DTMF_ACCESS_LOG", "-")
    if _target != "off":
        app.wsgi_app = JsonAccessLog(app.wsgi_app, _target)
    mark_worker_ready()  # for systemd's READY=1, said by the master
    # granian copies the whole process environment into every request's WSGI environ: the
    # configuration has been read, so none of it (secrets included) rides along with requests.
    for _name in [name for name in os.environ if name.startswith("DTMF_")]:
        del os.environ[_name]

__all__ = ["app", "create_app"]
