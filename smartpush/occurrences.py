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
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from .campaign import Campaign

__all__ = ["AUTO", "Occurrence", "occurrence"]

#: The ``--key`` value that asks for an occurrence key.
AUTO = "auto"


@dataclass(frozen=True)
class Occurrence:
    """The slot a launch at ``now`` belongs to, its key, and why it must not launch (None: it may)."""

    key: str
    slot: datetime | None
    refused: str | None = None


def _timezone(campaign: Campaign, default: str) -> ZoneInfo:
    window = campaign.schedule.window
    return ZoneInfo(window.timezone if window is not None else default)


def occurrence(campaign: Campaign, now: datetime, timezone: str) -> Occurrence:
    """The occurrence of ``campaign`` that a launch at ``now`` (aware) belongs to."""
    schedule = campaign.schedule
    tz = _timezone(campaign, timezone)
    local_now = now.astimezone(tz)
    slot: datetime | None = None
    if schedule.cron is not None:
        from croniter import croniter

        slot = croniter(schedule.cron, local_now).get_prev(datetime)
        if local_now == local_now.replace(second=0, microsecond=0) and croniter.match(
            schedule.cron, local_now
        ):
            slot = local_now  # exactly on a slot: that one, not the one before
    elif schedule.at is not None:
        slot = schedule.at.astimezone(tz)
    if slot is None:
        key = f"{campaign.name}@{local_now.date().isoformat()}"
    else:
        key = f"{campaign.name}@{slot.astimezone(tz).strftime('%Y-%m-%dT%H:%M')}"
    refused = None
    limit = schedule.not_after
    if limit is not None and (now > limit if isinstance(limit, datetime) else local_now.date() > limit):
        refused = f"schedule.not_after ({limit.isoformat()}) has passed"
    elif slot is not None and slot.astimezone(UTC) > now.astimezone(UTC):
        refused = f"its slot {slot.strftime('%Y-%m-%d %H:%M %Z')} has not come yet"
    elif slot is not None and now - slot > schedule.catch_up:
        refused = (
            f"its slot {slot.strftime('%Y-%m-%d %H:%M %Z')} was missed by more than schedule.catch_up "
            f"({schedule.catch_up}); nothing stale is sent"
        )
    return Occurrence(key, slot.astimezone(UTC) if slot is not None else None, refused)
