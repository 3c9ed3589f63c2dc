"""``brevo``: SMS through Brevo (ex-Sendinblue) transactional SMS.

One JSON request per message::

    POST {base_url or https://api.brevo.com}/v3/transactionalSMS/sms
    api-key: ...
    {"sender": "ASSURANCE", "recipient": "33612345678", "content": "...", "type": "transactional",
     ["unicodeEnabled": true,] ["tag": "...",] ["webUrl": "https://..."]}

``recipient`` is E.164 without the ``+``. ``unicodeEnabled`` is sent when the text is not GSM-7
(:func:`smartpush.sms.is_gsm7`)::

    providers:
      brevo:
        type: brevo
        api_key: ${BREVO_API_KEY}
        sender: ASSURANCE
        sms_type: transactional              # marketing accounts: marketing
        web_url: https://hooks.example.org/brevo/sms

``sms_type``: the driver does not know a campaign's category. ``transactional`` (the default) suits
informational / public-service traffic; a ``marketing`` account makes Brevo apply its opt-out rules
(on some routes a short code replaces the sender when the body has no STOP mention). The engine's
``stop_mention`` is appended before the driver sees the body; this driver never appends it again.

A 201 answer is ``{reference, messageId, smsCount, usedCredits, remainingCredits}``: ``reference`` is
the provider reference (``messageId`` when an answer has no reference) and ``smsCount`` the parts. An
error answer is ``{code, message}``: an ``invalid_parameter`` 400 about the recipient is permanent (the
number is suppressed), any other 400 technical; 401 (``unauthorized``), 402 (``not_enough_credits``),
403 and 404 are technical, 429 throttles (``Retry-After``, else ``x-sib-ratelimit-reset``), 5xx
retry. Brevo's ``message`` is never repeated: it may quote the number.

Brevo documents ``POST /v3/transactionalSMS/send`` as the successor of this endpoint (its answer is just
``{messageId}``); this driver still uses ``/sms`` and reads either answer.

:func:`parse_receipt` reads a transactional SMS webhook event into a
:class:`~smartpush.provider.Receipt` (``hard_bounce`` suppresses the number; ``ts_event``, else
``ts_epoch``, is when it happened); ``smartpush serve`` receives them at ``/webhooks/{account}``
(``web_url``). Brevo does not sign these webhooks: the account gives a ``webhook_secret`` and the
URL set at Brevo carries it, ``.../webhooks/brevo?token=<secret>``.

Replies (``/inbound/{account}``) are read from ``from`` (or ``sender``, ``msisdn``) and ``text`` (or
``reply``, ``content``): **unverified**, Brevo's inbound-SMS payload was not documented at hand.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, ClassVar, Literal

from pydantic import SecretStr, field_validator, model_validator

from smartpush.errors import PermanentError, ProviderError, TechnicalError
from smartpush.http import HttpProvider, HttpResponse, classify_status, retry_after
from smartpush.provider import (
    Channel,
    HttpSmsProviderOptions,
    InboundSms,
    OutboundMessage,
    ProviderOptions,
    Receipt,
    ReceiptStatus,
    SendResult,
    WebhookRequest,
)
from smartpush.sms import is_gsm7

__all__ = ["DEFAULT_BASE_URL", "ERRORS", "BrevoOptions", "BrevoProvider", "parse_receipt"]

DEFAULT_BASE_URL = "https://api.brevo.com"
_PATH = "/v3/transactionalSMS/sms"
#: A 400 whose message names the recipient is about the number, not our request.
_RECIPIENT = re.compile(r"recipient|phone|mobile|number", re.IGNORECASE)
_TAG_MAX = 255

#: Brevo error ``code`` -> a text without any address (the HTTP status decides the kind).
ERRORS: Mapping[str, str] = {
    "unauthorized": "Brevo refused the api_key",
    "not_enough_credits": "the Brevo account has no SMS credits left: top it up",
    "permission_denied": "Brevo refused the request: the key or this IP address is not allowed",
    "account_under_validation": "the Brevo account is still under validation",
    "missing_parameter": "a required parameter is missing (sender, recipient or content)",
    "invalid_parameter": "a parameter value is invalid",
    "not_acceptable": "Brevo did not accept the request",
    "document_not_found": "Brevo does not know this resource: check base_url",
}


class BrevoOptions(HttpSmsProviderOptions):
    """A ``brevo`` account: the API key, who sends, what kind of SMS, where events go."""

    api_key: SecretStr
    #: ``transactional`` for informational / public-service traffic, ``marketing`` otherwise.
    sms_type: Literal["transactional", "marketing"] = "transactional"
    #: A tag Brevo attaches to every message of this account (reports, webhooks).
    tag: str | None = None
    #: Where Brevo posts the events of these messages (delivery receipts).
    web_url: str | None = None
    #: The secret Brevo's webhook URLs carry as ``?token=...`` (Brevo signs nothing).
    webhook_secret: SecretStr | None = None

    @field_validator("web_url")
    @classmethod
    def _web_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("web_url must be an http(s) URL, e.g. https://hooks.example.org/brevo/sms")
        return value

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        if value is not None and not 0 < len(value) <= _TAG_MAX:
            raise ValueError(f"tag has 1 to {_TAG_MAX} characters")
        return value

    @model_validator(mode="after")
    def _sender_given(self) -> BrevoOptions:
        if self.sender is None:
            raise ValueError("give a sender: Brevo needs one for every message")
        return self


class BrevoProvider(HttpProvider):
    """Sends SMS through Brevo transactional SMS; see the module docstring."""

    channels: ClassVar[frozenset[Channel]] = frozenset({Channel.SMS})
    Options: ClassVar[type[ProviderOptions]] = BrevoOptions
    webhooks: ClassVar[frozenset[str]] = frozenset({"receipts", "inbound"})

    def __init__(self, account: str, options: ProviderOptions, **context: Any) -> None:
        super().__init__(account, options, **context)
        if not isinstance(options, BrevoOptions):
            raise TypeError("BrevoProvider needs BrevoOptions")
        self.settings = options
        self.url = (options.base_url or DEFAULT_BASE_URL).rstrip("/") + _PATH

    def payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The JSON document sent for ``message``."""
        opts = self.settings
        sender = message.sender or opts.sender
        if sender is None:
            raise TechnicalError("the account has no sender: set sender in smartpush.yaml", code="no-sender")
        document: dict[str, Any] = {
            "sender": sender,
            "recipient": message.to.removeprefix("+"),
            "content": message.body,
            "type": opts.sms_type,
        }
        if not is_gsm7(message.body):
            document["unicodeEnabled"] = True
        if opts.tag is not None:
            document["tag"] = opts.tag
        if opts.web_url is not None:
            document["webUrl"] = opts.web_url
        return document

    async def send(self, message: OutboundMessage) -> SendResult:
        response = await self._client().request(
            "POST",
            self.url,
            json=self.payload(message),
            headers={"Accept": "application/json", "api-key": self.settings.api_key.get_secret_value()},
        )
        if not 200 <= response.status < 300:  # noqa: PLR2004 - the 2xx range
            raise _error(response)
        return _accepted(response)

    def parse_receipts(self, request: WebhookRequest) -> list[Receipt]:
        fields = {k: v[0] if isinstance(v, list) and v else v for k, v in request.fields().items()}
        receipt = parse_receipt(fields)
        return [] if receipt is None else [receipt]

    def parse_inbound(self, request: WebhookRequest) -> InboundSms | None:
        fields = {k: v[0] if isinstance(v, list) and v else v for k, v in request.fields().items()}
        sender = _text(fields.get("from")) or _text(fields.get("sender")) or _text(fields.get("msisdn"))
        if not sender:  # unverified field names: see the module docstring
            return None
        digits = sender.replace(" ", "")
        text = _text(fields.get("text")) or _text(fields.get("reply")) or _text(fields.get("content"))
        return InboundSms("+" + digits if digits.isdigit() else sender, text or "")


def _accepted(response: HttpResponse) -> SendResult:
    try:
        document = response.json()
    except TechnicalError:  # accepted all the same: only the reference is lost
        return SendResult()
    if not isinstance(document, dict):
        return SendResult()
    reference = _text(document.get("reference")) or _text(document.get("messageId"))
    count = document.get("smsCount")
    parts = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 1
    return SendResult(provider_reference=reference, parts=parts)


def _error(response: HttpResponse) -> ProviderError:
    code: str | None = None
    text = ""
    if response.body:
        try:
            document = response.json()
        except TechnicalError:  # an HTML page from a proxy: the status alone decides
            document = None
        if isinstance(document, dict):
            code = _text(document.get("code"))
            said = document.get("message")
            text = said if isinstance(said, str) else ""
    status = response.status
    detail = ERRORS.get(code or "") or f"Brevo answered HTTP {status}" + (f" ({code})" if code else "")
    if status == HTTPStatus.BAD_REQUEST and code == "invalid_parameter" and _RECIPIENT.search(text):
        return PermanentError("Brevo refused the recipient number", code=code, suppress=True)
    if status == HTTPStatus.NOT_FOUND:  # never the recipient's fault: a wrong base_url or path
        return TechnicalError(detail, code=code or "404")
    wait = retry_after(response.headers)
    if wait is None and status == HTTPStatus.TOO_MANY_REQUESTS:
        wait = _seconds(response.headers.get("x-sib-ratelimit-reset"))
    error = classify_status(status, retry_after_s=wait, code=code, detail=detail)
    return error or TechnicalError(f"{detail} on an error path", code=code or str(status))


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds < float("inf") else None


def _text(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return value.strip() or None
    return None


# -- delivery receipts --------------------------------------------------------------------------------

#: Webhook event (``msg_status`` or ``event``, any case, camelCase or snake_case) -> our status; events
#: not listed (``replied``, ``skip``...) say nothing about delivery and give no receipt.
_EVENTS: Mapping[str, ReceiptStatus] = {
    "sent": "sent",
    "accepted": "sent",
    "delivered": "delivered",
    "soft_bounce": "temporary-failure",
    "hard_bounce": "permanent-failure",
    "unsubscribed": "permanent-failure",
    "unsubscribe": "permanent-failure",
    "blacklisted": "permanent-failure",
    "blocked": "permanent-failure",
    "rejected": "permanent-failure",
}
_FAILURE_TEXT: Mapping[str, str] = {
    "soft_bounce": "Brevo reports a soft bounce (handset unreachable or operator trouble)",
    "hard_bounce": "Brevo reports a hard bounce (the number does not exist or cannot receive SMS)",
    "unsubscribed": "the recipient unsubscribed from this sender",
    "unsubscribe": "the recipient unsubscribed from this sender",
    "blacklisted": "the number is on Brevo's blocklist for this account",
    "blocked": "the number is on Brevo's blocklist for this account",
    "rejected": "Brevo rejected the message",
}
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def parse_receipt(event: Mapping[str, Any]) -> Receipt | None:
    """The receipt a Brevo transactional SMS webhook event carries; ``None`` when it has none.

    The reference is the event's ``reference`` (what the send returned), else its ``messageId``.
    ``error_code`` is the event name on failures; ``error_text`` comes from our own table.
    """
    reference = _text(event.get("reference")) or _text(event.get("messageId"))
    raw = _text(event.get("msg_status")) or _text(event.get("event")) or ""
    name = _CAMEL.sub("_", raw).lower().replace("-", "_").replace(" ", "_")
    mapped = _EVENTS.get(name)
    if not reference or mapped is None:
        return None
    occurred = _epoch(event.get("ts_event")) or _epoch(event.get("ts_epoch"))
    if not mapped.endswith("failure"):
        return Receipt(reference, mapped, occurred_at=occurred)
    return Receipt(reference, mapped, name, _FAILURE_TEXT.get(name), name == "hard_bounce", occurred)


#: Above this an epoch counts milliseconds, not seconds (year 5138 in seconds).
_EPOCH_MS = 100_000_000_000


def _epoch(value: Any) -> datetime | None:
    """A Unix time (seconds or milliseconds, number or digits) as an aware UTC datetime."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        return None
    seconds = value / 1000 if value > _EPOCH_MS else value
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None
