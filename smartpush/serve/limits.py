"""What every request to ``smartpush serve`` goes through: limits, errors, headers, the access log.

:class:`RequestLimits` is a pure ASGI middleware around the whole application:

* Bodies are capped at :data:`MAX_BODY_BYTES`. A ``Content-Length`` above the cap is answered 413 before
  anything is read; a body sent in chunks is counted as it arrives and cut off with 413 once it passes
  the cap, whatever the handler makes of the cut. A ``Content-Length`` that is not a number is 400.
* An exception a handler lets escape is answered 500 with a generic body, and logged with the method,
  the route template and the exception's type: never its message or stack, which may hold what the
  client sent (an address, a token).
* Every answer carries security headers (no sniffing, no referrer, no framing, no caching, and a
  Content-Security-Policy that allows nothing, unless the answer brings its own).
* One access line per request: method, route *template* (``/unsubscribe/{token}``, never the path or
  the query string, which carry tokens and shared secrets), status and duration. No client address
  either: it is personal data, and behind a reverse proxy it is the proxy's anyway.

Unrouted methods get 405 and malformed bodies 400 from the routes and handlers themselves.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["MAX_BODY_BYTES", "BodyTooLarge", "RequestLimits", "route_template"]

#: The largest request body accepted: receipts, STOP replies and one-click posts are a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024

access_log = logging.getLogger("smartpush.serve.access")
error_log = logging.getLogger("smartpush.serve")

_SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
]


class BodyTooLarge(Exception):
    """The request body passed :data:`MAX_BODY_BYTES` while a handler was reading it."""


def route_template(scope: Scope) -> str:
    """The matched route's template (``/webhooks/{account}``), or ``(no route)``: never the real path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "(no route)"


def _with_security_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    present = {name.lower() for name, _ in headers}
    return [*headers, *((n, v) for n, v in _SECURITY_HEADERS if n not in present)]


class RequestLimits:
    """The middleware described in the module docstring."""

    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        method = str(scope.get("method", "?"))
        status = 0
        started = False  # whether an answer's first message went out
        too_large = False
        received = 0

        async def answer(code: int, text: str) -> None:
            nonlocal status, started
            body = text.encode()
            headers = [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            started, status = True, code
            await send(
                {"type": "http.response.start", "status": code, "headers": _with_security_headers(headers)}
            )
            await send({"type": "http.response.body", "body": body})

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal status, started
            if too_large and not started:
                return  # the handler's answer to a cut-off body is replaced by 413
            if message["type"] == "http.response.start":
                started, status = True, int(message["status"])
                message = {**message, "headers": _with_security_headers(list(message.get("headers", [])))}
            await send(message)

        try:
            declared = _content_length(scope)
            if declared == -1:
                await answer(400, "Bad Request: Content-Length is not a number\n")
            elif declared is not None and declared > self.max_body:
                await answer(413, f"Payload Too Large: at most {self.max_body} bytes\n")
            else:
                try:
                    await self.app(scope, limited_receive, guarded_send)
                except Exception as exc:
                    if not too_large:
                        error_log.error(
                            "%s %s failed: %s (answered 500)",
                            method,
                            route_template(scope),
                            type(exc).__name__,
                        )
                        if not started:
                            await answer(500, "Internal Server Error\n")
                if too_large and not started:
                    await answer(413, f"Payload Too Large: at most {self.max_body} bytes\n")
        finally:
            elapsed_ms = (time.perf_counter() - began) * 1000
            access_log.info(
                "%s %s %s %.1f ms", method, route_template(scope), status or "(no answer)", elapsed_ms
            )


def _content_length(scope: Scope) -> int | None:
    """The declared body length; None when absent, -1 when it is not a number."""
    headers: Any = scope.get("headers") or []
    for name, value in headers:
        if name.lower() == b"content-length":
            text = bytes(value).strip()
            return int(text) if text.isdigit() else -1
    return None
