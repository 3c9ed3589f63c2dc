"""The ASGI application of ``smartpush serve`` (Starlette), and what its handlers share.

Routes:

* ``GET /healthz`` — the ledger and the broker answer (200) or not (503).
* ``GET /metrics`` — Prometheus text (every smartpush process of the host in multiprocess mode).
* ``GET|POST /unsubscribe/{token}`` — GET: a French confirmation page; POST: RFC 8058 one-click.
* ``GET|POST /webhooks/{account}`` — delivery receipts of a provider account.
* ``GET|POST /inbound/{account}`` — SMS replies of a provider account: ``STOP``/``ARRET`` opt out.

Every handler reaches the shared state through ``request.app.state.ctx`` (:class:`ServeContext`).
Every request goes through :class:`~smartpush.serve.limits.RequestLimits` first: a capped body, 500
without detail for an unhandled exception, security headers, and an access line that names the route
template, never the path (tokens and secrets travel in paths and query strings).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from ..config import Config
from ..ledger import Ledger

__all__ = ["ServeContext", "create_app"]

Hook = Callable[[], Awaitable[None]]


@dataclass
class ServeContext:
    """What every request handler shares: the config, the ledger, the secret key, start/stop hooks."""

    config: Config
    ledger: Ledger
    key: bytes
    #: Run when the server starts and stops (e.g. a background writer); handlers' modules add theirs.
    on_startup: list[Hook] = field(default_factory=list)
    on_shutdown: list[Hook] = field(default_factory=list)
    #: Anything a handler module keeps for the life of the server, by name.
    extras: dict[str, Any] = field(default_factory=dict)


def create_app(config: Config, *, ledger: Ledger | None = None) -> Starlette:
    """The application for ``config``; ``ledger`` defaults to the configured one (migrated)."""
    from ..runtime import open_ledger
    from . import health, unsubscribe, webhooks
    from .limits import RequestLimits

    if ledger is None:
        ledger = open_ledger(config)
    ctx = ServeContext(config=config, ledger=ledger, key=config.secret_key())
    webhooks.setup(ctx)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        for hook in ctx.on_startup:
            await hook()
        try:
            yield
        finally:
            for hook in ctx.on_shutdown:
                await hook()

    routes = [
        Route("/healthz", health.healthz, methods=["GET"]),
        Route("/metrics", health.metrics, methods=["GET"]),
        Route("/unsubscribe/{token}", unsubscribe.unsubscribe, methods=["GET", "POST"]),
        Route("/webhooks/{account}", webhooks.receipt, methods=["GET", "POST"]),
        Route("/inbound/{account}", webhooks.inbound, methods=["GET", "POST"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(RequestLimits)], lifespan=lifespan)
    app.state.ctx = ctx
    return app
