"""``/unsubscribe/{token}``: the confirmation page (GET) and RFC 8058 one-click (POST)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response


async def unsubscribe(request: Request) -> Response:
    return PlainTextResponse("not built yet", status_code=501)
