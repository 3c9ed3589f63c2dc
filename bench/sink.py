"""A minimal keep-alive HTTP sink for benchmarks: answers every request 200 {"id": "..."}.

    python bench/sink.py [--delay-ms 50]     # prints its port, then serves until killed

It plays the role nginx plays in ../shared/research/http-clients.md (a server that is never the
bottleneck); ``--delay-ms`` mimics a real provider's answer time.
"""

from __future__ import annotations

import argparse
import asyncio

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 46\r\n"
    b"Connection: keep-alive\r\n\r\n" + b'{"id": "00000000-0000-0000-0000-000000000000"}'
)


class Sink(asyncio.Protocol):
    delay_s = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            i = head.find(b"content-length:")
            size = 0
            if i >= 0:
                j = head.find(b"\r\n", i)
                size = int(head[i + 15 : j if j > 0 else None])
            if len(self.buffer) < end + 4 + size:
                return
            self.buffer = self.buffer[end + 4 + size :]
            if self.delay_s:
                asyncio.get_running_loop().call_later(self.delay_s, self._answer)
            else:
                self.transport.write(RESPONSE)

    def _answer(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(RESPONSE)


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
    asyncio.run(main())
