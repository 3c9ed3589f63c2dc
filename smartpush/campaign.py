"""The campaign file: one message to many citizens, over one or more channels.

:class:`Campaign` mirrors ``campaigns/NAME.yaml`` field by field (see SPEC.md); it only checks the
shape of the file. :mod:`smartpush.loading` checks what needs the outside world: provider accounts,
templates and the audience's columns.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from .provider import Channel
from .units import Duration, TimeZoneName

__all__ = [
    "AudienceSpec",
    "Campaign",
    "Category",
    "ChannelSpec",
    "EmailChannel",
    "Priority",
    "PushChannel",
    "Retry",
    "Schedule",
    "SmsChannel",
    "Window",
]

#: Recipients per Dramatiq message when the campaign does not say: small enough to retry cheaply,
#: large enough that queue overhead stays under 1 % of the work.
DEFAULT_SEGMENT_SIZE = 500
#: A segment above this would hold a worker for minutes and make pause/cancel slow to take effect.
MAX_SEGMENT_SIZE = 10_000
#: SMS parts one message may use before the row is refused (Notify's limit is 918 characters = 6 parts).
DEFAULT_MAX_SMS_PARTS = 6
#: Hard ceiling from aggregators (Twilio rejects bodies over 1,600 characters, i.e. about 10 parts).
MAX_SMS_PARTS = 10

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
ALL_DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAYS: list[str] = list(ALL_DAYS)
_HOURS = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class Category(StrEnum):
    INFORMATION = "information"
    SERVICE = "service"
    MARKETING = "marketing"


class Priority(StrEnum):
    URGENT = "urgent"
    NORMAL = "normal"
    BULK = "bulk"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _providers(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


ProviderList = Annotated[list[str], BeforeValidator(_providers), Field(min_length=1)]


class Columns(_Model):
    """Which audience column holds each kind of address."""

    phone: str = "phone"
    email: str = "email"
    push_token: str = "push_token"

    def for_channel(self, channel: Channel) -> str:
        return {Channel.SMS: self.phone, Channel.EMAIL: self.email, Channel.PUSH: self.push_token}[channel]


class AudienceSpec(_Model):
    """Who receives the campaign: a CSV or JSONL file, streamed."""

    source: str
    id: str
    columns: Columns = Columns()
    encoding: str = "auto"
    #: CSV only; detected among ; , tab | when absent.
    delimiter: str | None = Field(default=None, min_length=1, max_length=1)
    #: A Jinja expression over the row; rows where it is false are left out (not counted invalid).
    where: str | None = None
    #: Phones without a country code belong to this region (default: the config's ``region``).
    region: str | None = None
    #: A recurring campaign leaves out recipients one of its earlier runs reached (or is still sending
    #: to) within this period, e.g. ``30d``.
    exclude_reached: Duration | None = None

    @field_validator("exclude_reached")
    @classmethod
    def _period(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError("exclude_reached must be longer than zero, e.g. 30d")
        return value


class Segments(_Model):
    size: int = Field(default=DEFAULT_SEGMENT_SIZE, ge=1, le=MAX_SEGMENT_SIZE)


class SmsChannel(_Model):
    channel: Literal["sms"]
    provider: ProviderList
    body: str


class EmailChannel(_Model):
    channel: Literal["email"]
    provider: ProviderList
    from_: str = Field(alias="from")
    subject: str
    html: str | None = None
    text: str | None = None
    reply_to: str | None = None

    @model_validator(mode="after")
    def _needs_a_body(self) -> EmailChannel:
        if self.html is None and self.text is None:
            raise ValueError("an email channel needs 'text:' (plain text), 'html:', or both")
        return self


class PushChannel(_Model):
    channel: Literal["push"]
    provider: ProviderList
    title: str
    body: str
    #: Key-value data delivered to the app with the notification (values are templates).
    data: dict[str, str] = Field(default_factory=dict)
    #: Where a tap leads (web push, or the app's deep link handler).
    url: str | None = None


ChannelSpec = Annotated[SmsChannel | EmailChannel | PushChannel, Field(discriminator="channel")]


def _days(value: Any) -> Any:
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        return value
    out: list[str] = []
    for chunk in value.lower().replace(" ", "").split(","):
        if "-" in chunk:
            start, _, end = chunk.partition("-")
            if start not in _DAYS or end not in _DAYS:
                raise ValueError(f"'{chunk}' is not a range of days; write e.g. mon-fri or mon,wed,fri")
            i, j = _DAYS.index(start), _DAYS.index(end)
            out.extend(_DAYS[i : j + 1] if i <= j else _DAYS[i:] + _DAYS[: j + 1])
        elif chunk in _DAYS:
            out.append(chunk)
        else:
            raise ValueError(f"'{chunk}' is not a day; write mon, tue, wed, thu, fri, sat or sun")
    return out


class Window(_Model):
    """When sending is allowed; outside it messages wait."""

    days: Annotated[list[Day], BeforeValidator(_days)] = Field(default_factory=lambda: list(ALL_DAYS))
    hours: str = "00:00-24:00"
    timezone: TimeZoneName = "Europe/Paris"
    #: Public holidays on which nothing is sent all day: a country code such as FR, or a country and
    #: one of its regions with holidays of its own (FR-57 Moselle, FR-67/FR-68 Alsace, DE-BY); or none.
    holidays: str | None = None

    @field_validator("holidays")
    @classmethod
    def _holidays(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from .windows import holiday_calendar  # windows imports this module: import it when used

        country, _ = holiday_calendar(value)
        _, sep, region = value.strip().partition("-")
        return f"{country}-{region.strip()}" if sep else country

    @field_validator("hours")
    @classmethod
    def _hours(cls, value: str) -> str:
        m = _HOURS.match(value)
        if not m:
            raise ValueError(f"'{value}' is not a time range; write it as \"09:00-19:00\"")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):  # noqa: PLR2004 - clock limits
            raise ValueError(f"'{value}' is not a time range; hours go from 00:00 to 24:00")
        if (h1, m1) >= (h2, m2):
            raise ValueError(f"'{value}' ends before it starts; windows over midnight are not supported")
        return value

    @property
    def start(self) -> time:
        h, m = self.hours.split("-")[0].strip().split(":")
        return time(int(h), int(m))

    @property
    def end(self) -> time | None:
        """The end of the window; None means midnight (24:00)."""
        h, m = self.hours.split("-")[1].strip().split(":")
        return None if int(h) == 24 else time(int(h), int(m))  # noqa: PLR2004 - 24:00 is midnight


def _when(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        try:
            return datetime.fromisoformat(text) if ("T" in text or " " in text) else date.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"'{value}' is not a date; write 2026-12-15 or 2026-12-01T09:00:00+01:00"
            ) from None
    return value


class Schedule(_Model):
    at: Annotated[datetime, BeforeValidator(_when)] | None = None
    cron: str | None = None
    not_after: Annotated[date | datetime, BeforeValidator(_when)] | None = None
    window: Window | None = None
    #: A slot missed while the scheduler was down is still launched if it is at most this late.
    catch_up: Duration = Field(default="1h", validate_default=True)

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and len(value.split()) != 5:  # noqa: PLR2004 - minute hour day month weekday
            raise ValueError(f"'{value}' is not a cron expression; write five fields, e.g. \"0 9 * * mon\"")
        if value is not None:
            from croniter import croniter

            if not croniter.is_valid(value):
                raise ValueError(
                    f"'{value}' is not a valid cron expression: minute (0-59) hour (0-23) day (1-31) "
                    'month (1-12) weekday (mon-sun or 0-6), e.g. "0 9 * * mon"'
                )
        return value

    @field_validator("at", "not_after")
    @classmethod
    def _aware(cls, value: date | None) -> date | None:
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError("give the time zone offset, e.g. 2026-12-01T09:00:00+01:00")
        return value


class Backoff(_Model):
    min: Duration = Field(default="30s", validate_default=True)
    max: Duration = Field(default="1h", validate_default=True)

    @model_validator(mode="after")
    def _order(self) -> Backoff:
        if self.min > self.max:
            raise ValueError("backoff.min must not be longer than backoff.max")
        return self


class Retry(_Model):
    max_attempts: int = Field(default=6, ge=1, le=50)
    backoff: Backoff = Backoff()
    expire_after: Duration = Field(default="24h", validate_default=True)

    @field_validator("expire_after")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("expire_after must be longer than zero")
        return value


class SmsPolicy(_Model):
    #: Replace French characters missing from GSM-7 (ê, ç, œ, « ») so each part holds 160, not 70.
    transliterate: bool = False
    #: A message needing more parts than this is refused for that recipient (counted invalid).
    max_parts: int = Field(default=DEFAULT_MAX_SMS_PARTS, ge=1, le=MAX_SMS_PARTS)


class Campaign(_Model):
    """One campaign file."""

    name: str
    description: str | None = None
    category: Category = Category.INFORMATION
    audience: AudienceSpec
    segments: Segments = Segments()
    channels: list[ChannelSpec] = Field(min_length=1)
    strategy: Literal["first-reachable", "all"] = "first-reachable"
    schedule: Schedule = Schedule()
    retry: Retry = Retry()
    priority: Priority = Priority.NORMAL
    sms: SmsPolicy = SmsPolicy()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"'{value}' cannot be a campaign name: use lower-case letters, digits, '-', '_' and '.', "
                "e.g. rappel-vaccination-grippe"
            )
        return value
