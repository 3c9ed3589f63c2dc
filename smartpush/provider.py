"""The contract between the core and provider drivers.

A driver is a :class:`Provider` subclass registered under the ``smartpush.providers`` entry-point
group. It declares the channels it serves and an :class:`ProviderOptions` subclass: the schema of a
provider account in ``smartpush.yaml``. The core validates accounts against that schema, so an unknown
option is an error before anything is sent.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .units import Duration, Rate, RateValue

__all__ = [
    "Channel",
    "HttpProviderOptions",
    "HttpSmsProviderOptions",
    "OutboundMessage",
    "Provider",
    "ProviderOptions",
    "SendResult",
    "SmsProviderOptions",
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


class Provider(ABC):
    """A provider driver: one instance per configured account, long-lived, used concurrently."""

    #: The channels this driver can send on.
    channels: ClassVar[frozenset[Channel]]
    #: The schema of this driver's account options.
    Options: ClassVar[type[ProviderOptions]] = ProviderOptions

    def __init__(self, account: str, options: ProviderOptions, **context: Any) -> None:
        self.account = account
        self.options = options
        self.context = context

    @abstractmethod
    async def send(self, message: OutboundMessage) -> SendResult:
        """Hand one message to the provider; raise a provider error when it is refused."""

    async def close(self) -> None:  # noqa: B027 - optional hook with nothing to do by default
        """Release connections; drivers without any need not override it."""
