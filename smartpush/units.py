"""Durations (``30s``, ``1h``, ``7d``) and rates (``100/s``, ``250000/d``) as users write them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BeforeValidator, PlainSerializer

__all__ = [
    "Duration",
    "Frequency",
    "FrequencyValue",
    "Rate",
    "RateValue",
    "TimeZoneName",
    "check_timezone",
    "format_duration",
    "parse_duration",
    "parse_rate",
]

_UNIT_SECONDS = {
    "ms": 0.001,
    "s": 1,
    "sec": 1,
    "min": 60,
    "m": 60,
    "h": 3600,
    "d": 86400,
    "day": 86400,
    "w": 7 * 86400,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|sec|s|min|m|h|day|d|w)", re.IGNORECASE)
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(second|sec|s|minute|min|m|hour|h|day|d)\s*$", re.IGNORECASE)
_RATE_SECONDS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "min": 60,
    "minute": 60,
    "m": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}


def parse_duration(value: Any) -> timedelta:
    """``"30s"``, ``"1h30min"``, ``"7d"`` or a number of seconds → :class:`timedelta`."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("a duration is a number with a unit, such as 30s, 15min, 1h or 7d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return timedelta(seconds=value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        parts = _DURATION_PART.findall(text)
        if parts and "".join(a + b for a, b in parts).lower() == text.lower():
            seconds = sum(float(n) * _UNIT_SECONDS[u.lower()] for n, u in parts)
            return timedelta(seconds=seconds)
    raise ValueError(f"'{value}' is not a duration: write a number with a unit, such as 30s, 15min, 1h or 7d")


def format_duration(value: timedelta) -> str:
    """A short human form: ``1h30min``, ``45s``, ``2d``."""
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        n, seconds = divmod(seconds, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class RateValue:
    """``count`` events per ``period_s`` seconds, as written (``100/s`` is 100 per 1 s)."""

    count: float
    period_s: int
    text: str

    @property
    def per_second(self) -> float:
        return self.count / self.period_s

    def __str__(self) -> str:
        return self.text


def parse_rate(value: Any) -> RateValue:
    """``"100/s"``, ``"6000/min"``, ``"250000/d"`` → :class:`RateValue`."""
    if isinstance(value, RateValue):
        return value
    if isinstance(value, str):
        m = _RATE.match(value)
        if m:
            count = float(m.group(1))
            if count <= 0:
                raise ValueError("a rate must be above zero")
            return RateValue(count, _RATE_SECONDS[m.group(2).lower()], value.strip().replace(" ", ""))
    raise ValueError(
        f"'{value}' is not a rate: write a count per unit, such as 100/s, 6000/min, 50000/h or 250000/d"
    )


@dataclass(frozen=True, slots=True)
class FrequencyValue:
    """At most ``count`` times per ``period`` (``1/7d``: once a week), as written."""

    count: int
    period: timedelta
    text: str

    def __str__(self) -> str:
        return self.text


def parse_frequency(value: Any) -> FrequencyValue:
    """``"1/7d"``, ``"2/30d"``, ``"1/24h"`` → :class:`FrequencyValue`."""
    if isinstance(value, FrequencyValue):
        return value
    if isinstance(value, str):
        count, sep, period = value.partition("/")
        if sep and count.strip().isdigit():
            try:
                duration = parse_duration(period)
            except ValueError:
                duration = timedelta(0)
            if int(count) >= 1 and duration > timedelta(0):
                return FrequencyValue(int(count), duration, value.strip().replace(" ", ""))
    raise ValueError(
        f"'{value}' is not a frequency: write how many times per period, such as 1/7d (once a week) or 2/30d"
    )


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
Frequency = Annotated[FrequencyValue, BeforeValidator(parse_frequency), PlainSerializer(str, return_type=str)]
Rate = Annotated[RateValue, BeforeValidator(parse_rate), PlainSerializer(str, return_type=str)]


def check_timezone(value: str) -> str:
    """``value`` if it names an IANA time zone (``Europe/Paris``), else a :class:`ValueError` saying so."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"'{value}' is not a time zone; write a name such as Europe/Paris") from None
    return value


TimeZoneName = Annotated[str, AfterValidator(check_timezone)]
