"""``outbox``: writes each message to a local folder instead of sending it (demos, staging, audits).

Files land in ``PATH/RUN_ID/CHANNEL/MESSAGE_ID``: ``.eml`` with the exact RFC 5322 bytes an SMTP
server would receive for email, ``.json`` with ``to``, ``body`` (and ``title``, ``data`` for push)
for SMS and push.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, ClassVar

from smartpush.email import email_bytes
from smartpush.provider import (
    Channel,
    OutboundMessage,
    Provider,
    ProviderOptions,
    SendResult,
    SmsProviderOptions,
)


class OutboxOptions(SmsProviderOptions):
    """An outbox account: ``path`` is relative to the project folder; SMS options work as for real SMS."""

    path: str = "outbox"


class OutboxProvider(Provider):
    """Writes messages to files; serves every channel."""

    channels: ClassVar[frozenset[Channel]] = frozenset(Channel)
    Options: ClassVar[type[ProviderOptions]] = OutboxOptions

    def __init__(self, account: str, options: ProviderOptions, **context: Any) -> None:
        super().__init__(account, options, **context)
        assert isinstance(options, OutboxOptions)  # noqa: S101 - the registry guarantees it
        base = Path(context.get("project_dir", "."))
        self.root = base / options.path

    async def send(self, message: OutboundMessage) -> SendResult:
        folder = self.root / message.run_id / message.channel.value
        if message.channel is Channel.EMAIL:
            path, payload = folder / f"{message.message_id}.eml", email_bytes(message)[0]
        else:
            record: dict[str, Any] = {"to": message.to, "body": message.body}
            if message.channel is Channel.PUSH:
                record.update(title=message.title, data=message.data)
            elif message.sender:
                record["from"] = message.sender
            path = folder / f"{message.message_id}.json"
            payload = json.dumps(record, ensure_ascii=False, indent=2).encode()
        await asyncio.to_thread(_write, path, payload)
        return SendResult(provider_reference=f"outbox:{message.message_id}")


def _write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
