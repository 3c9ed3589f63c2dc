"""``/webhooks/{account}`` (delivery receipts) and ``/inbound/{account}`` (SMS replies, STOP).

Both take GET (fields in the query string) and POST (a form, multipart or JSON body) for any provider
account whose driver reads them (:attr:`~smartpush.provider.Provider.webhooks`); another account, or
an unknown one, is 404. A request goes, in order, through:

1. **Authentication**, by the account's driver (:meth:`~smartpush.provider.Provider.verify_webhook`):
   the provider's own signature (Twilio ``X-Twilio-Signature``, Vonage ``sig``) or the account's
   ``webhook_secret`` as ``?token=`` or a bearer token. Unsigned or forged: 403 without detail. An
   account that has no way to authenticate is refused alike (403), and the log says which option to
   set (once a minute per account).
2. **Reading**: a body that is not what its ``Content-Type`` says, or that the driver cannot read, is
   400 without detail.
3. **Receipts** go to the :class:`~smartpush.receipts.ReceiptWriter`; the answer (200, a JSON count:
   ``stored``, ``applied``, ``pending``, ``ignored``) is sent once they are committed, so a provider
   that got 200 knows they are stored. A ledger that cannot be reached is 503: providers try again.
4. **Replies**: one that is a STOP (:func:`~smartpush.receipts.is_stop`) puts the sender's number on
   the ``sms`` suppression list (reason ``opt-out``, source the account); any other is counted and
   dropped unread. The answer is what the provider expects (Twilio: an empty TwiML ``<Response/>``).

Nothing a provider sends (numbers, texts, references, tokens) reaches a log line or an answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response

from .. import registry
from ..addresses import normalise_phone
from ..errors import ConfigError, InfrastructureError, RecipientError
from ..ledger import Suppression
from ..metrics import INBOUND_SMS, RECEIPTS
from ..provider import Provider, WebhookRequest
from ..receipts import IncomingReceipt, ReceiptWriter, is_stop
from ..unsubscribe import recipient_hash
from .app import ServeContext

__all__ = ["Webhooks", "inbound", "receipt", "setup"]

log = logging.getLogger("smartpush.serve.webhooks")

#: Fields a form or query string may carry: a provider sends a few dozen at most.
MAX_FIELDS = 200
#: How often the same refusal of an account is logged again.
LOG_EVERY_S = 60.0
_EXTRA = "webhooks"
_JSON_TYPES = ("application/json", "text/json")
_FORM_TYPE = "application/x-www-form-urlencoded"


class Malformed(ValueError):
    """The request body is not what its Content-Type says."""


class Webhooks:
    """What the two routes share for the life of the server: drivers, the receipt writer."""

    def __init__(self, ctx: ServeContext) -> None:
        self.ctx = ctx
        self.writer = ReceiptWriter(ctx.ledger, ctx.key)
        self._drivers: dict[str, Provider] = {}
        self._logged: dict[tuple[str, str], tuple[float, int]] = {}

    async def start(self) -> None:
        await self.writer.start()

    async def stop(self) -> None:
        await self.writer.stop()
        for driver in self._drivers.values():
            await driver.close()

    def driver(self, account: str, kind: str) -> Provider | None:
        """The driver of a configured account that takes ``kind`` (made once); else ``None``."""
        found = self._drivers.get(account)
        if found is None:
            options = self.ctx.config.accounts.get(account)
            if options is None:
                return None
            cls = registry.driver(options.type)
            if kind not in cls.webhooks:
                return None
            found = self._drivers[account] = cls(account, options, project_dir=self.ctx.config.project_dir)
        return found if kind in found.webhooks else None

    # -- the two routes ------------------------------------------------------------------------------

    async def receipt(self, request: Request) -> Response:
        read = await self._read(request, "receipts")
        if isinstance(read, Response):
            return read
        account, driver, hook = read
        try:
            receipts = driver.parse_receipts(hook)
        except ValueError:
            return Response(status_code=400)
        if not receipts:
            RECEIPTS.labels(provider=account, outcome="ignored").inc()
            return _json({"stored": 0, "applied": 0, "pending": 0, "ignored": 1})
        now = datetime.now(UTC)
        try:
            settled = await self.writer.submit([IncomingReceipt(account, r, now) for r in receipts])
        except (InfrastructureError, RuntimeError) as exc:  # the ledger is out of reach, or we are stopping
            self._log_throttled(
                account,
                "unavailable",
                "account %s: receipts not stored (%s): answered 503",
                type(exc).__name__,
            )
            return Response(status_code=503)
        applied = sum(1 for s in settled if s.changed)
        pending = sum(1 for s in settled if s.message is None)
        return _json({"stored": len(settled), "applied": applied, "pending": pending, "ignored": 0})

    async def inbound(self, request: Request) -> Response:
        read = await self._read(request, "inbound")
        if isinstance(read, Response):
            return read
        account, driver, hook = read
        try:
            sms = driver.parse_inbound(hook)
        except ValueError:
            return Response(status_code=400)
        answer = driver.inbound_answer()
        reply = Response(answer.body, status_code=answer.status, media_type=answer.media_type)
        if sms is None or not is_stop(sms.text):
            INBOUND_SMS.labels(provider=account, outcome="other").inc()
            return reply
        try:
            phone = normalise_phone(sms.sender, self.ctx.config.settings.region)
        except RecipientError:
            INBOUND_SMS.labels(provider=account, outcome="unreadable").inc()
            log.info(
                "account %s: a STOP reply came from a sender that is not a mobile number: ignored",
                account,
                extra={"provider": account, "outcome": "unreadable"},
            )
            return reply
        entry = Suppression(
            "sms", recipient_hash(self.ctx.key, "sms", phone), "opt-out", account, datetime.now(UTC)
        )
        try:
            await asyncio.to_thread(self.ctx.ledger.suppress, [entry])
        except InfrastructureError as exc:
            self._log_throttled(
                account,
                "unavailable",
                "account %s: a STOP reply not stored (%s): answered 503",
                type(exc).__name__,
            )
            return Response(status_code=503)
        INBOUND_SMS.labels(provider=account, outcome="stop").inc()
        log.info(
            "account %s: a STOP reply put a number on the sms suppression list",
            account,
            extra={"provider": account, "outcome": "stop"},
        )
        return reply

    # -- reading and authenticating a request -------------------------------------------------------

    async def _read(self, request: Request, kind: str) -> tuple[str, Provider, WebhookRequest] | Response:
        account = request.path_params["account"]
        driver = self.driver(account, kind)
        if driver is None:
            return Response(status_code=404)
        body = await request.body()
        query = (
            parse_qs(
                request.scope.get("query_string", b"").decode("latin-1"),
                keep_blank_values=True,
                max_num_fields=MAX_FIELDS,
            )
            if request.scope.get("query_string")
            else {}
        )
        malformed = False
        form: dict[str, list[str]] = {}
        document: Any = None
        try:
            form, document = await _body(request, body)
        except ValueError:
            malformed = True
        hook = WebhookRequest(
            method=request.method,
            url=self._public_url(request),
            headers={k.lower(): v for k, v in request.headers.items()},
            query=query,
            form=form,
            json=document,
        )
        try:
            genuine = driver.verify_webhook(hook)
        except ConfigError as exc:
            self._log_throttled(account, "unconfigured", "%s", str(exc), level=logging.ERROR)
            return Response(status_code=403)
        if not genuine:
            self._log_throttled(
                account, "forged", "account %s: a %s request failed authentication: 403", account, kind
            )
            return Response(status_code=403)
        if malformed:
            return Response(status_code=400)
        return account, driver, hook

    def _public_url(self, request: Request) -> str | None:
        """The URL the provider called: ``public_url`` + path + query string, as sent."""
        base = self.ctx.config.settings.public_url
        if base is None:
            return None
        query = request.scope.get("query_string", b"").decode("latin-1")
        return base + request.url.path + (f"?{query}" if query else "")

    def _log_throttled(
        self, account: str, what: str, message: str, *args: Any, level: int = logging.WARNING
    ) -> None:
        """Log ``message`` at most once every :data:`LOG_EVERY_S` per account and kind, with a count."""
        now = time.monotonic()
        last, skipped = self._logged.get((account, what), (0.0, 0))
        if last and now - last < LOG_EVERY_S:
            self._logged[account, what] = (last, skipped + 1)
            return
        self._logged[account, what] = (now, 0)
        suffix = f" ({skipped} more like it since the last line)" if skipped else ""
        log.log(
            level,
            "%s%s",
            message % args,
            suffix,
            extra={"provider": account, "outcome": what, "skipped": skipped},
        )


async def _body(request: Request, body: bytes) -> tuple[dict[str, list[str]], Any]:
    """(form fields, JSON document) of a body; ``ValueError`` when it is not what its type says."""
    if not body:
        return {}, None
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media in _JSON_TYPES or media.endswith("+json"):
        try:
            return {}, json.loads(body)
        except (ValueError, RecursionError):
            raise Malformed("not JSON") from None
    if media in (_FORM_TYPE, ""):
        try:
            text = body.decode("utf-8").rstrip("&")
            return parse_qs(
                text, keep_blank_values=True, strict_parsing=True, max_num_fields=MAX_FIELDS
            ), None
        except ValueError:
            raise Malformed("not a form") from None
    if media == "multipart/form-data":
        try:
            form = await request.form(max_files=0, max_fields=MAX_FIELDS)
        except Exception:  # python-multipart's and Starlette's parse errors alike
            raise Malformed("not a multipart form") from None
        fields: dict[str, list[str]] = {}
        for name, value in form.multi_items():
            if not isinstance(value, UploadFile):
                fields.setdefault(name, []).append(value)
        return fields, None
    raise Malformed("an unexpected content type")


def _json(document: dict[str, int]) -> Response:
    return Response(json.dumps(document, separators=(",", ":")), media_type="application/json")


# -- what smartpush.serve.app routes to ---------------------------------------------------------------


def setup(ctx: ServeContext) -> None:
    """Make the routes' shared state and run the receipt writer for the server's life."""
    hooks = Webhooks(ctx)
    ctx.extras[_EXTRA] = hooks
    ctx.on_startup.append(hooks.start)
    ctx.on_shutdown.append(hooks.stop)


def _hooks(request: Request) -> Webhooks:
    hooks = request.app.state.ctx.extras[_EXTRA]
    assert isinstance(hooks, Webhooks)  # noqa: S101 - setup() put it there
    return hooks


async def receipt(request: Request) -> Response:
    return await _hooks(request).receipt(request)


async def inbound(request: Request) -> Response:
    return await _hooks(request).inbound(request)
