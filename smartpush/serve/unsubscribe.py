"""``/unsubscribe/{token}``: the confirmation page (GET) and RFC 8058 one-click (POST).

* GET (and HEAD) only shows a page with a button: mail scanners and link previewers fetch every link
  of a message, so following the link must never unsubscribe anyone.
* POST is the one-click request, exactly as Gmail and Yahoo send it (``List-Unsubscribe=One-Click``,
  ``application/x-www-form-urlencoded`` or ``multipart/form-data``, no cookie, no authentication), and
  also what the page's button sends. The token's (channel, address hash) goes on the suppression list
  with reason ``opt-out`` and source ``unsubscribe:<campaign>``; the answer is a 200 page, never a
  redirect, and a second POST is answered the same way.
* A token that is not ours (damaged, forged, made with another key) is a 404 page that says nothing
  of why. Tokens carry everything the opt-out needs, so they keep working after ``purge``.

Neither the token nor the address hash reaches a log: lines name the channel and the campaign only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import Response

from ..ledger import Suppression
from ..unsubscribe import read_token
from . import pages
from .app import ServeContext

__all__ = ["ONE_CLICK", "unsubscribe"]

log = logging.getLogger("smartpush.serve.unsubscribe")

#: The one field of an RFC 8058 POST.
ONE_CLICK = ("List-Unsubscribe", "One-Click")
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_CHANNELS = frozenset({"email", "sms", "push"})
#: Tokens we make are about 150 characters; anything much longer is not ours (and is not hashed).
_MAX_TOKEN = 512


@dataclass(frozen=True)
class Target:
    """What a valid token unsubscribes."""

    campaign: str
    channel: str
    address_hash: str


def read_target(key: bytes, token: str) -> Target | None:
    """The token's target if we signed it and it is complete, else None."""
    if len(token) > _MAX_TOKEN:
        return None
    data = read_token(key, token)
    if data is None:
        return None
    campaign, channel, address_hash = data.get("c"), data.get("ch"), data.get("h")
    if not (isinstance(campaign, str) and isinstance(address_hash, str) and campaign and address_hash):
        return None
    if channel not in _CHANNELS:
        return None
    return Target(campaign, str(channel), address_hash)


async def unsubscribe(request: Request) -> Response:
    ctx: ServeContext = request.app.state.ctx
    target = read_target(ctx.key, request.path_params["token"])
    if target is None:
        return pages.not_found()
    if request.method != "POST":
        return pages.confirm(target.campaign, target.channel)
    if not await _is_one_click(request):
        return pages.bad_request()
    entry = Suppression(
        channel=target.channel,
        address_hash=target.address_hash,
        reason="opt-out",
        source=f"unsubscribe:{target.campaign}",
        created_at=datetime.now(UTC),
    )
    try:
        added = await run_in_threadpool(ctx.ledger.suppress, [entry])
    except Exception as exc:  # the ledger is out of reach: say so, the mail client may try again
        log.error(
            "unsubscribe (%s, campaign %s) not recorded: the ledger failed (%s)",
            target.channel,
            target.campaign,
            type(exc).__name__,
        )
        return pages.unavailable()
    log.info(
        "unsubscribe: %s opt-out %s (campaign %s)",
        target.channel,
        "recorded" if added else "already on the list",
        target.campaign,
    )
    return pages.done(target.campaign, target.channel)


async def _is_one_click(request: Request) -> bool:
    """Whether the body is a form holding ``List-Unsubscribe=One-Click`` (and nothing like a file)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type not in _FORM_TYPES:
        return False
    await request.body()  # the whole body first (capped by RequestLimits: 413 past it), then parsed
    try:
        async with request.form(max_files=0, max_fields=16, max_part_size=1024) as form:
            return _has_one_click(form)
    except (HTTPException, MultiPartException):  # a malformed form (no boundary, a file, a huge part)
        return False


def _has_one_click(form: FormData) -> bool:
    name, expected = ONE_CLICK
    value = form.get(name)
    return isinstance(value, str) and value.strip() == expected
