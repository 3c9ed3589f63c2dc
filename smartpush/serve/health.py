"""``/healthz`` and ``/metrics``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response


async def healthz(request: Request) -> Response:
    return PlainTextResponse("not built yet", status_code=501)


async def metrics(request: Request) -> Response:
    return PlainTextResponse("not built yet", status_code=501)
