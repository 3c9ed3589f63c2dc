"""``twilio``: SMS through Twilio Programmable Messaging (the Messages API).

One form-encoded request per message::

    POST {base_url or https://api.twilio.com}/2010-04-01/Accounts/{account_sid}/Messages.json
    To=+33612345678&From=ASSURANCE&Body=...&StatusCallback=https://...

authenticated with HTTP Basic: ``account_sid``/``auth_token``, or an API key ``api_key_sid``/
``api_key_secret`` (the path still names the account). ``MessagingServiceSid`` is sent when
``messaging_service_sid`` is set, ``From`` when there is a sender; one of the two is required::

    providers:
      twilio:
        type: twilio
        account_sid: AC0123456789abcdef0123456789abcdef
        auth_token: ${TWILIO_AUTH_TOKEN}
        sender: ASSURANCE                      # or messaging_service_sid: MG...
        status_callback: https://hooks.example.org/twilio/status

The body is sent as the engine rendered it. The engine has already appended the account's
``stop_mention`` to ``marketing`` SMS before the driver sees the body: this driver never appends it again.

A 201 answer's ``sid`` is the provider reference and ``num_segments`` the number of parts. An error
answer is ``{code, message, more_info, status}``; the code decides (:data:`ERRORS`), and a code not in
the table falls back to :func:`smartpush.http.classify_status` on the HTTP status (429 throttles, 5xx
retries, 401/403 stop). Twilio's ``message`` is never repeated: it may quote the phone number.

:func:`parse_receipt` reads a status callback (form fields ``MessageSid``, ``MessageStatus``,
``ErrorCode``) into a :class:`~smartpush.provider.Receipt`; ``smartpush serve`` receives them at
``/webhooks/{account}`` (set ``status_callback`` to that public URL) and SMS replies at
``/inbound/{account}`` (the number's "A message comes in" webhook; ``From``, ``Body``), answered with
an empty TwiML ``<Response/>``.

Every request is authenticated by its ``X-Twilio-Signature`` (:func:`request_signature`): base64 of
HMAC-SHA1, keyed with the account's auth token, over the full URL Twilio called (smartpush.yaml's
``public_url`` + path + query) followed by every POST parameter, sorted by name, name and value
concatenated. An account that sends with an API key gives its auth token as ``webhook_auth_token``
(used for nothing else). Twilio's "Webhooks Rules" (a shared key, HMAC-SHA256) are not supported.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

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
    WebhookAnswer,
    WebhookRequest,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "ERRORS",
    "Receipt",
    "ReceiptStatus",
    "TwilioOptions",
    "TwilioProvider",
    "parse_receipt",
    "request_signature",
]

DEFAULT_BASE_URL = "https://api.twilio.com"
_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
_SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{32}$")
_API_KEY_SID = re.compile(r"^SK[0-9a-fA-F]{32}$")
#: Twilio rejects StatusCallback URLs whose host has an underscore.
_CALLBACK_URL = re.compile(r"^https?://[^\s/_]+(/\S*)?$")

#: The empty TwiML document Twilio expects after an incoming message: no reply is sent.
EMPTY_TWIML = b'<?xml version="1.0" encoding="UTF-8"?><Response/>'
_SIGNATURE_HEADER = "x-twilio-signature"
_DEFAULT_PORTS = {"https": 443, "http": 80}


# -- errors -------------------------------------------------------------------------------------------


#: Twilio error code -> (what it means for us, a text without any address). Synchronous codes come from
#: the Messages API answer; the 30xxx codes also arrive in status callbacks (see :func:`parse_receipt`).
ERRORS: Mapping[str, tuple[Outcome, str]] = {
    "20003": ("technical", "Twilio refused the credentials: check account_sid and auth_token or the API key"),
    "20429": ("throttled", "Twilio asks to slow down (too many requests)"),
    "21211": ("suppress", "the 'To' number is not a valid phone number"),
    "21212": ("technical", "the 'From' number is not valid: check sender"),
    "21602": ("technical", "the message body is empty"),
    "21603": ("technical", "no 'From' was sent: set sender or messaging_service_sid"),
    "21604": ("technical", "no 'To' was sent"),
    "21606": ("technical", "the sender is not a message-capable Twilio number for this destination"),
    "21608": ("technical", "trial account: the number is not a verified recipient"),
    "21408": ("technical", "the account may not send SMS to this region: enable it in Geo Permissions"),
    "21610": ("suppress", "the recipient replied STOP to this sender"),
    "21611": ("throttled", "the sender's queue is over 10 hours long"),
    "21612": ("permanent", "this To/From combination cannot be routed"),
    "21614": ("suppress", "the 'To' number is not a mobile number"),
    "21617": ("permanent", "the message body is longer than 1600 characters"),
    "21635": ("suppress", "the 'To' number is a landline"),
    "30001": ("throttled", "the message queue overflowed"),
    "30003": ("transient", "the handset is unreachable (off or out of coverage)"),
    "30005": ("suppress", "the destination handset is unknown or no longer exists"),
    "30006": ("suppress", "landline or unreachable carrier"),
    "30007": ("permanent", "the carrier filtered the message"),
    "30008": ("transient", "unknown delivery error"),
    "30036": ("transient", "the validity period expired before delivery"),
}


def error_for(code: str | None, status: int, retry_after_s: float | None) -> ProviderError:
    """The provider error an answer with Twilio error ``code`` and HTTP ``status`` stands for."""
    if code is None or code not in ERRORS:
        detail = f"Twilio answered HTTP {status}" + (f" with error {code}" if code else "")
        error = classify_status(status, retry_after_s=retry_after_s, code=code, detail=detail)
        return error or TechnicalError(f"{detail} on an error path", code=code or str(status))
    kind, text = ERRORS[code]
    return outcome_error(kind, text, code=code, retry_after_s=retry_after_s)


# -- options ------------------------------------------------------------------------------------------


class TwilioOptions(HttpSmsProviderOptions):
    """A ``twilio`` account: who we are, how we authenticate, who sends."""

    #: ``AC`` and 32 hex digits; part of every URL.
    account_sid: str
    #: The account's auth token; or give ``api_key_sid`` and ``api_key_secret`` instead.
    auth_token: SecretStr | None = None
    #: An API key (``SK...``) used as the Basic user instead of the account SID.
    api_key_sid: str | None = None
    api_key_secret: SecretStr | None = None
    #: ``MG...``: send through a Messaging Service (its sender pool) instead of, or with, ``sender``.
    messaging_service_sid: str | None = None
    #: Where Twilio POSTs status callbacks (delivery receipts).
    status_callback: str | None = None
    #: The account's auth token when it sends with an API key: only checks X-Twilio-Signature.
    webhook_auth_token: SecretStr | None = None

    @field_validator("account_sid")
    @classmethod
    def _account_sid(cls, value: str) -> str:
        if not _ACCOUNT_SID.match(value):
            raise ValueError("account_sid is 'AC' followed by 32 hexadecimal digits (see the Twilio console)")
        return value

    @field_validator("api_key_sid")
    @classmethod
    def _api_key_sid(cls, value: str | None) -> str | None:
        if value is not None and not _API_KEY_SID.match(value):
            raise ValueError("api_key_sid is 'SK' followed by 32 hexadecimal digits")
        return value

    @field_validator("messaging_service_sid")
    @classmethod
    def _service_sid(cls, value: str | None) -> str | None:
        if value is not None and not _SERVICE_SID.match(value):
            raise ValueError("messaging_service_sid is 'MG' followed by 32 hexadecimal digits")
        return value

    @field_validator("status_callback")
    @classmethod
    def _callback(cls, value: str | None) -> str | None:
        if value is not None and not _CALLBACK_URL.match(value):
            raise ValueError(
                "status_callback must be an http(s) URL whose host has no underscore, "
                "e.g. https://hooks.example.org/twilio/status"
            )
        return value

    @model_validator(mode="after")
    def _credentials_and_sender(self) -> TwilioOptions:
        has_key = self.api_key_sid is not None or self.api_key_secret is not None
        if has_key and (self.api_key_sid is None or self.api_key_secret is None):
            raise ValueError("give both api_key_sid and api_key_secret, or neither")
        if has_key == (self.auth_token is not None):
            raise ValueError("give either auth_token or api_key_sid and api_key_secret (exactly one of them)")
        if self.sender is None and self.messaging_service_sid is None:
            raise ValueError("give a sender or a messaging_service_sid: Twilio needs one of them")
        return self

    def basic_auth(self) -> tuple[str, str]:
        """(user, password) for HTTP Basic."""
        if self.api_key_sid is not None and self.api_key_secret is not None:
            return self.api_key_sid, self.api_key_secret.get_secret_value()
        assert self.auth_token is not None  # noqa: S101 - the model validator guarantees it
        return self.account_sid, self.auth_token.get_secret_value()


# -- the driver ---------------------------------------------------------------------------------------


class TwilioProvider(HttpProvider):
    """Sends SMS through Twilio's Messages API; see the module docstring."""

    channels: ClassVar[frozenset[Channel]] = frozenset({Channel.SMS})
    Options: ClassVar[type[ProviderOptions]] = TwilioOptions
    webhooks: ClassVar[frozenset[str]] = frozenset({"receipts", "inbound"})

    def __init__(self, account: str, options: ProviderOptions, **context: Any) -> None:
        super().__init__(account, options, **context)
        if not isinstance(options, TwilioOptions):
            raise TypeError("TwilioProvider needs TwilioOptions")
        self.settings = options
        base = (options.base_url or DEFAULT_BASE_URL).rstrip("/")
        self.url = f"{base}/2010-04-01/Accounts/{options.account_sid}/Messages.json"

    def form(self, message: OutboundMessage) -> dict[str, str]:
        """The form fields sent for ``message``."""
        opts = self.settings
        fields = {"To": message.to, "Body": message.body}
        sender = message.sender or opts.sender
        if sender is not None:
            fields["From"] = sender
        if opts.messaging_service_sid is not None:
            fields["MessagingServiceSid"] = opts.messaging_service_sid
        if opts.status_callback is not None:
            fields["StatusCallback"] = opts.status_callback
        return fields

    async def send(self, message: OutboundMessage) -> SendResult:
        response = await self._client().request(
            "POST",
            self.url,
            data=self.form(message),
            headers={"Accept": "application/json"},
            auth=self.settings.basic_auth(),
        )
        if 200 <= response.status < 300:  # noqa: PLR2004 - the 2xx range
            return _accepted(response)
        raise _error(response)

    # -- webhooks: status callbacks and incoming messages -------------------------------------------

    def verify_webhook(self, request: WebhookRequest) -> bool:
        opts = self.settings
        token = opts.auth_token or opts.webhook_auth_token
        if token is None:
            raise ConfigError(
                f"provider account '{self.account}' cannot check X-Twilio-Signature: it sends with an "
                "API key, so give the account's auth token as webhook_auth_token (from ${VAR})"
            )
        if request.url is None:
            raise ConfigError(
                f"provider account '{self.account}' cannot check X-Twilio-Signature: set public_url in "
                "smartpush.yaml to the address Twilio calls"
            )
        presented = request.headers.get(_SIGNATURE_HEADER, "")
        if not presented:
            return False
        params = request.form if request.method == "POST" else {}
        secret = token.get_secret_value()
        signed = presented.encode()
        if hmac.compare_digest(request_signature(secret, request.url, params).encode(), signed):
            return True
        # Twilio's libraries also accept the URL with the scheme's default port added or removed.
        other = _other_port_form(request.url)
        return other is not None and hmac.compare_digest(
            request_signature(secret, other, params).encode(), signed
        )

    def parse_receipts(self, request: WebhookRequest) -> list[Receipt]:
        receipt = parse_receipt(request.fields())
        return [] if receipt is None else [receipt]

    def parse_inbound(self, request: WebhookRequest) -> InboundSms | None:
        fields = request.fields()
        sender = _field(fields, "From")
        if not sender:
            return None
        return InboundSms(sender, _field(fields, "Body") or "")

    def inbound_answer(self) -> WebhookAnswer:
        return WebhookAnswer(200, EMPTY_TWIML, "text/xml")


def request_signature(auth_token: str, url: str, params: Mapping[str, list[str]]) -> str:
    """The ``X-Twilio-Signature`` of a request to ``url`` with POST ``params`` (empty for a GET)."""
    data = url + "".join(name + value for name in sorted(params) for value in sorted(params[name]))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()  # Twilio signs with SHA-1
    return base64.b64encode(digest).decode()


def _other_port_form(url: str) -> str | None:
    """``url`` with its scheme's default port added, or removed; ``None`` when it has another port."""
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme)
    if default is None or parts.hostname is None:
        return None
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if parts.port is None:
        return urlunsplit(parts._replace(netloc=f"{host}:{default}"))
    if parts.port == default:
        return urlunsplit(parts._replace(netloc=host))
    return None


def _accepted(response: HttpResponse) -> SendResult:
    try:
        document = response.json()
    except TechnicalError:  # accepted all the same: only the reference is lost
        return SendResult()
    if not isinstance(document, dict):
        return SendResult()
    sid = document.get("sid")
    segments = document.get("num_segments")
    parts = int(segments) if isinstance(segments, str | int) and str(segments).isdigit() else 1
    return SendResult(provider_reference=sid if isinstance(sid, str) else None, parts=max(parts, 1))


def _error(response: HttpResponse) -> ProviderError:
    code: str | None = None
    if response.body:
        try:
            document = response.json()
        except TechnicalError:  # an HTML page from a proxy: the status alone decides
            document = None
        if isinstance(document, dict):
            found = document.get("code")
            if isinstance(found, str | int) and not isinstance(found, bool):
                code = str(found)
    return error_for(code, response.status, retry_after(response.headers))


# -- delivery receipts --------------------------------------------------------------------------------

#: MessageStatus -> our receipt status; statuses not listed (queued, accepted, scheduled, sending,
#: receiving, received) say nothing about delivery and give no receipt.
_STATUSES: Mapping[str, ReceiptStatus] = {
    "sent": "sent",
    "partially_delivered": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "canceled": "permanent-failure",
}
#: The recipient replied STOP to this sender: Twilio blocks the pair; the number itself is not dead.
_REPLIED_STOP = "21610"
#: ``failed`` and ``undelivered`` are permanent unless the ErrorCode says the failure may pass.
_FAILED = frozenset({"failed", "undelivered"})


def parse_receipt(form_or_json: Mapping[str, Any]) -> Receipt | None:
    """The receipt a Twilio status callback carries; ``None`` when it has none (an interim status).

    Unknown fields are ignored, as Twilio adds some without notice. ``error_text`` comes from our own
    table, never from the callback.
    """
    sid = _field(form_or_json, "MessageSid") or _field(form_or_json, "SmsSid")
    status = (_field(form_or_json, "MessageStatus") or _field(form_or_json, "SmsStatus") or "").lower()
    if not sid:
        return None
    code = _field(form_or_json, "ErrorCode") or None
    if code == "0":
        code = None
    known = ERRORS.get(code) if code is not None else None
    text = known[1] if known is not None else None
    if status in _FAILED:
        transient = known is not None and known[0] in ("throttled", "transient")
        dead = known is not None and known[0] == "suppress" and code != _REPLIED_STOP
        return Receipt(sid, "temporary-failure" if transient else "permanent-failure", code, text, dead)
    mapped = _STATUSES.get(status)
    if mapped is None:
        return None
    return Receipt(sid, mapped, code, text)


def _field(values: Mapping[str, Any], name: str) -> str | None:
    """A form field as a string: parse_qs gives lists, a JSON body or a multidict gives strings."""
    value = values.get(name)
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value.strip() if isinstance(value, str) else None
