"""One HTTP/1.1 exchange on an open socket: the request written whole, the answer read strictly.

http.client parses an answer's header block with the ``email`` package (a feed parser building a
``Message``, every lookup going through its policy), and that was the largest single CPU cost of a
DTMF request. An answer from CXone needs much less: the status, a few headers, and the body framed
by Content-Length or chunked encoding. The request is what http.client writes (request line, Host,
``Accept-Encoding: identity``, Content-Length, the caller's headers in order), in one ``sendall``.

Read strictly: a line cut short by end of file, a malformed status line, header line or chunk size,
and a body shorter than announced are errors (the transport turns every error after the first byte
written into ``Unknown``). Informational answers (1xx) are skipped, as RFC 9110 says.
"""

from __future__ import annotations

import http.client
import re
import socket
from collections.abc import Iterable, Mapping
from typing import BinaryIO

_MAXLINE = 65536  # http.client's bounds: a longer line, or more header lines, is an error
_MAXHEADERS = 100
_STATUS = re.compile(rb"HTTP/1\.([0-9]+) ([0-9]{3})(?: [^\r\n]*)?\r?\n")
_NAME = re.compile(rb"[!-9;-~]+")  # a header name: visible ASCII but ':' (as the email parser's rule)
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_BAD_TARGET = re.compile("[\x00-\x20\x7f]")  # http.client's rule: no control character or space
_BAD_VALUE = re.compile(rb"[\r\n\0]")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a request header's name (RFC 9110 token)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_END = (b"\r\n", b"\n")


class Headers:
    """An answer's headers: ``get`` is case-insensitive and gives the first value, as http.client's."""

    __slots__ = ("_items", "_first")

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._items = list(items)
        first: dict[str, str] = {}
        for name, value in self._items:
            first.setdefault(name.lower(), value)
        self._first = first

    def get(self, name: str, default: None = None) -> str | None:
        return self._first.get(name.lower(), default)

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __repr__(self) -> str:
        return f"Headers({[name for name, _ in self._items]})"  # names only: values may be secrets


def host_header(conn: http.client.HTTPConnection) -> bytes:
    """The Host line http.client writes for ``conn``: IDNA for a non-ASCII name, brackets for IPv6,
    the port unless it is the scheme's default."""
    try:
        host = conn.host.encode("ascii")
    except UnicodeEncodeError:
        host = conn.host.encode("idna")
    if b":" in host:
        host = b"[" + host + b"]"
    if conn.port != conn.default_port:
        host += b":%d" % conn.port
    return b"Host: " + host + b"\r\n"


def request_bytes(method: str, target: str, host: bytes, body: bytes | None, headers: Mapping[str, str]) -> bytes:
    """The whole request; ValueError (nothing written) for a target or header that could split it."""
    if _BAD_TARGET.search(target):
        raise http.client.InvalidURL("the request target holds a control character or a space")
    lines = [f"{method} {target} HTTP/1.1\r\n".encode("ascii")]
    names = {name.lower() for name in headers}
    if "host" not in names:
        lines.append(host)
    if "accept-encoding" not in names:
        lines.append(b"Accept-Encoding: identity\r\n")
    if "content-length" not in names:
        if body is not None:
            lines.append(b"Content-Length: %d\r\n" % len(body))
        elif method in _BODY_METHODS:
            lines.append(b"Content-Length: 0\r\n")
    for name, value in headers.items():
        raw_name, raw_value = name.encode("ascii"), str(value).encode("latin-1")
        if not _TOKEN.fullmatch(raw_name) or _BAD_VALUE.search(raw_value):
            raise ValueError("a header name or value that would split the request")  # never echo it: a token
        lines.append(raw_name + b": " + raw_value + b"\r\n")
    lines.append(b"\r\n")
    if body:
        lines.append(body)
    return b"".join(lines)


def exchange(
    sock: socket.socket, method: str, target: str, host: bytes, body: bytes | None, headers: Mapping[str, str]
) -> tuple[int, Headers, bytes, bool]:
    """Write the request, read the answer: (status, headers, body, whether the connection must close)."""
    data = request_bytes(method, target, host, body, headers)
    sock.sendall(data)
    fp = sock.makefile("rb")
    try:
        return read_answer(fp, method)
    finally:
        fp.close()  # the reader only: the socket stays open for the next request


def read_answer(fp: BinaryIO, method: str) -> tuple[int, Headers, bytes, bool]:
    while True:
        line = _line(fp)
        match = _STATUS.fullmatch(line)
        if match is None:
            raise http.client.BadStatusLine("malformed status line")
        minor, status = int(match.group(1)), int(match.group(2))
        if status < 100:
            raise http.client.BadStatusLine("malformed status code")
        headers = _header_block(fp)
        if status >= 200:
            break  # 1xx (100 Continue, 103 Early Hints) come before the answer: skipped
    will_close = _will_close(headers, minor)
    if method == "HEAD" or status in (204, 304):
        return status, headers, b"", will_close
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if coding.strip().lower() != "chunked":
            raise http.client.HTTPException("unsupported transfer coding")
        return status, headers, _chunked(fp), will_close
    length = headers.get("content-length")
    if length is None:
        return status, headers, fp.read(), True  # framed by the end of the connection
    if not length.strip().isdigit():
        raise http.client.HTTPException("malformed Content-Length")
    return status, headers, _exactly(fp, int(length)), will_close


def _line(fp: BinaryIO) -> bytes:
    line = fp.readline(_MAXLINE + 1)
    if len(line) > _MAXLINE:
        raise http.client.LineTooLong("answer line")
    if not line.endswith(b"\n"):
        raise http.client.IncompleteRead(line)  # cut by end of file (or nothing at all)
    return line


def _header_block(fp: BinaryIO) -> Headers:
    items: list[tuple[str, str]] = []
    while True:
        line = _line(fp)
        if line in _END:
            return Headers(items)
        if len(items) >= _MAXHEADERS:
            raise http.client.HTTPException(f"got more than {_MAXHEADERS} headers")
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if b"\r" in line:
            raise http.client.HTTPException("a bare CR in a header line")  # RFC 9112, section 2.2
        if line[:1] in (b" ", b"\t"):
            if not items:
                raise http.client.HTTPException("malformed header line")
            # An obsolete line folding: one space instead (RFC 9112, section 5.2).
            folded_name, folded_value = items[-1]
            items[-1] = (folded_name, f"{folded_value} {line.strip().decode('latin-1')}")
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _NAME.fullmatch(name):
            raise http.client.HTTPException("malformed header line")
        items.append((name.decode("ascii"), value.strip().decode("latin-1")))


def _will_close(headers: Headers, minor: int) -> bool:
    """http.client's rule: HTTP/1.1 stays open unless told to close; HTTP/1.0 only when told to stay."""
    connection = (headers.get("connection") or "").lower()
    if minor >= 1:
        return "close" in connection
    if headers.get("keep-alive") or "keep-alive" in connection:
        return False
    return "keep-alive" not in (headers.get("proxy-connection") or "").lower()


def _exactly(fp: BinaryIO, length: int) -> bytes:
    data = fp.read(length) if length else b""
    if len(data) < length:
        raise http.client.IncompleteRead(data, length - len(data))
    return data


def _chunked(fp: BinaryIO) -> bytes:
    parts = []
    while True:
        size_text = _line(fp).split(b";", 1)[0].strip()
        if not _CHUNK_SIZE.fullmatch(size_text):
            raise http.client.HTTPException("malformed chunk size")
        size = int(size_text, 16)
        if size == 0:
            break
        parts.append(_exactly(fp, size))
        if _line(fp) not in _END:
            raise http.client.HTTPException("chunk data longer than its size")
    for _ in range(_MAXHEADERS + 1):  # trailer fields, then the blank line
        if _line(fp) in _END:
            return b"".join(parts)
    raise http.client.HTTPException(f"got more than {_MAXHEADERS} trailer lines")
