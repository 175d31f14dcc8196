"""A fake CXone that costs almost nothing per request: asyncio, HTTP/1.1 keep-alive, fixed answers.

    python -m bench.upstream --port 9100 --delay-ms 50

Token endpoints answer a token; DTMF endpoints answer 200 (tutorial) or 202 (agent) after the delay.
Interaction ids starting "burst-" answer 429 with Retry-After: 1 (the retry scenario).
A path ending /audit is a webhook receiver, answered at once (a receiver is not CXone: no delay).
POST /_bench/delay/<ms> changes the delay while it runs (one upstream for a whole run).
"""

from __future__ import annotations

import argparse
import asyncio

TOKEN = b'{"access_token":"bench-token","token_type":"bearer","expires_in":86400}'
OK = b'{"status":"accepted"}'


def _response(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n"
        + extra
        + b"\r\n"
        + body
    )


class Upstream(asyncio.Protocol):
    delay_s = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < head_end + 4 + length:
                return
            self.buffer = self.buffer[head_end + 4 + length :]
            path = head.split(b" ", 2)[1]
            self._answer(path)

    def _answer(self, path: bytes) -> None:
        if path.endswith(b"/token"):
            self.transport.write(_response(b"200 OK", TOKEN))
            return
        if path.startswith(b"/_bench/delay/"):
            Upstream.delay_s = float(path.rsplit(b"/", 1)[1]) / 1000.0
            self.transport.write(_response(b"200 OK", OK))
            return
        if path.endswith(b"/audit"):
            self.transport.write(_response(b"200 OK", OK))
            return
        if b"/burst-" in path:
            answer = _response(b"429 Too Many Requests", b"{}", b"Retry-After: 1\r\n")
        elif path.endswith(b"/send-dtmf"):
            answer = _response(b"202 Accepted", OK)
        else:
            answer = _response(b"200 OK", OK)
        if self.delay_s:
            asyncio.get_running_loop().call_later(self.delay_s, self._write, answer)
        else:
            self.transport.write(answer)

    def _write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)


async def serve(host: str, port: int, delay_ms: float) -> None:
    Upstream.delay_s = delay_ms / 1000.0
    server = await asyncio.get_running_loop().create_server(Upstream, host, port, backlog=1024)
    print(f"fake CXone on http://{host}:{port} delay {delay_ms} ms", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port, args.delay_ms))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
