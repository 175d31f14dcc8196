"""The floor: the thinnest Flask app that does the gateway's job, for comparison only.

Regex check, forward with one keep-alive requests.Session, JSON answer. No audit,
no metrics, no retries, no idempotency: what a gateway cannot cost less than.
"""

import os
import re
import threading

import requests
from flask import Flask, jsonify, request

BASE = os.environ.get("FLOOR_CXONE_BASE_URL", "http://127.0.0.1:9100/api/v2")
DIGITS = re.compile(r"[0-9*#]{1,16}")
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

app = Flask(__name__)
session = requests.Session()
# Keep-alive for every gunicorn thread (the default pool of 10 would discard connections under load).
session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=128))
_token: list[str] = []
_lock = threading.Lock()


def token() -> str:
    with _lock:
        if not _token:
            _token.append(
                session.post(f"{BASE}/oauth/token", data={"grant_type": "client_credentials"}, timeout=5).json()[
                    "access_token"
                ]
            )
        return _token[0]


@app.post("/api/dtmf/parse")
def parse():
    body = request.get_json(silent=True) or {}
    digits, interaction = body.get("digits"), body.get("interaction_id")
    if (
        not isinstance(digits, str)
        or not DIGITS.fullmatch(digits)
        or not isinstance(interaction, str)
        or not ID.fullmatch(interaction)
    ):
        return jsonify(status="validation_failed"), 400
    answer = session.post(
        f"{BASE}/interactions/{interaction}/dtmf",
        json={"digits": digits, "timeout": body.get("timeout_ms")},
        headers={"Authorization": f"Bearer {token()}"},
        timeout=(3, 15),
    )
    return jsonify(status="dtmf_submitted", cxone_status=answer.status_code), 200 if answer.ok else 502


@app.get("/healthz")
def healthz():
    return jsonify(status="ok")
