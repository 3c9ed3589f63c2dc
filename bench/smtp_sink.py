"""An SMTP sink for benchmarks: accepts every message (aiosmtpd), keeps nothing, counts them.

    python bench/smtp_sink.py      # prints "SMTP_PORT COUNT_PORT", then serves until killed

Connecting to COUNT_PORT returns the number of messages accepted so far as one line of text. The
sink speaks plain SMTP (no STARTTLS, no AUTH), which both smartpush's ``smtp`` driver (``starttls:
false``) and mailmerge (``security = Never``) accept.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.smtp import SMTP


class Counter:
    count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        Counter.count += 1  # one transaction, one message (smartpush and mailmerge send one RCPT each)
        return "250 2.0.0 OK"


async def _report(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(f"{Counter.count}\n".encode())
    await writer.drain()
    writer.close()


async def main() -> None:
    loop = asyncio.get_running_loop()
    handler = Counter()
    smtp = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.bench", enable_SMTPUTF8=True, data_size_limit=None),
        "127.0.0.1",
        0,
        backlog=1024,
    )
    counter = await asyncio.start_server(_report, "127.0.0.1", 0)
    print(smtp.sockets[0].getsockname()[1], counter.sockets[0].getsockname()[1], flush=True)
    await asyncio.gather(smtp.serve_forever(), counter.serve_forever())


if __name__ == "__main__":
    try:
        import uvloop  # the sink must never be the bottleneck

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
