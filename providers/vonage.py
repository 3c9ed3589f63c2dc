"""``vonage``: SMS through the Vonage (ex-Nexmo) SMS API.

One form-encoded request per message (Vonage accepts one message per request)::

    POST {base_url or https://rest.nexmo.com}/sms/json
    api_key=...&api_secret=...&from=ASSURANCE&to=33612345678&text=...&client-ref=<message id>
    [&type=unicode][&callback=https://...]

``to`` (and a numeric ``from``) are E.164 without the ``+``. ``type=unicode`` is sent when the text is
not GSM-7 (:func:`smartpush.sms.is_gsm7`), otherwise Vonage's default ``text`` applies::

    providers:
      vonage:
        type: vonage
        api_key: abcd1234
        api_secret: ${VONAGE_API_SECRET}
        sender: ASSURANCE
        callback: https://hooks.example.org/vonage/dlr

The body is sent as the engine rendered it. The engine has already appended the account's
``stop_mention`` to ``marketing`` SMS before the driver sees the body: this driver never appends it again.

The answer is ``{"message-count": "n", "messages": [{"status": "0", "message-id": ...}, ...]}``, one
entry per SMS part. Every part at status ``"0"``: accepted, the reference is the first part's
``message-id``. Otherwise the first non-zero status decides (:data:`STATUSES`). Vonage's ``error-text``
is never repeated. A non-2xx HTTP answer follows :func:`smartpush.http.classify_status`.

:func:`parse_receipt` reads a delivery receipt (``messageId``, ``status``, ``err-code``, ``scts``)
into a :class:`~smartpush.provider.Receipt`; ``smartpush serve`` receives them at
``/webhooks/{account}`` (set ``callback``, or the dashboard's delivery-receipt URL, to that public URL)
and inbound SMS at ``/inbound/{account}`` (``msisdn``, ``text``), GET, form POST or JSON POST alike.

Webhooks are authenticated by Vonage's signature (:func:`request_signature`) when the account gives
``signature_secret`` and ``signature_method`` (the dashboard's settings; Vonage support enables signed
webhooks): every parameter but ``sig``, sorted by name, written ``&name=value`` with ``&`` and ``=`` in
values replaced by ``_``; ``md5hash`` is the MD5 of that text followed by the secret, the others an
HMAC of it keyed with the secret, in hexadecimal. Without a signature secret the account must give a
``webhook_secret``, presented as ``?token=...`` in the URLs set at Vonage. The signed ``timestamp`` is
not checked for age: a replayed receipt or STOP changes nothing (both are idempotent).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import SecretStr, field_validator, model_validator

from smartpush.errors import (
    ConfigError,
    Outcome,
    ProviderError,
    TechnicalError,
    outcome_error,
)
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
    shared_secret_ok,
)
from smartpush.sms import is_gsm7

__all__ = [
    "DEFAULT_BASE_URL",
    "DLR_ERRORS",
    "STATUSES",
    "VonageOptions",
    "VonageProvider",
    "parse_receipt",
    "request_signature",
]

SignatureMethod = Literal["md5hash", "md5", "sha1", "sha256", "sha512"]

DEFAULT_BASE_URL = "https://rest.nexmo.com"
#: The status of an accepted message part.
_ACCEPTED = "0"


#: SMS API ``status`` -> (what it means for us, a text without any address), from Vonage's API errors
#: page. 9 (no credit) and 8 (account suspended) stop every message alike: technical, so the run pauses.
STATUSES: Mapping[str, tuple[Outcome, str]] = {
    "1": ("throttled", "Vonage throttled the request: the account's rate limit was exceeded"),
    "2": ("technical", "a required parameter is missing (from, to, api_key, api_secret or text)"),
    "3": ("technical", "a parameter value is invalid"),
    "4": ("technical", "Vonage refused the credentials: check api_key and api_secret"),
    "5": ("transient", "Vonage had an internal error"),
    "6": ("permanent", "Vonage could not process the message (e.g. an unrecognised number prefix)"),
    "7": ("suppress", "the number is barred from receiving messages"),
    "8": ("technical", "the Vonage account is suspended"),
    "9": ("technical", "the Vonage account has no credit left (quota violation): top it up"),
    "10": ("transient", "too many simultaneous connections to Vonage"),
    "11": ("technical", "the account is not enabled for the HTTP SMS API"),
    "12": ("permanent", "the message is longer than Vonage allows"),
    "14": ("technical", "the request signature could not be verified"),
    "15": ("technical", "the sender is not allowed: check sender"),
    "22": ("technical", "the network code is invalid or does not match the destination"),
    "23": ("technical", "the callback URL is invalid: check callback"),
    "29": ("technical", "the destination is not whitelisted for this (demo) account"),
    "32": ("technical", "signature and api_secret may not be used together"),
    "33": ("suppress", "the number is deactivated"),
}


def error_for(status: str, retry_after_s: float | None = None) -> ProviderError:
    """The provider error a non-zero SMS API ``status`` stands for."""
    known = STATUSES.get(status)
    if known is None:
        return TechnicalError(f"Vonage answered status {status}", code=status)
    kind, text = known
    return outcome_error(kind, text, code=status, retry_after_s=retry_after_s)


class VonageOptions(HttpSmsProviderOptions):
    """A ``vonage`` account: the API key and secret, who sends, where receipts go."""

    api_key: str
    api_secret: SecretStr
    #: Where Vonage sends delivery receipts for these messages (else the account's default).
    callback: str | None = None
    #: The dashboard's signature secret: checks the ``sig`` of signed webhooks.
    signature_secret: SecretStr | None = None
    #: The dashboard's signature method.
    signature_method: SignatureMethod = "md5hash"
    #: Without signed webhooks: a secret the webhook URLs carry as ``?token=...``.
    webhook_secret: SecretStr | None = None

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() for c in value):
            raise ValueError("api_key is the key shown in the Vonage dashboard, without spaces")
        return value

    @field_validator("callback")
    @classmethod
    def _callback(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("callback must be an http(s) URL, e.g. https://hooks.example.org/vonage/dlr")
        return value

    @model_validator(mode="after")
    def _sender_given(self) -> VonageOptions:
        if self.sender is None:
            raise ValueError("give a sender: Vonage needs a 'from' for every message")
        return self


class VonageProvider(HttpProvider):
    """Sends SMS through the Vonage SMS API; see the module docstring."""

    channels: ClassVar[frozenset[Channel]] = frozenset({Channel.SMS})
    Options: ClassVar[type[ProviderOptions]] = VonageOptions
    webhooks: ClassVar[frozenset[str]] = frozenset({"receipts", "inbound"})

    def __init__(self, account: str, options: ProviderOptions, **context: Any) -> None:
        super().__init__(account, options, **context)
        if not isinstance(options, VonageOptions):
            raise TypeError("VonageProvider needs VonageOptions")
        self.settings = options
        self.url = (options.base_url or DEFAULT_BASE_URL).rstrip("/") + "/sms/json"

    def form(self, message: OutboundMessage) -> dict[str, str]:
        """The form fields sent for ``message`` (credentials included)."""
        opts = self.settings
        sender = message.sender or opts.sender
        if sender is None:
            raise TechnicalError("the account has no sender: set sender in smartpush.yaml", code="no-sender")
        fields = {
            "api_key": opts.api_key,
            "api_secret": opts.api_secret.get_secret_value(),
            "from": sender.removeprefix("+"),
            "to": message.to.removeprefix("+"),
            "text": message.body,
            "client-ref": message.message_id,
        }
        if not is_gsm7(message.body):
            fields["type"] = "unicode"
        if opts.callback is not None:
            fields["callback"] = opts.callback
        return fields

    async def send(self, message: OutboundMessage) -> SendResult:
        response = await self._client().request(
            "POST", self.url, data=self.form(message), headers={"Accept": "application/json"}
        )
        if not 200 <= response.status < 300:  # noqa: PLR2004 - the 2xx range
            error = classify_status(
                response.status,
                retry_after_s=retry_after(response.headers),
                detail=f"Vonage answered HTTP {response.status}",
            )
            raise error or TechnicalError(
                f"Vonage answered HTTP {response.status}", code=str(response.status)
            )
        return _result(response)

    # -- webhooks: delivery receipts and inbound SMS ------------------------------------------------

    def verify_webhook(self, request: WebhookRequest) -> bool:
        opts = self.settings
        if opts.signature_secret is None:
            if opts.webhook_secret is None:
                raise ConfigError(
                    f"provider account '{self.account}' has no way to authenticate its webhooks: set "
                    "signature_secret (signed webhooks) or webhook_secret (?token=... in the URLs)"
                )
            return shared_secret_ok(request, opts.webhook_secret, self.account)
        fields = request.fields()
        presented = _field(fields, "sig")
        if not presented:
            return False
        params = {name: value for name, value in fields.items() if name != "sig"}
        expected = request_signature(opts.signature_secret.get_secret_value(), opts.signature_method, params)
        return hmac.compare_digest(expected.encode(), presented.lower().encode())

    def parse_receipts(self, request: WebhookRequest) -> list[Receipt]:
        receipt = parse_receipt(request.fields())
        return [] if receipt is None else [receipt]

    def parse_inbound(self, request: WebhookRequest) -> InboundSms | None:
        fields = request.fields()
        msisdn = _field(fields, "msisdn")
        if not msisdn:
            return None
        sender = "+" + msisdn if msisdn.isdigit() else msisdn  # Vonage writes E.164 without the '+'
        return InboundSms(sender, _field(fields, "text") or "")


def request_signature(secret: str, method: SignatureMethod, params: Mapping[str, Any]) -> str:
    """The ``sig`` Vonage computes over ``params`` (every parameter but ``sig``), in lower-case hex."""
    text = ""
    for name in sorted(params):
        value = params[name]
        if isinstance(value, list | tuple):
            value = value[0] if value else ""
        value = str(value).replace("&", "_").replace("=", "_")
        text += f"&{name}={value}"
    if method == "md5hash":
        return hashlib.md5((text + secret).encode()).hexdigest()  # Vonage's default scheme
    return hmac.new(secret.encode(), text.encode(), method).hexdigest()


def _result(response: HttpResponse) -> SendResult:
    document = response.json()
    parts = document.get("messages") if isinstance(document, dict) else None
    if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
        raise TechnicalError("Vonage answered without a 'messages' list", code="invalid-answer")
    for part in parts:
        status = str(part.get("status", ""))
        if status != _ACCEPTED:
            raise error_for(status, retry_after(response.headers))
    reference = parts[0].get("message-id")
    return SendResult(provider_reference=str(reference) if reference is not None else None, parts=len(parts))


# -- delivery receipts --------------------------------------------------------------------------------

#: DLR ``err-code`` values of a failure: (may it pass, is the number dead, a text), from Vonage's
#: delivery-receipt error codes. A code not listed leaves the DLR status to decide.
DLR_ERRORS: Mapping[str, tuple[bool, bool, str]] = {
    "2": (True, False, "the handset is temporarily absent"),
    "3": (False, True, "the number is no longer active (absent subscriber, permanent)"),
    "4": (False, True, "the recipient has barred incoming messages"),
    "7": (True, False, "the handset is busy"),
    "8": (True, False, "network error"),
    "9": (False, True, "the number is not a valid number (illegal number)"),
}

#: DLR ``status`` -> our receipt status; ``unknown`` (and anything new) gives no receipt.
_STATUSES: Mapping[str, ReceiptStatus] = {
    "delivered": "delivered",
    "accepted": "sent",
    "buffered": "sent",
    "expired": "temporary-failure",
    "failed": "permanent-failure",
    "rejected": "permanent-failure",
}


def parse_receipt(form_or_json: Mapping[str, Any]) -> Receipt | None:
    """The receipt a Vonage DLR carries (query, form or JSON alike); ``None`` when it has none.

    ``err-code`` ``0`` means no error and is dropped; a failed or rejected DLR whose code says the
    handset was only absent, busy or the network down is a temporary failure, and one whose code says
    the number is dead suppresses it (:data:`DLR_ERRORS`). ``scts`` (``YYMMDDhhmm``, UTC) is when the
    carrier reported. Vonage sends one DLR per SMS part, each with its part's ``messageId``.
    """
    reference = _field(form_or_json, "messageId")
    status = (_field(form_or_json, "status") or "").lower()
    mapped = _STATUSES.get(status)
    if not reference or mapped is None:
        return None
    code = _field(form_or_json, "err-code")
    if code in (None, "", "0"):
        code = None
    occurred = _scts(_field(form_or_json, "scts"))
    if not mapped.endswith("failure"):
        return Receipt(reference, mapped, code, None, occurred_at=occurred)
    known = DLR_ERRORS.get(code or "")
    text = f"Vonage DLR {status}" + (f", error {code}" if code else "")
    dead = False
    if known is not None and mapped == "permanent-failure":
        passing, dead, meaning = known
        mapped = "temporary-failure" if passing else mapped
        text = f"{text}: {meaning}"
    return Receipt(reference, mapped, code, text, dead, occurred)


def _scts(value: str | None) -> datetime | None:
    """Vonage's ``scts`` (``YYMMDDhhmm`` in UTC) as an aware datetime; ``None`` if absent or unreadable."""
    if not value or len(value) != 10 or not value.isdigit():  # noqa: PLR2004 - YYMMDDhhmm
        return None
    try:
        return datetime.strptime(value, "%y%m%d%H%M").replace(tzinfo=UTC)
    except ValueError:
        return None


def _field(values: Mapping[str, Any], name: str) -> str | None:
    value = values.get(name)
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value.strip() if isinstance(value, str) else None
