"""A minimal keep-alive HTTP sink for benchmarks: answers every request 200 at once (or after a delay).

    python bench/sink.py [--delay-ms 50]     # prints its port, then serves until killed

It plays the role nginx plays in ../shared/research/http-clients.md (a server that is never the
bottleneck); ``--delay-ms`` mimics a real provider's answer time. Answers, by request line:

- ``POST .../messages:send`` (FCM HTTP v1): ``{"name": "projects/p/messages/123"}``, counted;
- ``POST .../token`` (the OAuth2 token endpoint of a service account): an access token, not counted;
- ``GET /__count``: ``{"count": N}``, the messages received so far (answered at once, never delayed);
- anything else (an SMS webhook): ``{"id": "..."}``, counted.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast


def _answer(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: keep-alive\r\n\r\n"
        + body
    )


RESPONSE = _answer(b'{"id": "00000000-0000-0000-0000-000000000000"}')
FCM_RESPONSE = _answer(b'{"name": "projects/bench-project/messages/0:1700000000000000%00000000"}')
TOKEN_RESPONSE = _answer(b'{"access_token": "ya29.bench", "expires_in": 3600, "token_type": "Bearer"}')


class Sink(asyncio.Protocol):
    delay_s = 0.0
    count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            line_end = self.buffer.find(b"\r\n")
            line = self.buffer[:line_end]
            head = self.buffer[:end].lower()
            i = head.find(b"content-length:")
            size = 0
            if i >= 0:
                j = head.find(b"\r\n", i)
                size = int(head[i + 15 : j if j > 0 else None])
            if len(self.buffer) < end + 4 + size:
                return
            self.buffer = self.buffer[end + 4 + size :]
            if line.startswith(b"GET /__count"):
                self.transport.write(_answer(b'{"count": %d}' % Sink.count))
                continue
            if line.endswith(b"/token HTTP/1.1"):
                response = TOKEN_RESPONSE
            else:
                Sink.count += 1
                response = FCM_RESPONSE if b"/messages:send" in line else RESPONSE
            if self.delay_s:
                asyncio.get_running_loop().call_later(self.delay_s, self._answer, response)
            else:
                self.transport.write(response)

    def _answer(self, response: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(response)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    args = ap.parse_args()
    Sink.delay_s = args.delay_ms / 1000
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop  # the sink must never be the bottleneck

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
