"""The transport's own HTTP/1.1 exchange (cxone/http1.py): what it writes is what http.client wrote,
and it reads an answer at least as strictly (CONTRACT.md section 3: a partial or malformed answer
is never taken for a whole one)."""

import http.client
import io

import pytest

from dtmf_service.cxone.http1 import Headers, host_header, read_answer, request_bytes


class _Capture:
    """A socket stand-in for http.client: records what it would send."""

    def __init__(self) -> None:
        self.sent = b""

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def settimeout(self, _timeout: float) -> None:
        pass


def _http_client_bytes(host: str, method: str, target: str, body: bytes | None, headers: dict[str, str]) -> bytes:
    conn = http.client.HTTPConnection(host)
    capture = _Capture()
    conn.sock = capture  # type: ignore[assignment]
    conn.request(method, target, body=body, headers=headers)
    return capture.sent


@pytest.mark.parametrize(
    ("host", "method", "target", "body", "headers"),
    [
        ("127.0.0.1:9100", "POST", "/api/v2/interactions/call-1/dtmf", b'{"digits":"12#","timeout":5000}',
         {"Authorization": "Bearer t", "Content-Type": "application/json", "Accept": "application/json",
          "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}),
        ("cxone.example:443", "POST", "/oauth/token", b"grant_type=client_credentials&client_id=a%26b",
         {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}),
        ("example.com", "GET", "/.well-known/cxone-configuration?tenant=x", None, {"Accept": "application/json"}),
        ("[::1]:8080", "POST", "/x", None, {}),
    ],
)  # fmt: skip
def test_the_request_is_byte_for_byte_what_http_client_writes(host, method, target, body, headers):
    conn = http.client.HTTPConnection(host)
    assert request_bytes(method, target, host_header(conn), body, headers) == _http_client_bytes(
        host, method, target, body, headers
    )


def test_default_port_and_idna_host_lines():
    assert host_header(http.client.HTTPSConnection("cxone.example")) == b"Host: cxone.example\r\n"
    assert host_header(http.client.HTTPSConnection("cxone.example:8443")) == b"Host: cxone.example:8443\r\n"
    assert host_header(http.client.HTTPConnection("bücher.example")) == b"Host: xn--bcher-kva.example\r\n"


@pytest.mark.parametrize(
    "headers", [{"Authorization": "Bearer t\r\nX-Injected: 1"}, {"Bad Name": "x"}, {"X": "a\nb"}, {"X": "a\0b"}]
)
def test_a_header_that_would_split_the_request_is_refused_before_writing(headers):
    with pytest.raises(ValueError):
        request_bytes("POST", "/x", b"Host: h\r\n", b"{}", headers)


def test_a_target_with_a_control_character_or_space_is_refused():
    with pytest.raises(http.client.InvalidURL):
        request_bytes("POST", "/a b", b"Host: h\r\n", b"{}", {})


class _Trickle(io.RawIOBase):
    """A stream that gives one byte per read, as a peer sending byte by byte."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self._data:
            return 0
        buffer[0:1], self._data = self._data[:1], self._data[1:]
        return 1


def _read(raw: bytes, method: str = "POST") -> tuple[int, Headers, bytes, bool]:
    """The answer read from a buffer holding all of it and from a stream giving a byte at a time:
    both readings must agree."""
    at_once = read_answer(io.BufferedReader(io.BytesIO(raw)), method)
    by_lines = read_answer(io.BufferedReader(_Trickle(raw)), method)
    assert (at_once[0], at_once[1].items(), at_once[2:]) == (by_lines[0], by_lines[1].items(), by_lines[2:])
    return at_once


def test_content_length_framing_and_headers():
    status, headers, body, will_close = _read(
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After:  2 \r\n"
        b"retry-after: 9\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert (status, body, will_close) == (429, b"{}", False)
    assert headers.get("RETRY-AFTER") == "2"  # case-insensitive, the first value, trimmed
    assert headers.get("missing") is None
    assert ("Content-Type", "application/json") in headers.items()


def test_chunked_body_with_extensions_and_trailers():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n1\r\n!\r\n0\r\nX-T: 1\r\n\r\n"
    assert _read(raw)[2] == b"hello!"


def test_informational_answers_are_skipped():
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + (
        b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
    )
    assert _read(raw)[0] == 202


def test_connection_rules_as_http_client():
    assert _read(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")[3] is True
    assert _read(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")[3] is True
    assert _read(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")[3] is False
    status, _, body, will_close = _read(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    assert (body, will_close) == (b"until the end", True)  # no framing: the end of the connection frames it
    assert _read(b"HTTP/1.1 204 No Content\r\n\r\n")[2] == b""
    assert _read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", method="HEAD")[2] == b""


def test_lines_may_end_in_lf_alone():
    status, headers, body, _ = _read(b"HTTP/1.1 200 OK\nX: a\nY: b\r\nContent-Length: 2\n\n{}")
    assert (status, headers.items(), body) == (200, [("X", "a"), ("Y", "b"), ("Content-Length", "2")], b"{}")


def test_an_obsolete_folded_header_is_joined_with_a_space():
    raw = b"HTTP/1.1 503 Busy\r\nRetry-After: 1\r\nX-Long: a\r\n  b\r\nContent-Length: 0\r\n\r\n"
    assert _read(raw)[1].get("x-long") == "a b"


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # closed before answering
        b"HTTP/1.1 200 OK",  # the status line cut by end of file
        b"HTTP/1.1 200 OK\r\nContent-Len",  # a header line cut
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",  # the header block never ended
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{}",  # shorter than announced
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1_0\r\n\r\n0123456789",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",  # a chunk cut
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",  # longer than its size
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nhi\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",  # no blank line after the last chunk
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n....",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 099 Odd\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n continued first\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 101 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 0\r\n\r\n",  # a bare CR inside a header line
    ],
)
def test_a_partial_or_malformed_answer_is_an_error(raw):
    with pytest.raises(http.client.HTTPException):
        read_answer(io.BufferedReader(io.BytesIO(raw)), "POST")
    with pytest.raises(http.client.HTTPException):
        read_answer(io.BufferedReader(_Trickle(raw)), "POST")
