"""``webhook``: generic JSON over HTTP, for any aggregator without a driver of its own.

One request per message, on every channel::

    providers:
      aggregator:
        type: webhook
        base_url: https://api.aggregator.example
        path: /v2/messages
        auth_token: ${AGGREGATOR_TOKEN}          # sent verbatim: write "Bearer ..." if it wants that
        fields: {to: msisdn, body: text, html: ""}  # rename keys; "" leaves a field out
        reference_field: data.message_id       # where the answer puts its id
        unregistered_codes: [UNKNOWN_SUBSCRIBER]  # these codes put the address on the suppression list

The body is a JSON object built from the message through ``fields`` (a dotted key nests:
``message.text``); fields without a value (no subject on an SMS) are left out. Every request carries
``Idempotency-Key: <message id>`` so a provider that honours it never sends a redelivered message twice.

Answers: 2xx is accepted (the reference is read at ``reference_field``; none found is fine). Otherwise
the error code is read at ``error_field``; a code in ``unregistered_codes`` is a permanent failure that
suppresses the address, one in ``permanent_codes`` or a status in ``permanent_statuses`` a permanent
failure, and anything else follows :func:`smartpush.http.classify_status` (429 throttles, 5xx retries,
401/403 stop as technical failures), with ``Retry-After`` honoured.

Receipts come back to ``smartpush serve`` at ``/webhooks/{account}``: a JSON object (or an array of
them) ``{"reference": "...", "status": "delivered", "error_code": "..."}``, or the same fields as a
form or query string. ``receipt_fields`` renames the keys (dotted paths, as ``fields`` does) and
``receipt_statuses`` maps the provider's status words to ours (``delivered``, ``sent``,
``temporary-failure``, ``permanent-failure``); a status not in the map is an interim one, stored
nowhere. A failure whose code is in ``unregistered_codes`` suppresses the address, as it does on
send. Replies come to ``/inbound/{account}`` as ``{"from": "+33...", "text": "STOP"}``
(``inbound_fields`` renames them). A request without a reference and a status, or a reply without a
sender, is malformed (400). Every request presents the account's ``webhook_secret``, as
``?token=...`` or ``Authorization: Bearer ...``::

    providers:
      aggregator:
        type: webhook
        ...
        webhook_secret: ${AGGREGATOR_WEBHOOK_SECRET}
        receipt_fields: {reference: data.id, status: data.state, error_code: data.reason}
        receipt_statuses: {DELIVRD: delivered, UNDELIV: permanent-failure, EXPIRED: temporary-failure}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from smartpush import logs
from smartpush.errors import PermanentError, ProviderError, TechnicalError
from smartpush.http import HttpResponse, HttpTransport, classify_status, retry_after
from smartpush.provider import (
    Channel,
    HttpSmsProviderOptions,
    InboundSms,
    OutboundMessage,
    Provider,
    ProviderOptions,
    Receipt,
    ReceiptStatus,
    SendResult,
    WebhookRequest,
)
from smartpush.schema import did_you_mean

__all__ = [
    "DEFAULT_FIELDS",
    "DEFAULT_INBOUND_FIELDS",
    "DEFAULT_RECEIPT_FIELDS",
    "DEFAULT_RECEIPT_STATUSES",
    "WebhookOptions",
    "WebhookProvider",
]

log = logging.getLogger(__name__)

#: Our field names and the JSON keys they are sent under unless ``fields`` says otherwise.
DEFAULT_FIELDS: Mapping[str, str] = {
    "to": "to",
    "body": "body",
    "subject": "subject",
    "html": "html",
    "title": "title",
    "data": "data",
    "sender": "from",
    "message_id": "id",
    "channel": "channel",
}
#: Fields sent only when ``fields`` names a key for them: strict APIs reject keys they don't know.
OPTIONAL_FIELDS: Mapping[str, str] = {"headers": "", "run_id": ""}
#: Where a receipt's values are read unless ``receipt_fields`` says otherwise.
DEFAULT_RECEIPT_FIELDS: Mapping[str, str] = {
    "reference": "reference",
    "status": "status",
    "error_code": "error_code",
}
#: The provider's status word -> ours, unless ``receipt_statuses`` says otherwise.
DEFAULT_RECEIPT_STATUSES: Mapping[str, ReceiptStatus] = {
    "delivered": "delivered",
    "sent": "sent",
    "accepted": "sent",
    "temporary-failure": "temporary-failure",
    "permanent-failure": "permanent-failure",
    "failed": "permanent-failure",
    "undelivered": "permanent-failure",
    "rejected": "permanent-failure",
    "expired": "temporary-failure",
}
#: Where a reply's sender and text are read unless ``inbound_fields`` says otherwise.
DEFAULT_INBOUND_FIELDS: Mapping[str, str] = {"from": "from", "text": "text"}
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _header_name(name: str) -> str:
    if not name or not set(name) <= _TOKEN_CHARS:
        raise ValueError(f"'{name}' is not a header name: use letters, digits and '-'")
    return name


class WebhookOptions(HttpSmsProviderOptions):
    """A ``webhook`` account: where to send, how to authenticate, how the JSON is shaped and read."""

    base_url: str  # required here, optional for other HTTP drivers
    path: str = "/"
    method: Literal["POST", "PUT"] = "POST"
    #: The header that carries ``auth_token``.
    auth_header: str = "Authorization"
    #: Sent verbatim as the ``auth_header`` value, e.g. ``Bearer xyz``; read it from ``${VAR}``.
    auth_token: SecretStr | None = None
    #: Extra headers sent with every request (not for secrets: they are not masked).
    headers: dict[str, str] = Field(default_factory=dict)
    #: Our field name -> the JSON key the provider expects; merged over :data:`DEFAULT_FIELDS`.
    fields: dict[str, str] = Field(default_factory=dict)
    #: Dotted path to the provider's reference in a 2xx answer; empty: don't read one.
    reference_field: str = "id"
    #: Dotted path to the provider's error code in an error answer.
    error_field: str = "error.code"
    #: Statuses that mean "this message will never be accepted", whatever the code.
    permanent_statuses: list[int] = Field(default_factory=lambda: [400, 404, 410, 422])
    #: Error codes that mean "this message will never be accepted", whatever the status.
    permanent_codes: list[str] = Field(default_factory=list)
    #: Error codes that mean "this address is dead": permanent, and the address is suppressed.
    unregistered_codes: list[str] = Field(default_factory=list)
    #: The secret every webhook request presents (``?token=...`` or ``Authorization: Bearer ...``).
    webhook_secret: SecretStr | None = None
    #: Receipt field (reference, status, error_code) -> JSON key or dotted path; merged over the defaults.
    receipt_fields: dict[str, str] = Field(default_factory=dict)
    #: The provider's status word -> delivered, sent, temporary-failure or permanent-failure; replaces
    #: the defaults when given.
    receipt_statuses: dict[str, ReceiptStatus] = Field(default_factory=dict)
    #: Reply field (from, text) -> JSON key or dotted path; merged over the defaults.
    inbound_fields: dict[str, str] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError("path must start with '/' and contain no spaces, e.g. /v1/messages")
        return value

    @field_validator("auth_header")
    @classmethod
    def _auth_header(cls, value: str) -> str:
        return _header_name(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            _header_name(name)
            if "\r" in text or "\n" in text:
                raise ValueError(f"the value of header '{name}' must fit on one line")
        return value

    @field_validator("fields")
    @classmethod
    def _fields(cls, value: dict[str, str]) -> dict[str, str]:
        known = [*DEFAULT_FIELDS, *OPTIONAL_FIELDS]
        for name in value:
            if name not in known:
                raise ValueError(
                    f"unknown field '{name}'{did_you_mean(name, known)}; fields are: {', '.join(known)}"
                )
        mapping = {**DEFAULT_FIELDS, **OPTIONAL_FIELDS, **value}
        keys = [k for k in mapping.values() if k]
        for key in keys:
            if key.startswith(".") or key.endswith(".") or ".." in key:
                raise ValueError(f"'{key}' is not a JSON key or a dotted path such as message.text")
        for key in keys:
            clash = [other for other in keys if other == key or other.startswith(key + ".")]
            if len(clash) > 1:
                raise ValueError(f"two fields are sent under the JSON key '{key}': give each its own")
        return value

    @field_validator("receipt_fields")
    @classmethod
    def _receipt_fields(cls, value: dict[str, str]) -> dict[str, str]:
        return _callback_fields(value, DEFAULT_RECEIPT_FIELDS, required=("reference", "status"))

    @field_validator("inbound_fields")
    @classmethod
    def _inbound_fields(cls, value: dict[str, str]) -> dict[str, str]:
        return _callback_fields(value, DEFAULT_INBOUND_FIELDS, required=("from", "text"))

    @model_validator(mode="after")
    def _secret_not_in_headers(self) -> WebhookOptions:
        if self.auth_token is not None and self.auth_header.lower() in {h.lower() for h in self.headers}:
            raise ValueError(f"'{self.auth_header}' is set by both headers and auth_token: keep auth_token")
        return self

    def json_keys(self) -> list[tuple[str, tuple[str, ...]]]:
        """(our field, JSON path) for every field sent, in a stable order."""
        mapping = {**DEFAULT_FIELDS, **OPTIONAL_FIELDS, **self.fields}
        return [(ours, tuple(key.split("."))) for ours, key in mapping.items() if key]


def _callback_fields(
    value: dict[str, str], defaults: Mapping[str, str], required: tuple[str, ...]
) -> dict[str, str]:
    for name, key in value.items():
        if name not in defaults:
            raise ValueError(
                f"unknown field '{name}'{did_you_mean(name, list(defaults))}; fields are: "
                + ", ".join(defaults)
            )
        if key.startswith(".") or key.endswith(".") or ".." in key:
            raise ValueError(f"'{key}' is not a JSON key or a dotted path such as data.id")
        if not key and name in required:
            raise ValueError(f"'{name}' cannot be left out: give the key it is read from")
    return value


class WebhookProvider(Provider):
    """Sends every channel as one JSON request per message; see the module docstring."""

    channels: ClassVar[frozenset[Channel]] = frozenset(Channel)
    Options: ClassVar[type[ProviderOptions]] = WebhookOptions
    webhooks: ClassVar[frozenset[str]] = frozenset({"receipts", "inbound"})

    def __init__(self, account: str, options: ProviderOptions, **context: Any) -> None:
        super().__init__(account, options, **context)
        if not isinstance(options, WebhookOptions):
            raise TypeError("WebhookProvider needs WebhookOptions")
        self.settings = options
        self.url = options.base_url.rstrip("/") + options.path
        self._keys = options.json_keys()
        self._permanent_statuses = frozenset(options.permanent_statuses)
        self._permanent_codes = frozenset(options.permanent_codes)
        self._unregistered_codes = frozenset(options.unregistered_codes)
        self._reference_path = _path(options.reference_field)
        self._error_path = _path(options.error_field)
        receipt_keys = {**DEFAULT_RECEIPT_FIELDS, **options.receipt_fields}
        self._receipt_paths = {name: _path(key) for name, key in receipt_keys.items()}
        self._receipt_statuses = options.receipt_statuses or DEFAULT_RECEIPT_STATUSES
        inbound_keys = {**DEFAULT_INBOUND_FIELDS, **options.inbound_fields}
        self._inbound_paths = {name: _path(key) for name, key in inbound_keys.items()}
        # Made on the first send: the instance is built per worker process before any loop runs.
        self._transport: HttpTransport | None = None
        self._headers: dict[str, str] | None = None

    def _client(self) -> tuple[HttpTransport, dict[str, str]]:
        if self._transport is None or self._headers is None:
            opts = self.settings
            headers = {"Accept": "application/json", **opts.headers}
            if opts.auth_token is not None:
                headers[opts.auth_header] = opts.auth_token.get_secret_value()
            self._headers = headers
            self._transport = HttpTransport(limit=opts.concurrency, timeout_s=opts.timeout.total_seconds())
        return self._transport, self._headers

    def payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The JSON object sent for ``message``; fields without a value are left out."""
        values: dict[str, Any] = {
            "to": message.to,
            "body": message.body,
            "subject": message.subject,
            "html": message.html,
            "title": message.title,
            "data": message.data or None,
            "sender": message.sender or self.settings.sender,
            "message_id": message.message_id,
            "channel": message.channel.value,
            "headers": message.headers or None,
            "run_id": message.run_id,
        }
        out: dict[str, Any] = {}
        for ours, path in self._keys:
            value = values[ours]
            if value is None:
                continue
            node = out
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        return out

    async def send(self, message: OutboundMessage) -> SendResult:
        transport, headers = self._client()
        response = await transport.request(
            self.settings.method,
            self.url,
            json=self.payload(message),
            headers={**headers, "Idempotency-Key": message.message_id},
        )
        if 200 <= response.status < 300:  # noqa: PLR2004 - the 2xx range
            return SendResult(provider_reference=self._reference(response), parts=1)
        raise self._error(response)

    def _reference(self, response: HttpResponse) -> str | None:
        if not self._reference_path or not response.body:
            return None
        try:
            found = _dig(response.json(), self._reference_path)
        except TechnicalError:  # the message was accepted: an unreadable answer only loses the reference
            if logs.every(("webhook-not-json", self.account)):  # once a minute, not once a message
                log.warning(
                    "account %s: a 2xx answer was not JSON; no provider reference kept",
                    self.account,
                    extra={"provider": self.account, "outcome": "no-reference"},
                )
            return None
        if isinstance(found, str | int) and not isinstance(found, bool):
            return str(found)
        return None

    def _error(self, response: HttpResponse) -> ProviderError:
        code = self._error_code(response)
        detail = f"the provider answered HTTP {response.status}"
        if code is not None and code in self._unregistered_codes:
            return PermanentError(f"{detail}: the address is not in use", code=code, suppress=True)
        if (
            code is not None and code in self._permanent_codes
        ) or response.status in self._permanent_statuses:
            return PermanentError(f"{detail}: the message was refused", code=code or str(response.status))
        error = classify_status(response.status, retry_after_s=retry_after(response.headers), code=code)
        # a 2xx never reaches here, so classify_status always has an error to give
        return error or PermanentError(detail, code=code)

    def _error_code(self, response: HttpResponse) -> str | None:
        if not self._error_path or not response.body:
            return None
        try:
            found = _dig(response.json(), self._error_path)
        except TechnicalError:  # an HTML error page from a proxy: the status alone decides
            return None
        if isinstance(found, str | int) and not isinstance(found, bool):
            return str(found)
        return None

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()

    # -- webhooks: receipts and replies (``smartpush serve``) ----------------------------------------

    def parse_receipts(self, request: WebhookRequest) -> list[Receipt]:
        documents = request.json if isinstance(request.json, list) else [_document(request)]
        receipts = []
        for document in documents:
            if not isinstance(document, dict):
                raise ValueError("a receipt is a JSON object")
            reference = _scalar(_dig(document, self._receipt_paths["reference"]))
            status = _scalar(_dig(document, self._receipt_paths["status"]))
            if reference is None or status is None:
                raise ValueError("a receipt has a reference and a status")
            mapped = self._receipt_statuses.get(status)
            if mapped is None:  # an interim status the account does not map: nothing to record
                continue
            code = _scalar(_dig(document, self._receipt_paths["error_code"]))
            if not mapped.endswith("failure"):
                receipts.append(Receipt(reference, mapped))
                continue
            dead = mapped == "permanent-failure" and code is not None and code in self._unregistered_codes
            text = f"the provider reports {mapped}" + (f" ({code})" if code else "")
            receipts.append(Receipt(reference, mapped, code, text, dead))
        return receipts

    def parse_inbound(self, request: WebhookRequest) -> InboundSms:
        document = _document(request)
        sender = _scalar(_dig(document, self._inbound_paths["from"]))
        if sender is None:
            raise ValueError("a reply has a sender")
        return InboundSms(sender, _scalar(_dig(document, self._inbound_paths["text"])) or "")


def _document(request: WebhookRequest) -> dict[str, Any]:
    """A JSON object as it is, or the query and form fields (first value of each) as one."""
    if request.json is not None and not isinstance(request.json, dict):
        raise ValueError("the body is JSON, but not an object")
    return {k: v[0] if isinstance(v, list) and v else v for k, v in request.fields().items()}


def _scalar(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _path(dotted: str) -> tuple[str, ...]:
    return tuple(dotted.split(".")) if dotted else ()


def _dig(document: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path`` in nested objects (a numeric part indexes a list); ``None`` if absent."""
    node = document
    for part in path:
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
