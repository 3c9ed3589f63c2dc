"""Occurrence keys: which scheduled slot a launch belongs to (``smartpush send --key auto``).

cron, systemd timers and Kubernetes CronJobs fire twice, retry, or fire late after an outage. With
``--key auto`` the run's key is the campaign's name and its *slot*, e.g. ``rappel@2026-12-01T09:00``,
so every trigger of one slot finds the same run (SPEC ``send --key``):

* ``schedule.cron``: the latest cron time at or before now, in the window's time zone (else the
  config's ``timezone``);
* ``schedule.at``: that moment;
* no schedule: the local day (one run a day).

A slot older than ``schedule.catch_up`` (default 1 h) is refused: after an outage, a reminder is not
sent hours late (listmonk #1801). A campaign past ``schedule.not_after`` is refused too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

from .campaign import Campaign
from .units import format_duration

__all__ = ["AUTO", "Occurrence", "occurrence", "refusal", "slot_key", "slots", "zone"]

#: The ``--key`` value that asks for an occurrence key.
AUTO = "auto"


@dataclass(frozen=True)
class Occurrence:
    """The slot a launch at ``now`` belongs to, its key, and why it must not launch (None: it may)."""

    key: str
    slot: datetime | None
    refused: str | None = None


def zone(campaign: Campaign, default: str) -> ZoneInfo:
    """The zone a campaign's slots are read in: its window's, else the config's ``timezone``."""
    window = campaign.schedule.window
    return ZoneInfo(window.timezone if window is not None else default)


def slot_key(campaign: Campaign, slot: datetime, tz: ZoneInfo) -> str:
    """The run key of ``slot``: ``NAME@2026-12-01T09:00`` in local time."""
    return f"{campaign.name}@{slot.astimezone(tz).strftime('%Y-%m-%dT%H:%M')}"


def refusal(campaign: Campaign, slot: datetime | None, now: datetime, tz: ZoneInfo) -> str | None:
    """Why ``slot`` must not be launched at ``now`` (None: it may)."""
    schedule = campaign.schedule
    limit = schedule.not_after
    local_now = now.astimezone(tz)
    if limit is not None and (now > limit if isinstance(limit, datetime) else local_now.date() > limit):
        return f"schedule.not_after ({limit.isoformat()}) has passed"
    if slot is None:
        return None
    shown = slot.astimezone(tz).strftime("%Y-%m-%d %H:%M %Z")
    if slot > now:
        return f"its slot {shown} has not come yet"
    if now - slot > schedule.catch_up:
        return (
            f"its slot {shown} was missed by more than schedule.catch_up "
            f"({format_duration(schedule.catch_up)}); nothing stale is sent"
        )
    return None


def occurrence(campaign: Campaign, now: datetime, timezone: str) -> Occurrence:
    """The occurrence of ``campaign`` that a launch at ``now`` (aware) belongs to."""
    schedule = campaign.schedule
    tz = zone(campaign, timezone)
    local_now = now.astimezone(tz)
    slot: datetime | None = None
    if schedule.cron is not None:
        slot = _cron(schedule.cron, local_now).get_prev(datetime)
        if local_now == local_now.replace(second=0, microsecond=0) and _matches(schedule.cron, local_now):
            slot = local_now  # exactly on a slot: that one, not the one before
    elif schedule.at is not None:
        slot = schedule.at
    key = f"{campaign.name}@{local_now.date().isoformat()}" if slot is None else slot_key(campaign, slot, tz)
    utc_slot = slot.astimezone(UTC) if slot is not None else None
    return Occurrence(key, utc_slot, refusal(campaign, utc_slot, now, tz))


def slots(campaign: Campaign, after: datetime, now: datetime, timezone: str, *, limit: int) -> list[datetime]:
    """The slots of ``campaign`` in (``after``, ``now``], oldest first, at most the ``limit`` latest."""
    schedule = campaign.schedule
    found: list[datetime] = []
    if schedule.at is not None:
        if after < schedule.at <= now:
            found.append(schedule.at.astimezone(UTC))
        return found
    if schedule.cron is None:
        return found
    tz = zone(campaign, timezone)
    # Walk back from just after now, so a slot exactly at now is included; in the last second before a
    # slot that walk starts past it, and a slot still to come is neither launched nor recorded skipped.
    walker = _cron(schedule.cron, (now + timedelta(seconds=1)).astimezone(tz))
    while len(found) < limit:
        slot = walker.get_prev(datetime)
        if slot <= after:
            break
        if slot > now:
            continue
        found.append(slot.astimezone(UTC))
    found.reverse()
    return found


def _cron(expression: str, start: datetime) -> croniter:
    return croniter(expression, start)


def _matches(expression: str, moment: datetime) -> bool:
    return bool(croniter.match(expression, moment))
