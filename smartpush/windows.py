"""Send windows: when a campaign may send, and when it may next send.

A window is days of the week and a time range in a time zone. ``marketing`` campaigns without a
window get Monday–Saturday 08:00–20:00 Europe/Paris (SPEC.md). Public holidays arrive with the
rate-limits issue.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from .campaign import ALL_DAYS, Campaign, Category, Window

__all__ = ["MARKETING_WINDOW", "effective_window", "next_opening"]

MARKETING_WINDOW = Window(days=["mon", "tue", "wed", "thu", "fri", "sat"], hours="08:00-20:00")
#: How far ahead to look for an opening before concluding the window never opens.
_SEARCH_DAYS = 8


def effective_window(campaign: Campaign) -> Window | None:
    """The campaign's window, or the marketing default, or None (any time)."""
    if campaign.schedule.window is not None:
        return campaign.schedule.window
    return MARKETING_WINDOW if campaign.category is Category.MARKETING else None


def next_opening(window: Window, now: datetime) -> datetime | None:
    """``now`` if sending is allowed at ``now``, else the next moment it is (UTC); None if never."""
    tz = ZoneInfo(window.timezone)
    local = now.astimezone(tz)
    start, end = window.start, window.end
    for offset in range(_SEARCH_DAYS):
        day = (local + timedelta(days=offset)).date()
        if ALL_DAYS[day.weekday()] not in window.days:
            continue
        opens = datetime.combine(day, start, tzinfo=tz)
        closes = (
            datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz)
            if end is None
            else (datetime.combine(day, end, tzinfo=tz))
        )
        if local < closes:
            return max(local, opens).astimezone(UTC)
    return None
