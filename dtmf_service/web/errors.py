"""JSON responses for every error, Flask's own included: never HTML, never a stack trace."""

from __future__ import annotations

import logging
import traceback
from typing import Any

from flask import Flask
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from dtmf_service.jsontext import compact
from dtmf_service.outcome import error_body
from dtmf_service.web.response import Response

log = logging.getLogger("dtmf_service")

_MESSAGES = {
    404: "no such endpoint",
    405: "method not allowed for this endpoint",
    413: "request body larger than the limit",
    415: "Content-Type must be application/json",
}


def log_exception(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """Type and stack only: an exception's message can carry request data (digits), so it stays out."""
    stack = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
    logger.error("%s: %s\n%s", what, type(exc).__name__, stack)


def json_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response with an exact body."""
    response = Response(compact(body), status=status, mimetype="application/json")
    if headers:
        response.headers.update(headers)
    return response


def error_response(
    status: int, kind: str, error: str | None = None, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    """An error response, in the one shape of every error body (outcome.error_body)."""
    return json_response(error_body(kind, error, **extra), status, headers)


def register_error_handlers(app: Flask) -> None:
    """Turn every HTTP error and every unexpected exception into JSON."""

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        if code >= 500:
            return error_response(500, "internal_error")
        response = error_response(code, "invalid_request", _MESSAGES.get(code, exc.name.lower()))
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # The type and stack go to the log; the caller learns nothing of the internals.
        log_exception(log, "unexpected error", exc)
        return error_response(500, "internal_error")
