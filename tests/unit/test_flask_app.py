"""What the gateway's Flask application leaves out per request (dtmf_service/__init__.py): no session
(no cookie read or set, nothing can be stored in one), and the coroutine check of each hook and view
made once; an async function is still handed to Flask's own handling."""

import flask
import pytest

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
