"""``/webhooks/{account}`` (delivery receipts) and ``/inbound/{account}`` (SMS replies, STOP)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from .app import ServeContext


def setup(ctx: ServeContext) -> None:
    """Register what these handlers need for the server's life (e.g. a batching receipt writer)."""


async def receipt(request: Request) -> Response:
    return PlainTextResponse("not built yet", status_code=501)


async def inbound(request: Request) -> Response:
    return PlainTextResponse("not built yet", status_code=501)
