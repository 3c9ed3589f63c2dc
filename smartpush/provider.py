"""The contract between the core and provider drivers.

A driver is a :class:`Provider` subclass registered under the ``smartpush.providers`` entry-point
group. It declares the channels it serves and an :class:`ProviderOptions` subclass: the schema of a
provider account in ``smartpush.yaml``. The core validates accounts against that schema, so an unknown
option is an error before anything is sent.
"""

from __future__ import annotations

import hmac
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from .errors import ConfigError
from .units import Duration, Rate, RateValue

__all__ = [
    "Channel",
    "HttpProviderOptions",
    "HttpSmsProviderOptions",
    "InboundSms",
    "OutboundMessage",
    "Provider",
    "ProviderOptions",
    "Receipt",
    "ReceiptStatus",
    "SendResult",
    "SmsProviderOptions",
    "WebhookAnswer",
    "WebhookRequest",
    "shared_secret_ok",
]

#: Requests in flight per account per process when the account does not say.
DEFAULT_CONCURRENCY = 10
#: How long one provider request may take before it counts as a transient failure.
DEFAULT_TIMEOUT = timedelta(seconds=30)
#: Alphanumeric sender IDs: Latin letters and digits, 3 to 11 of them (af2m charter, LINK 2026 rules).
_ALNUM_SENDER = re.compile(r"^[A-Za-z0-9]{3,11}$")
#: French short codes that may be used as numeric senders (36xxx, 38xxx).
_SHORT_CODE = re.compile(r"^3[68]\d{3}$")
#: A long number written in E.164.
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


class Channel(StrEnum):
    SMS = "sms"
    EMAIL = "email"
    PUSH = "push"


class ProviderOptions(BaseModel):
    """What every provider account in ``smartpush.yaml`` accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    #: Ceiling over any sliding window, shared by every worker: ``100/s``, ``6000/min``.
    rate: Rate | None = None
    #: Messages (or SMS parts with ``rate_unit: parts``) per calendar day in smartpush.yaml's ``timezone``.
    daily_quota: int | None = Field(default=None, gt=0)
    #: Requests in flight per worker process.
    concurrency: int = Field(default=DEFAULT_CONCURRENCY, gt=0, le=1000)
    #: Requests in flight across every worker process and host, for providers that cap connections.
    cluster_concurrency: int | None = Field(default=None, gt=0)
    timeout: Duration = DEFAULT_TIMEOUT

    @property
    def messages_per_second(self) -> float | None:
        rate: RateValue | None = self.rate
        return rate.per_second if rate is not None else None


class HttpProviderOptions(ProviderOptions):
    """Accounts of drivers that speak HTTP: the endpoint can be moved (regional hosts, proxies, tests)."""

    base_url: str | None = None

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("base_url must start with https:// (or http:// for a local test server)")
        return value


class SmsProviderOptions(ProviderOptions):
    """Accounts that send SMS."""

    #: The sender shown on the phone: 3-11 letters and digits, a 36xxx/38xxx short code or an E.164 number.
    sender: str | None = None
    #: The aggregator's opt-out text appended to ``marketing`` SMS, e.g. ``STOP 36111``.
    stop_mention: str | None = None
    #: Price of one SMS part, for ``plan``'s cost estimate.
    price_per_part: Decimal | None = Field(default=None, ge=0)
    #: What ``rate`` counts: whole messages or SMS parts.
    rate_unit: Literal["messages", "parts"] = "messages"

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if _SHORT_CODE.match(value) or _E164.match(value):
            return value
        if not _ALNUM_SENDER.match(value):
            raise ValueError(
                "a sender ID has 3 to 11 Latin letters and digits, without spaces, accents or punctuation"
            )
        if value.isdigit():
            raise ValueError("a sender made only of digits must be a 36xxx or 38xxx short code")
        return value


class HttpSmsProviderOptions(SmsProviderOptions, HttpProviderOptions):
    """Accounts of SMS aggregators reached over HTTP."""


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One rendered message for one recipient on one channel, ready for a driver."""

    message_id: str
    run_id: str
    channel: Channel
    to: str
    body: str = ""
    subject: str | None = None
    html: str | None = None
    sender: str | None = None
    title: str | None = None
    data: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SendResult:
    """What a provider said when it accepted a message."""

    provider_reference: str | None = None
    parts: int = 1


# -- what providers send back: delivery receipts and SMS replies (``smartpush serve``) ----------------

#: What a receipt says happened to a message. ``sent`` is an interim report (the provider or a carrier
#: has it): stored as proof, it never moves a message back.
ReceiptStatus = Literal["delivered", "sent", "temporary-failure", "permanent-failure"]


@dataclass(frozen=True, slots=True)
class Receipt:
    """One delivery receipt, whatever the provider: what happened to the message it refers to.

    ``error_text`` comes from the driver's own tables, never from the provider's words (they may quote
    the number). ``suppress``: the driver says the address is dead (unknown, barred or invalid number,
    hard bounce, unregistered token): a permanent failure that puts it on the suppression list.
    ``occurred_at``: when the provider says the event happened (aware), when it says so.
    """

    provider_reference: str
    status: ReceiptStatus
    error_code: str | None = None
    error_text: str | None = None
    suppress: bool = False
    occurred_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class InboundSms:
    """An SMS a person sent to one of our numbers (a reply): who, as the provider wrote it, and what."""

    sender: str
    text: str


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """One HTTP request a provider made to ``serve`` (a receipt or a reply), as drivers see it.

    ``url`` is the public URL the provider called (``public_url`` + path + query string), ``None``
    when smartpush.yaml has no ``public_url``. Header names are lower-case. ``query`` and ``form``
    keep every value of a repeated field; ``form`` holds the fields of a form-encoded body, ``json``
    the document of a JSON one (``None`` otherwise).
    """

    method: str
    url: str | None
    headers: Mapping[str, str]
    query: Mapping[str, list[str]]
    form: Mapping[str, list[str]]
    json: Any = None

    def fields(self) -> dict[str, Any]:
        """The query, the form and a JSON object's members together (later ones win)."""
        merged: dict[str, Any] = dict(self.query)
        merged.update(self.form)
        if isinstance(self.json, dict):
            merged.update(self.json)
        return merged


@dataclass(frozen=True, slots=True)
class WebhookAnswer:
    """What ``serve`` answers a provider after a reply was handled (some want a document back)."""

    status: int = 200
    body: bytes = b""
    media_type: str = "text/plain"


def shared_secret_ok(
    request: WebhookRequest, secret: SecretStr | None, account: str, option: str = "webhook_secret"
) -> bool:
    """True when the request presents the account's shared secret.

    The secret is accepted as the ``token`` query parameter (for providers that only let you set a
    URL) or as ``Authorization: Bearer <secret>``, compared in constant time. An account without a
    secret cannot tell its provider from anyone: :class:`ConfigError` naming ``option``.
    """
    if secret is None or not secret.get_secret_value():
        raise ConfigError(
            f"provider account '{account}' has no way to authenticate its webhooks: set {option} "
            f"(read it from ${{VAR}}) and give it to the provider as ?token=... or a bearer token"
        )
    expected = secret.get_secret_value().encode()
    presented = list(request.query.get("token", []))
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        presented.append(value.strip())
    found = False
    for candidate in presented:  # every candidate is compared: the time says nothing about which matched
        found |= hmac.compare_digest(candidate.encode(), expected)
    return found


class Provider(ABC):
    """A provider driver: one instance per configured account, long-lived, used concurrently.

    Drivers whose provider calls back implement the webhook hooks below; ``serve`` finds them through
    the account's driver and never imports a driver itself.
    """

    #: The channels this driver can send on.
    channels: ClassVar[frozenset[Channel]]
    #: The schema of this driver's account options.
    Options: ClassVar[type[ProviderOptions]] = ProviderOptions
    #: What ``serve`` takes from this driver's accounts: ``receipts`` (``/webhooks/{account}``) and
    #: ``inbound`` (``/inbound/{account}``, SMS replies).
    webhooks: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, account: str, options: ProviderOptions, **context: Any) -> None:
        self.account = account
        self.options = options
        self.context = context

    @abstractmethod
    async def send(self, message: OutboundMessage) -> SendResult:
        """Hand one message to the provider; raise a provider error when it is refused."""

    async def close(self) -> None:  # noqa: B027 - optional hook with nothing to do by default
        """Release connections; drivers without any need not override it."""

    def verify_webhook(self, request: WebhookRequest) -> bool:
        """True when ``request`` really comes from the provider; checked before anything is read.

        The default takes the account's ``webhook_secret`` (:func:`shared_secret_ok`); drivers whose
        provider signs its requests check the signature instead. Raises :class:`ConfigError`, naming
        the option to set, when the account has no way to tell.
        """
        secret = getattr(self.options, "webhook_secret", None)
        return shared_secret_ok(request, secret if isinstance(secret, SecretStr) else None, self.account)

    def parse_receipts(self, request: WebhookRequest) -> list[Receipt]:
        """The delivery receipts a verified request carries (none for an interim status).

        Raises ``ValueError`` (answered 400) when the body is not what the provider sends.
        """
        return []

    def parse_inbound(self, request: WebhookRequest) -> InboundSms | None:
        """The SMS reply a verified request carries; ``None`` when it carries none."""
        return None

    def inbound_answer(self) -> WebhookAnswer:
        """What the provider expects back once a reply was handled."""
        return WebhookAnswer()
