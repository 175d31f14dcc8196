"""Misbehaving upstreams on real loopback sockets: TLS that breaks after the request, trickled answers.

Each one stands in for CXone's DTMF endpoint only (tokens come from the simulator), reads a whole
HTTP request, counts it, and then answers the way the test asks.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

Behaviour = Callable[[socket.socket], None]


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (cert, key); the cert doubles as the CA bundle."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class RawUpstream:
    """A loopback server that reads one HTTP request per connection, then runs ``behaviour``."""

    def __init__(self, behaviour: Behaviour, certificate: tuple[Path, Path] | None = None) -> None:
        self.behaviour = behaviour
        self.requests: list[bytes] = []
        self._context: ssl.SSLContext | None = None
        if certificate is not None:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(str(certificate[0]), str(certificate[1]))
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        scheme = "https" if certificate else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self.port}/api/v2"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self._context is not None:
                conn = self._context.wrap_socket(conn, server_side=True)
            conn.settimeout(10)
            request = _read_request(conn)
            if request is None:
                return
            self.requests.append(request)
            self.behaviour(conn)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._listener.close()


def _read_request(conn: socket.socket) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head + b"\r\n\r\n" + body


def garbage_outside_tls(conn: socket.socket) -> None:
    """After the whole POST was read over TLS, write bytes that are not a TLS record."""
    socket.socket.sendall(conn, b"this is not a TLS record\r\n" * 4)
    time.sleep(0.2)


def trickle(interval_s: float, total_s: float) -> Behaviour:
    """Answer 200 one byte at a time, every ``interval_s``, for at most ``total_s``."""

    def behaviour(conn: socket.socket) -> None:
        answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        deadline = time.monotonic() + total_s
        for byte in answer:
            if time.monotonic() > deadline:
                return
            conn.sendall(bytes([byte]))
            time.sleep(interval_s)

    return behaviour


def answer_ok(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
