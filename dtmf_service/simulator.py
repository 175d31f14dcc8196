"""A CXone simulator: in-process for sandbox mode, or a real HTTP server for tests.

It speaks both dialects (tutorial and Agent API), checks what it receives, and
can be scripted over HTTP to answer with failures: 429 with Retry-After, 401,
404, 5xx, slow answers, or a connection dropped after the request arrived.

    python -m dtmf_service.simulator --host 127.0.0.1 --port 9000

Control endpoints (test tooling, loopback only):
    POST /_sim/script   {"target": "dtmf:<interaction_id>" | "dtmf:*" | "token" | "discovery",
                         "responses": [{"status": 429, "headers": {...}, "body": {...},
                                        "delay_s": 0.5, "drop": false}, ...]}
    POST /_sim/config   {"token_ttl_s": 60, "client_id": "...", "client_secret": "...", "delay_s": 0}
    GET  /_sim/requests  every request seen (newest last)
    POST /_sim/reset

Longer than the project's usual module: it is one fake of one upstream (token, discovery and
both DTMF dialects, with the scripting that drives their failures), and it lives here, not in
cxone/, because CONTRACT.md names ``python -m dtmf_service.simulator``.
"""

from __future__ import annotations

import argparse
import base64
import collections
import ipaddress
import itertools
import json
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_TUTORIAL_DTMF = re.compile(r"/interactions/([^/]+)/dtmf$")
_AGENT_DTMF = re.compile(r"/InContactAPI/services/v[0-9.]+/agent-sessions/([^/]+)/send-dtmf$")
_MAX_RECORDED = 10000
SANDBOX_URL = "http://cxone-sandbox.invalid"  # the in-process simulator's address in sandbox mode


@dataclass
class SimResponse:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drop: bool = False  # close the connection without answering (outcome unknown to the client)

    def payload(self) -> bytes:
        if self.body is None:
            return b""
        return self.body.encode() if isinstance(self.body, str) else json.dumps(self.body).encode()


class Simulator:
    """The simulated CXone: pure request handling, shared by both transports."""

    def __init__(self, base_url: str = "", token_ttl_s: float = 3600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._initial_token_ttl_s = token_ttl_s  # reset() goes back to this, not to a default
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.token_ttl_s = self._initial_token_ttl_s
            self.client_id: str | None = None
            self.client_secret: str | None = None
            self.delay_s = 0.0
            self._tokens: dict[str, float] = {}
            self._scripts: dict[str, collections.deque[SimResponse]] = {}
            self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=_MAX_RECORDED)

    # -- control -----------------------------------------------------------------------------
    def script(self, target: str, responses: list[dict[str, Any]]) -> None:
        queue = collections.deque(SimResponse(**r) for r in responses)
        with self._lock:
            self._scripts.setdefault(target, collections.deque()).extend(queue)

    def configure(self, **settings: Any) -> None:
        with self._lock:
            for name in ("token_ttl_s", "client_id", "client_secret", "delay_s"):
                if name in settings:
                    setattr(self, name, settings[name])

    def seen(self, kind: str) -> list[dict[str, Any]]:
        """Recorded requests of one kind: "token", "dtmf" or "discovery"."""
        with self._lock:
            recorded = list(self.requests)
        if kind == "token":
            return [r for r in recorded if r["path"].endswith(("/oauth/token", "/auth/token"))]
        if kind == "dtmf":
            return [r for r in recorded if r["path"].endswith(("/dtmf", "/send-dtmf"))]
        return [r for r in recorded if "/.well-known/" in r["path"]]

    def _next_scripted(self, *targets: str) -> SimResponse | None:
        with self._lock:
            for target in targets:
                queue = self._scripts.get(target)
                if queue:
                    return queue.popleft()
        return None

    # -- the API -----------------------------------------------------------------------------
    def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes, peer: str | None = None
    ) -> SimResponse:
        """Answer one request. ``headers`` keys are lower-case; ``peer`` is the client's host:port."""
        parts = urlsplit(target)
        path = parts.path
        with self._lock:
            self.requests.append(
                {
                    "method": method,
                    "path": path,
                    "query": parts.query,
                    "headers": headers,
                    "body": body.decode("utf-8", "replace"),
                    "peer": peer,
                }
            )
        if path.startswith("/_sim/"):
            return self._control(method, path, body)
        response = self._route(method, path, parts.query, headers, body)
        if self.delay_s and not response.delay_s:
            response.delay_s = self.delay_s
        return response

    def _route(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> SimResponse:
        if path.endswith("/.well-known/openid-configuration"):
            scripted = self._next_scripted("discovery")
            document = {"issuer": self.base_url, "token_endpoint": f"{self.base_url}/auth/token"}
            return scripted or SimResponse(200, document)
        if path.endswith("/.well-known/cxone-configuration"):
            scripted = self._next_scripted("discovery")
            tenant = parse_qs(query).get("tenantId", [""])[0]
            if scripted:
                return scripted
            if not tenant:
                return SimResponse(400, {"error": "tenantId required"})
            return SimResponse(200, {"api_endpoint": self.base_url, "area": "na1", "cluster": "sim", "domain": "sim"})
        if method != "POST":
            return SimResponse(405, {"error": "method not allowed"})
        if path.endswith("/oauth/token"):
            return self._next_scripted("token") or self._client_credentials(body)
        if path.endswith("/auth/token"):
            return self._next_scripted("token") or self._password_grant(headers, body)
        match = _TUTORIAL_DTMF.search(path) or _AGENT_DTMF.search(path)
        if match:
            return self._dtmf(match, headers, body)
        return SimResponse(404, {"error": "no such endpoint"})

    def _issue_token(self) -> SimResponse:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.token_ttl_s
        return SimResponse(200, {"access_token": token, "token_type": "bearer", "expires_in": self.token_ttl_s})

    def _client_credentials(self, body: bytes) -> SimResponse:
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        if form.get("grant_type") != "client_credentials":
            return SimResponse(400, {"error": "unsupported_grant_type"})
        if self.client_id is not None and (
            form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret
        ):
            return SimResponse(401, {"error": "invalid_client"})
        return self._issue_token()

    def _password_grant(self, headers: dict[str, str], body: bytes) -> SimResponse:
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        auth = headers.get("authorization", "")
        if not auth.startswith("Basic "):
            return SimResponse(401, {"error": "invalid_client"})
        try:
            client_id, _, client_secret = base64.b64decode(auth[6:]).decode("utf-8").partition(":")
        except ValueError:
            return SimResponse(401, {"error": "invalid_client"})
        if self.client_id is not None and (client_id != self.client_id or client_secret != self.client_secret):
            return SimResponse(401, {"error": "invalid_client"})
        if form.get("grant_type") != "password" or not form.get("username") or not form.get("password"):
            return SimResponse(400, {"error": "invalid_grant"})
        return self._issue_token()

    def _dtmf(self, match: re.Match[str], headers: dict[str, str], body: bytes) -> SimResponse:
        interaction_id = match.group(1)
        agent = match.re is _AGENT_DTMF
        scripted = self._next_scripted(f"dtmf:{interaction_id}", "dtmf:*")
        if scripted is not None:
            return scripted
        auth = headers.get("authorization", "")
        with self._lock:
            expiry = self._tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
        if expiry is None or expiry < time.monotonic():
            return SimResponse(401, {"error": "invalid_token"})
        if not headers.get("content-type", "").startswith("application/json"):
            return SimResponse(415, {"error": "unsupported media type"})
        try:
            payload = json.loads(body)
        except ValueError:
            return SimResponse(400, {"error": "invalid json"})
        if not _valid_payload(payload, agent):
            return SimResponse(400, {"error": "invalid body"})
        if interaction_id.startswith("missing-"):
            return SimResponse(404, {"error": "interaction not found"})
        if agent:
            return SimResponse(202, {"status": "accepted"})
        return SimResponse(200, {"status": "accepted", "request_id": next(self._counter)})

    def _control(self, method: str, path: str, body: bytes) -> SimResponse:
        if path == "/_sim/requests" and method == "GET":
            with self._lock:
                return SimResponse(200, list(self.requests))
        data = json.loads(body or b"{}")
        if path == "/_sim/script":
            self.script(data["target"], data["responses"])
        elif path == "/_sim/config":
            self.configure(**data)
        elif path == "/_sim/reset":
            self.reset()
        else:
            return SimResponse(404, {"error": "no such control endpoint"})
        return SimResponse(200, {"ok": True})


def _valid_payload(payload: Any, agent: bool) -> bool:
    if not isinstance(payload, dict):
        return False
    if agent:
        return (
            set(payload) <= {"dtmfSequence", "toneDurationMS", "toneSpacingMS"}
            and isinstance(payload.get("dtmfSequence"), str)
            and isinstance(payload.get("toneDurationMS"), int)
        )
    return (
        set(payload) == {"digits", "timeout"}
        and isinstance(payload["digits"], str)
        and re.fullmatch(r"[0-9*#]{1,16}", payload["digits"]) is not None
        and isinstance(payload["timeout"], int)
        and not isinstance(payload["timeout"], bool)
    )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real upstream
    server: _SimServer

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        peer = "{}:{}".format(*self.client_address[:2])
        if urlsplit(self.path).path.startswith("/_sim/") and not _loopback(self.client_address[0]):
            # A simulator bound to a routable address must not let others script it or read its log.
            answer = SimResponse(403, body={"error": "control endpoints answer loopback clients only"})
        else:
            answer = self.server.simulator.handle(self.command, self.path, headers, body, peer)
        if answer.delay_s:
            time.sleep(answer.delay_s)
        if answer.drop:
            self.close_connection = True
            return
        payload = answer.payload()
        self.send_response(answer.status)
        self.send_header("Content-Type", "application/json")
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # tokens travel in headers; a test fake has no business printing them


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class _SimServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512
    simulator: Simulator


def make_server(host: str = "127.0.0.1", port: int = 0, token_ttl_s: float = 3600.0) -> _SimServer:
    """A simulator HTTP server bound to ``host:port`` (0 picks a free port), not yet serving."""
    server = _SimServer((host, port), _Handler)
    bound_host, bound_port = str(server.server_address[0]), int(server.server_address[1])
    server.simulator = Simulator(f"http://{bound_host}:{bound_port}", token_ttl_s)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CXone simulator (tutorial and Agent API dialects)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--token-ttl", type=float, default=3600.0, help="seconds each issued token lasts")
    parser.add_argument("--client-id", help="accept only this client id (default: any)")
    parser.add_argument("--client-secret", help="accept only this client secret")
    args = parser.parse_args(argv)
    server = make_server(args.host, args.port, args.token_ttl)
    if args.client_id is not None:
        server.simulator.configure(client_id=args.client_id, client_secret=args.client_secret or "")
    host, port = str(server.server_address[0]), int(server.server_address[1])
    print(
        f"CXone simulator listening on http://{host}:{port} (tutorial base URL http://{host}:{port}/api/v2)", flush=True
    )
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
