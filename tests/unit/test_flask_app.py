"""What the gateway's Flask application leaves out per request (dtmf_service/__init__.py): no session
(no cookie read or set, nothing can be stored in one), and the coroutine check of each hook and view
made once; an async function is still handed to Flask's own handling."""

import io
import json

import flask
import pytest

from dtmf_service.web.response import Response
from tests.conftest import VALID


def test_no_session_cookie_and_no_session_writes(app, client):
    answer = client.post("/api/dtmf/parse", json=VALID, headers={"Cookie": "session=forged"})
    assert answer.status_code == 200
    assert "Set-Cookie" not in answer.headers
    with app.test_request_context("/healthz"):
        assert not flask.session  # nothing read from the forged cookie
        with pytest.raises(RuntimeError):
            flask.session["k"] = "v"  # a null session: no secret key, no sessions


def test_plain_hooks_and_views_are_used_as_they_are(app, client):
    view = app.view_functions["dtmf.parse"]
    assert app.ensure_sync(view) is view
    assert app.ensure_sync(view) is view  # asked again: from what the first call learned
    assert client.get("/healthz").status_code == 200


def test_an_async_function_still_goes_through_flask(app):
    async def handler():
        return "x"

    flask_answer = flask.Flask(__name__)
    try:
        expected = flask_answer.ensure_sync(handler)
    except RuntimeError as exc:  # Flask without its async extra
        with pytest.raises(RuntimeError, match=str(exc)[:30]):
            app.ensure_sync(handler)
    else:
        assert app.ensure_sync(handler) is not handler and callable(expected)


def _call(app, method, path, body=b"", content_type="application/json"):
    started = {}

    def start_response(status, headers, exc_info=None):
        started["status"], started["headers"] = status, dict(headers)

    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": content_type,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": io.StringIO(),
    }
    return app.wsgi_app(environ, start_response), started


def test_a_body_in_memory_goes_to_the_server_as_one_list(app):
    result, started = _call(app, "POST", "/api/dtmf/parse", json.dumps(VALID).encode())
    assert isinstance(result, list) and len(result) == 1  # granian sends a list in one piece
    assert started["status"].startswith("200")
    assert int(started["headers"]["Content-Length"]) == len(result[0])
    assert json.loads(result[0])["status"] == "dtmf_submitted"
    result, started = _call(app, "GET", "/no/such/path")
    assert isinstance(result, list) and json.loads(result[0])["status"] == "invalid_request"


def test_head_has_no_body_and_close_callbacks_keep_werkzeugs_iterator(app):
    result, started = _call(app, "HEAD", "/healthz")
    assert list(result) == [] and started["status"].startswith("200")
    closed = []
    response = Response("x")
    response.call_on_close(lambda: closed.append(True))
    iterable = response.get_app_iter({"REQUEST_METHOD": "GET"})
    assert not isinstance(iterable, list) and list(iterable) == [b"x"]
    iterable.close()
    assert closed == [True]
