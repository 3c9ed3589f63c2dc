"""``/healthz`` and ``/metrics``.

``/healthz`` answers 200 ``{"status": "ok", "ledger": "ok", "broker": "ok"}`` when the ledger answers a
trivial query and the broker (Redis, when ``broker:`` is set; ``"embedded"`` otherwise) answers PING,
each within a few seconds; else 503 with the part that failed marked ``"unreachable"``. Neither the
answer nor the log line names a URL, a host or a password: only the part and the exception's type.

``/metrics`` is Prometheus text. With ``PROMETHEUS_MULTIPROC_DIR`` set, a fresh registry reads every
smartpush process's files there (workers, embedded sends, this server): the host's whole picture.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .app import ServeContext

__all__ = ["healthz", "metrics"]

log = logging.getLogger("smartpush.serve.health")

#: How long each part may take to answer before it counts as unreachable.
LEDGER_TIMEOUT_S = 3.0
BROKER_TIMEOUT_S = 2.0
OK, UNREACHABLE, EMBEDDED = "ok", "unreachable", "embedded"


async def healthz(request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctx
    ledger, broker = await asyncio.gather(_ledger(ctx), _broker(ctx))
    healthy = ledger == OK and broker in (OK, EMBEDDED)
    body = {"status": "ok" if healthy else "unavailable", "ledger": ledger, "broker": broker}
    return JSONResponse(body, status_code=200 if healthy else 503)


async def _ledger(ctx: ServeContext) -> str:
    loop = asyncio.get_running_loop()
    try:
        # A primary-key lookup of a run id that never exists: one round trip, nothing read.
        await asyncio.wait_for(loop.run_in_executor(None, ctx.ledger.get_run, "-healthz-"), LEDGER_TIMEOUT_S)
    except Exception as exc:
        log.warning("healthz: the ledger does not answer (%s)", type(exc).__name__)
        return UNREACHABLE
    return OK


async def _broker(ctx: ServeContext) -> str:
    url = ctx.config.settings.broker
    if url is None:
        return EMBEDDED
    import redis.asyncio

    client: Any = None
    try:
        client = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=BROKER_TIMEOUT_S, socket_timeout=BROKER_TIMEOUT_S
        )
        await asyncio.wait_for(client.ping(), BROKER_TIMEOUT_S + 0.5)
    except Exception as exc:  # redis errors, a timeout, a URL redis cannot read
        log.warning("healthz: the broker does not answer (%s)", type(exc).__name__)
        return UNREACHABLE
    finally:
        if client is not None:
            await client.aclose()
    return OK


def _registry(ctx: ServeContext) -> CollectorRegistry:
    """Built once: every smartpush process's metrics (multiprocess folder) or this one's, plus the live
    gauges (runs in progress, queue lengths) read from the ledger and the broker at each scrape."""
    registry = ctx.extras.get("metrics_registry")
    if registry is None:
        from ..metrics import endpoint_registry

        registry = ctx.extras["metrics_registry"] = endpoint_registry(ctx.ledger, ctx.config.settings.broker)
    assert isinstance(registry, CollectorRegistry)  # noqa: S101 - only this function stores it
    return registry


async def metrics(request: Request) -> Response:
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    body = await run_in_threadpool(encoder, _registry(request.app.state.ctx))
    return Response(body, headers={"Content-Type": content_type})
