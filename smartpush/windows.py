"""Send windows: when a campaign may send, when it may next send, and when its sending will be done.

A window is days of the week and a time range in a time zone, minus the public holidays of a country
(``holidays: FR``, from the maintained `holidays` package; ``FR-57`` adds the Moselle's own days). On a
holiday nothing is sent all day, in the window's time zone. ``marketing`` campaigns without a window
get Monday–Saturday 08:00–20:00 Europe/Paris, French public holidays excluded (SPEC.md).

:func:`finish_time` turns an amount of work into a date: the window's openings, the account's ``rate``
and its ``daily_quota``, counted per calendar day in a time zone (the config's ``timezone``: the quota
is whole again at local midnight).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from .campaign import ALL_DAYS, Campaign, Category, Window

__all__ = [
    "MARKETING_WINDOW",
    "closing",
    "describe",
    "describe_moment",
    "effective_window",
    "finish_time",
    "holiday_calendar",
    "is_holiday",
    "local_midnight_after",
    "next_opening",
]

#: How far ahead to look for an opening before concluding the window never opens: more than a year,
#: so that no run of holidays and closed days (a one-day-a-week window, a week of holidays) fools it.
#: A window with at least one day always opens within a few weeks, so the bound costs nothing.
_SEARCH_DAYS = 400
#: :func:`finish_time` gives up (None) on work that would end further away than this.
_FINISH_HORIZON = timedelta(days=3660)

#: Regions that people name by their department number but that the `holidays` package knows under
#: another code: Bas-Rhin (67) and Haut-Rhin (68) form the European Collectivity of Alsace (6AE).
_SUBDIVISION_ALIASES: dict[str, dict[str, str]] = {"FR": {"67": "6AE", "68": "6AE"}}
#: Regions listed in the error for an unknown one.
_REGIONS_SHOWN = 24


# Public holidays --------------------------------------------------------------------------------------
def _country_names() -> dict[str, str]:
    """Lower-case country name → code, for a "did you mean" when someone writes ``France``."""
    import holidays.registry

    names: dict[str, str] = {}
    for module, entry in getattr(holidays.registry, "COUNTRIES", {}).items():
        if len(entry) >= 2:  # noqa: PLR2004 - (class name, ISO code, ...)
            names[module.replace("_", " ")] = entry[1]
            names[entry[0].lower()] = entry[1]
    return names


def _unknown_country(country: str) -> ValueError:
    import holidays

    from .schema import did_you_mean

    codes = sorted(c for c in holidays.list_supported_countries(include_aliases=False) if len(c) == 2)  # noqa: PLR2004
    by_name = _country_names().get(country.lower())
    hint = f" (did you mean '{by_name}'?)" if by_name else did_you_mean(country.upper(), codes)
    return ValueError(
        f"'{country}' is not a country whose public holidays are known{hint}; write a two-letter country "
        f"code such as FR, BE, DE or CH ({len(codes)} are known), optionally with a region: FR-57"
    )


def _unknown_region(text: str, code: str, region: str, cls: type[Any]) -> ValueError:
    """Name the regions whose public holidays differ from the whole country's (this year's)."""
    import holidays

    from .schema import did_you_mean

    subdivisions = [str(s) for s in getattr(cls, "subdivisions", ())]
    if not subdivisions:
        return ValueError(f"the holidays of {code} are the same everywhere: write {code}, without a region")
    year = datetime.now(UTC).year
    whole = set(holidays.country_holidays(code, years=year))
    own = [s for s in subdivisions if set(holidays.country_holidays(code, subdiv=s, years=year)) != whole]
    names = [*subdivisions, *getattr(cls, "subdivisions_aliases", {}), *_SUBDIVISION_ALIASES.get(code, {})]
    shown = [*own, *_SUBDIVISION_ALIASES.get(code, {})]
    listed = ", ".join(f"{code}-{s}" for s in shown[:_REGIONS_SHOWN])
    more = f" and {len(shown) - _REGIONS_SHOWN} more" if len(shown) > _REGIONS_SHOWN else ""
    return ValueError(
        f"'{text}': {code} has no region '{region}' with holidays of its own"
        f"{did_you_mean(region, names)}; write {code}"
        + (f", or one of {listed}{more}" if shown else ", without a region")
    )


@functools.lru_cache(maxsize=64)
def holiday_calendar(value: str) -> tuple[str, str | None]:
    """``"FR"`` → ``("FR", None)``, ``"fr-57"`` → ``("FR", "57")``: a country and one of its regions.

    The region is a code or a name the `holidays` package knows for that country (``FR-57``,
    ``FR-Moselle``, ``FR-6AE``, ``DE-BY``, ``GB-SCT``), case aside; ``FR-67`` and ``FR-68`` mean
    Alsace. Anything else is a :class:`ValueError` that says what to write.
    """
    import holidays

    text = value.strip()
    country, _, region = text.partition("-")
    country = country.strip()
    region = region.strip()
    if not country.isascii() or not country.isalpha():
        raise _unknown_country(country or text)
    try:
        calendar = holidays.country_holidays(country.upper())
    except NotImplementedError:
        raise _unknown_country(country) from None
    code = country.upper()
    if not region:
        return code, None
    cls = type(calendar)
    known: dict[str, str] = {}
    for sub in getattr(cls, "subdivisions", ()):
        known[str(sub).lower()] = str(sub)
    for alias, sub in getattr(cls, "subdivisions_aliases", {}).items():
        known[str(alias).lower()] = str(sub)
    for alias, sub in _SUBDIVISION_ALIASES.get(code, {}).items():
        known[alias.lower()] = sub
    found = known.get(region.lower())
    if found is None:
        raise _unknown_region(text, code, region, cls)
    return code, found


@functools.lru_cache(maxsize=256)
def _holidays_of(country: str, region: str | None, year: int) -> frozenset[date]:
    import holidays

    return frozenset(holidays.country_holidays(country, subdiv=region, years=year))


def is_holiday(spec: str | None, day: date) -> bool:
    """Whether ``day`` is a public holiday of ``spec`` (``FR``, ``FR-57``); False when ``spec`` is None.

    Holiday sets are computed once per (country, region, year) and kept: this is called for every day
    a window is looked at, before every batch of sends.
    """
    if spec is None:
        return False
    country, region = holiday_calendar(spec)
    return day in _holidays_of(country, region, day.year)


# Windows ----------------------------------------------------------------------------------------------
MARKETING_WINDOW = Window(
    days=["mon", "tue", "wed", "thu", "fri", "sat"],
    hours="08:00-20:00",
    timezone="Europe/Paris",
    holidays="FR",
)


def effective_window(campaign: Campaign) -> Window | None:
    """The campaign's window, or the marketing default, or None (any time)."""
    if campaign.schedule.window is not None:
        return campaign.schedule.window
    return MARKETING_WINDOW if campaign.category is Category.MARKETING else None


def _open_on(window: Window, day: date) -> bool:
    return ALL_DAYS[day.weekday()] in window.days and not is_holiday(window.holidays, day)


def _bounds(window: Window, day: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """When the window opens and closes on ``day`` (aware, in ``tz``)."""
    opens = datetime.combine(day, window.start, tzinfo=tz)
    end = window.end
    closes = (
        datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz)
        if end is None
        else datetime.combine(day, end, tzinfo=tz)
    )
    return opens, closes


def next_opening(window: Window, now: datetime) -> datetime | None:
    """``now`` if sending is allowed at ``now``, else the next moment it is (UTC); None if never."""
    if not window.days:
        return None
    now = now.astimezone(UTC)  # compared in absolute time below, never as wall-clock times
    tz = ZoneInfo(window.timezone)
    today = now.astimezone(tz).date()
    for offset in range(_SEARCH_DAYS):
        day = today + timedelta(days=offset)
        if not _open_on(window, day):
            continue
        opens, closes = _bounds(window, day, tz)
        if now < closes:
            return max(now, opens).astimezone(UTC)
    return None


def closing(window: Window, at: datetime) -> datetime:
    """When the opening that ``at`` falls in ends (UTC); ``at`` itself when the window is closed then.

    Consecutive openings (``00:00-24:00`` on consecutive days) are separate: the result is at most
    the next local midnight.
    """
    at = at.astimezone(UTC)
    tz = ZoneInfo(window.timezone)
    day = at.astimezone(tz).date()
    if not _open_on(window, day):
        return at
    opens, closes = _bounds(window, day, tz)
    if not opens <= at < closes:
        return at
    return closes.astimezone(UTC)


def local_midnight_after(at: datetime, timezone: str) -> datetime:
    """The first local midnight in ``timezone`` after ``at`` (UTC): when a daily quota is whole again."""
    tz = ZoneInfo(timezone)
    day = at.astimezone(tz).date() + timedelta(days=1)
    return datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)


def finish_time(
    window: Window | None,
    start: datetime,
    work: float,
    per_second: float | None,
    daily_quota: int | None = None,
    *,
    quota_timezone: str = "Europe/Paris",
    used_today: float = 0,
) -> datetime | None:
    """When ``work`` units (messages, or SMS parts) sent from ``start`` are all handed over (UTC).

    Sending goes at ``per_second`` (None: no limit, the work goes at once) only while ``window`` is
    open (None: always), and at most ``daily_quota`` units per calendar day in ``quota_timezone``,
    ``used_today`` of which are already spent on ``start``'s day. None when the window never opens
    or the work would take more than ten years.
    """
    if work <= 0:
        return start.astimezone(UTC)
    at = start.astimezone(UTC)
    limit = at + _FINISH_HORIZON
    remaining = float(work)
    quota_day_ends = local_midnight_after(at, quota_timezone) if daily_quota else None
    used = float(used_today)
    while at < limit:
        if window is not None:
            opened = next_opening(window, at)
            if opened is None:
                return None
            at = opened
        if quota_day_ends is not None and daily_quota:
            while at >= quota_day_ends:  # a new calendar day: the quota is whole again
                used = 0.0
                quota_day_ends = local_midnight_after(quota_day_ends, quota_timezone)
            available = daily_quota - used
            if available <= 0:
                at = quota_day_ends
                continue
        else:
            available = math.inf
        ends = closing(window, at) if window is not None else None
        if quota_day_ends is not None and (ends is None or quota_day_ends < ends):
            ends = quota_day_ends
        if per_second is None or ends is None:
            capacity = math.inf
        else:
            capacity = (ends - at).total_seconds() * per_second
        step = min(remaining, available, capacity)
        if step >= remaining:
            seconds = remaining / per_second if per_second else 0.0
            if seconds > (limit - at).total_seconds():
                return None
            return at + timedelta(seconds=seconds)
        remaining -= step
        used += step
        if step >= capacity:
            assert ends is not None  # noqa: S101 - a finite capacity has an end
            at = ends
        else:  # the quota ran out before the opening closed
            assert quota_day_ends is not None  # noqa: S101 - only a quota stops short of the capacity
            at = quota_day_ends
    return None


# Words ------------------------------------------------------------------------------------------------
def _day_ranges(days: Sequence[str]) -> str:
    if set(days) == set(ALL_DAYS):
        return "every day"
    wanted = [d in days for d in ALL_DAYS]
    parts: list[str] = []
    i = 0
    while i < len(ALL_DAYS):
        if not wanted[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(ALL_DAYS) and wanted[j + 1]:
            j += 1
        parts.append(ALL_DAYS[i] if i == j else f"{ALL_DAYS[i]}-{ALL_DAYS[j]}")
        i = j + 1
    return ",".join(parts) or "no day"


def describe(window: Window) -> str:
    """``mon-fri 09:00-19:00 Europe/Paris (holidays FR)``."""
    hours = "all day" if window.start == time(0) and window.end is None else window.hours.replace(" ", "")
    text = f"{_day_ranges(window.days)} {hours} {window.timezone}"
    return f"{text} (holidays {window.holidays})" if window.holidays else text


_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def describe_moment(
    at: datetime, timezone: str, *, now: datetime | None = None, seconds: bool = False
) -> str:
    """``Tue 1 Dec 09:00`` in ``timezone``; the year is added when it is not ``now``'s (default: ``at``'s)."""
    local = at.astimezone(ZoneInfo(timezone))
    year = f" {local.year}" if now is not None and now.astimezone(local.tzinfo).year != local.year else ""
    clock = f"{local:%H:%M:%S}" if seconds else f"{local:%H:%M}"
    return f"{_WEEKDAYS[local.weekday()]} {local.day} {_MONTHS[local.month - 1]}{year} {clock}"
