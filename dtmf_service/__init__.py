"""DTMF gateway: validates DTMF requests and submits them to NICE CXone.

Plugin authors: ``from dtmf_service import hookimpl`` (the whole plugin API is in hookspecs.py).
``create_app`` builds the Flask application around the parts ``wiring.build`` connects.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import time
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dtmf_service.audit.event import event_json
from dtmf_service.config import ConfigError
from dtmf_service.hookspecs import DeliveryIncomplete, DeliveryRejected, hookimpl

if TYPE_CHECKING:
    from flask import Flask

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "DeliveryIncomplete",
    "DeliveryRejected",
    "create_app",
    "event_json",
    "hookimpl",
    "__version__",
]

log = logging.getLogger("dtmf_service")


def create_app(test_config: Mapping[str, Any] | None = None, operator: bool | None = None) -> Any:
    """The Flask application. ``test_config`` replaces the environment and file sources.

    ``operator`` (default: loaded by ``flask ... dtmf ...``): for the operator CLI, which serves no
    request and creates nothing; only the configuration is checked (wiring.build_operator)."""
    from flask import g, request

    from dtmf_service import config as cfg
    from dtmf_service.cli import register as register_cli
    from dtmf_service.deadlines import request_read_done
    from dtmf_service.web.edge import TrustedProxies, request_id
    from dtmf_service.web.errors import error_response, register_error_handlers
    from dtmf_service.web.tracing import trace_from_header
    from dtmf_service.web.views import bp
    from dtmf_service.wiring import build, build_operator
    from dtmf_service.wiring.lifecycle import delivery_in_process

    app = _gateway_flask()(__name__)
    if test_config is None:
        cfg.load_sources(app.config)
    else:
        app.config.update(test_config)
    cfg.finalise(app.config)
    _configure_logging(app.config["LOG_LEVEL"])

    if operator is None:
        operator = _operator_command()
    if operator:
        app.extensions["dtmf"] = build_operator(app.config)
        register_cli(app)
        return app
    components = build(app.config, deliver=delivery_in_process())
    app.extensions["dtmf"] = components
    if app.config["PROXY_COUNT"]:
        # X-Forwarded-* only from FORWARDED_ALLOW_IPS (nginx on this host by default), never from anyone.
        app.wsgi_app = TrustedProxies(  # type: ignore[method-assign]
            app.wsgi_app, app.config["FORWARDED_ALLOW_IPS"], app.config["PROXY_COUNT"]
        )
    register_error_handlers(app)
    register_cli(app)
    # No redirects, ever (CONTRACT.md section 2): "//api/dtmf/parse" is 404, not a 308 whose Location
    # is built from the caller's Host header; OPTIONS is 405 like any other method a route lacks.
    app.url_map.merge_slashes = False
    app.url_map.redirect_defaults = False
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.register_blueprint(bp)

    @app.before_request
    def _request_id() -> Any:
        # One lookup of each context proxy (each attribute through a proxy is a lookup of its own);
        # the headers straight from the environ, as werkzeug's EnvironHeaders reads them.
        state, environ = g._get_current_object(), request.environ
        state.started = time.perf_counter()
        if environ.get("REQUEST_METHOD", "GET").upper() != "POST":
            request_read_done()  # nothing more to read: disarm the slow-client alarm at once
        if "//" in _raw_path(environ):
            # gunicorn turns "//api/dtmf/parse" into "/api/dtmf/parse" before routing: judge what was sent.
            return error_response(404, "invalid_request", "no such endpoint")
        state.request_id = request_id(environ.get("HTTP_X_REQUEST_ID"))  # nginx's rule too
        state.trace_id, state.trace_flags = trace_from_header(environ.get("HTTP_TRACEPARENT"))
        environ["dtmf.trace_id"] = state.trace_id  # for the access log

    @app.after_request
    def _echo_request_id(response: Any) -> Any:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        return response

    if components.mode == "sandbox":
        log.warning(
            "SANDBOX MODE: no CXone instance is configured (DTMF_CXONE_INSTANCE / DTMF_CXONE_BASE_URL); "
            "digits go to the built-in simulator and no real call receives them"
        )
    if app.config["AUDIT_DIGITS"] == "full" and components.mode != "sandbox":
        log.warning(
            "AUDIT_DIGITS=full: audit events carry the digits in clear (PINs, card data); "
            "masked (the default) or hashed keep them out of every sink"
        )
    atexit.register(components.close, 5.0)
    return app


@functools.cache
def _gateway_flask() -> type[Flask]:
    """Flask, less the costs a service without async views, sessions or streamed bodies pays per request."""
    from flask import Flask
    from flask.sessions import NullSession, SessionInterface

    class NoSessions(SessionInterface):
        """No session is ever read or written (no cookie): every request shares one null session,
        which refuses any change, instead of building one each."""

        _null = NullSession()

        def open_session(self, app: Any, request: Any) -> Any:
            return self._null

        def save_session(self, app: Any, session: Any, response: Any) -> None:
            pass

    from dtmf_service.web.response import Response

    class GatewayFlask(Flask):
        session_interface = NoSessions()
        response_class = Response  # the responses Flask makes itself, as the views' own

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._plain: set[Any] = set()

        def ensure_sync(self, func: Any) -> Any:
            # Flask asks for every hook and view of every request whether it is a coroutine function
            # (inspect's flag checks): asked once per plain function here; anything else as Flask does.
            if func in self._plain:
                return func
            wrapped = super().ensure_sync(func)
            if wrapped is func and isinstance(func, types.FunctionType):
                self._plain.add(func)
            return wrapped

    return GatewayFlask


def _operator_command() -> bool:
    """Is this ``flask --app app dtmf ...``? (Flask's CLI sets FLASK_RUN_FROM_CLI for every command,
    ``flask run`` included; the operator commands are those of the ``dtmf`` group.)"""
    return os.environ.get("FLASK_RUN_FROM_CLI") == "true" and "dtmf" in sys.argv[1:]


def _raw_path(environ: Mapping[str, Any]) -> str:
    """The request target's path as the caller sent it (origin- or absolute-form), without the query."""
    # gunicorn: RAW_URI; uWSGI-style servers: REQUEST_URI; granian gives PATH_INFO as sent (decoded).
    raw = str(environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO") or "")
    if raw.startswith(("http://", "https://")):
        raw = "/" + raw.split("://", 1)[1].partition("/")[2]
    return raw.split("?", 1)[0]


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("dtmf_service")
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"))
        logger.addHandler(handler)
