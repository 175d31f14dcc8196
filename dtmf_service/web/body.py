"""Reading and parsing the request body: size, media type, strict JSON."""

from __future__ import annotations

import json
import threading
from typing import Any

from gunicorn.http.errors import NoMoreData, ParseException
from werkzeug.exceptions import RequestEntityTooLarge


class BadRequest(Exception):
    """The body is not a UTF-8 JSON object: 400 invalid_request."""


class UnsupportedMediaType(Exception):
    """Content-Type is not application/json: 415."""


class BodyIncomplete(Exception):
    """The body stopped short of its Content-Length (the caller stalled or hung up): 408."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        # Two parsers could disagree on which value wins: refuse instead of guessing.
        raise ValueError("duplicate key in JSON object")
    return result


_local = threading.local()


def _decoder() -> json.JSONDecoder:
    """This thread's strict decoder. json.loads with hooks builds a decoder and its scanner per call;
    one per thread keeps a scanner's key memo to the thread that parses."""
    decoder: json.JSONDecoder | None = getattr(_local, "decoder", None)
    if decoder is None:
        decoder = _local.decoder = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    return decoder


def read_body(environ: dict[str, Any], max_body: int) -> bytes:
    """The raw body, straight from the WSGI environ (werkzeug's request properties cost more here).

    RequestEntityTooLarge over ``max_body``, UnsupportedMediaType unless application/json.
    """
    length_text = environ.get("CONTENT_LENGTH") or ""
    length = max(int(length_text), 0) if length_text.isdigit() else None
    if length is not None and length > max_body:
        raise RequestEntityTooLarge()
    if environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower() != "application/json":
        raise UnsupportedMediaType()
    stream = environ["wsgi.input"]
    try:
        if length is None:
            # Chunked: read one byte past the limit (werkzeug would silently cut the body at it).
            return _read_limited(stream, max_body) if environ.get("wsgi.input_terminated") else b""
        body = _read_exact(stream, length)
    except ParseException:
        # gunicorn found a bad chunk size, extension or terminator: the caller's fault, not ours (never 500).
        raise BadRequest("malformed chunked request body") from None
    except NoMoreData:
        raise BodyIncomplete() from None
    if len(body) < length:
        raise BodyIncomplete()
    return body


def _read_exact(stream: Any, length: int) -> bytes:
    """Never read past Content-Length: some servers hand over the raw socket."""
    chunks, left = [], length
    while left > 0 and (chunk := stream.read(min(65536, left))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_limited(stream: Any, limit: int) -> bytes:
    chunks, total = [], 0
    while chunk := stream.read(min(65536, limit + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise RequestEntityTooLarge()
    return b"".join(chunks)


def parse_object(raw: bytes) -> dict[str, Any]:
    """A UTF-8 JSON object, strictly: no duplicate keys, no NaN or Infinity; else BadRequest."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("body is not valid UTF-8") from None
    try:
        data = _decoder().decode(text)  # json.loads(text, parse_constant=..., object_pairs_hook=...)
    except RecursionError:
        raise BadRequest("body is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        reason = "duplicate key in JSON object" if "duplicate key" in str(exc) else "body is not valid JSON"
        raise BadRequest(reason) from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    if _too_deep(data):
        # Deep values pass json.loads but blow the recursion limit of whatever serialises them next.
        raise BadRequest(f"body is not valid JSON: nested deeper than {MAX_DEPTH} levels")
    return data


MAX_DEPTH = 32


def _too_deep(data: Any) -> bool:
    """Iterative depth check: a request's five fields cost five steps."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return False
