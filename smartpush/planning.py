"""``plan``: a dry run over the whole audience, streamed, that touches no broker and no provider.

It answers what the officer must know before launching: how many citizens each channel and provider
will reach, which rows are invalid and why (with their line numbers), duplicates, SMS parts and their
cost, the segments the run will be split into and when each provider account will be done: its
``rate``, its ``daily_quota`` (per calendar day in the config's ``timezone``) and the campaign's send
window (with its public holidays) counted, from now or from ``schedule.at``.

Large files are read by several processes at once (one shard of lines each, see
:meth:`AudienceFile.shards`); each shard is scanned without looking for duplicates, then the shards'
recipients are checked for duplicate ids in line order, so the result is the same as one pass.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from .audience import Row, Shard, ignore_interrupts
from .dedup import SeenIds
from .loading import PreparedCampaign
from .provider import SmsProviderOptions
from .recipients import Evaluator
from .windows import describe, effective_window, finish_time, next_opening

__all__ = ["ChannelTotals", "InvalidEntry", "Plan", "ProviderLoad", "make_plan"]

#: Processes used to read a large audience when the caller does not say (this machine's cores, max 4:
#: beyond that the merge in the parent process becomes the bottleneck).
MAX_AUTO_PROCESSES = 4


@dataclass(frozen=True, slots=True)
class InvalidEntry:
    """One invalid row, or one invalid message of a valid row (``channel`` set)."""

    line: int
    reason: str
    channel: str | None = None
    code: str | None = None


@dataclass
class ChannelTotals:
    channel: str
    providers: list[str]
    send: int = 0
    fallback: int = 0
    skipped: int = 0
    invalid: int = 0
    sms_parts: int = 0
    by_encoding: Counter[str] = field(default_factory=Counter)
    forced_ucs2: Counter[str] = field(default_factory=Counter)
    transliterated: int = 0
    cost: Decimal | None = None


@dataclass
class ProviderLoad:
    """One provider account's share of the run, and when it will be done."""

    account: str
    messages: int = 0
    #: What ``rate`` and ``daily_quota`` count: messages, or SMS parts with ``rate_unit: parts``.
    units: int = 0
    unit: str = "messages"
    rate: str | None = None
    per_second: float | None = None
    daily_quota: int | None = None
    #: Time spent sending at ``rate`` alone (None without a rate).
    sending: timedelta | None = None
    #: The first moment the account may send (the window's next opening); None: the window never opens.
    starts_at: datetime | None = None
    #: When its last unit is handed over; None: never (closed window) or more than ten years away.
    done_by: datetime | None = None
    #: From the plan's start to ``done_by``: rate, quota days and window closures counted.
    duration: timedelta | None = None


@dataclass
class Plan:
    campaign: str
    file: str
    category: str
    strategy: str
    audience: str
    encoding: str
    delimiter: str | None
    rows: int = 0
    recipients: int = 0
    filtered: int = 0
    duplicates: list[tuple[int, int]] = field(default_factory=list)
    invalid_rows: list[InvalidEntry] = field(default_factory=list)
    invalid_messages: list[InvalidEntry] = field(default_factory=list)
    unreachable: int = 0
    channels: list[ChannelTotals] = field(default_factory=list)
    providers: list[ProviderLoad] = field(default_factory=list)
    segment_size: int = 0
    segments: int = 0
    #: When the run is taken to start: ``schedule.at`` if later than now, else now (UTC).
    start: datetime | None = None
    #: Whether ``start`` is the campaign's ``schedule.at`` (rather than now).
    scheduled: bool = False
    #: Time zone the dates are shown in: the window's, else the config's.
    timezone: str = "Europe/Paris"
    #: The send window in words (``mon-fri 09:00-19:00 Europe/Paris (holidays FR)``), None: any time.
    window: str | None = None
    #: When the last account is done, and how long after ``start`` that is; None if never.
    done_by: datetime | None = None
    duration: timedelta | None = None
    processes: int = 1
    elapsed_s: float = 0.0

    @property
    def messages(self) -> int:
        return sum(c.send for c in self.channels)

    @property
    def has_invalid(self) -> bool:
        return bool(self.invalid_rows or self.invalid_messages)


#: What one recipient adds to the totals, per channel: (status, SMS parts, encoding, characters that
#: forced UCS-2, transliterated). Recipients share few distinct ones, so shards send a table of them.
Signature = tuple[tuple[str, int, str, tuple[str, ...], bool], ...]


@dataclass
class _Scan:
    """One shard's outcomes, before duplicate ids are checked across shards."""

    rows: int = 0
    filtered: int = 0
    invalid_rows: list[InvalidEntry] = field(default_factory=list)
    invalid_messages: list[InvalidEntry] = field(default_factory=list)
    lines: array[int] = field(default_factory=lambda: array("I"))
    keys: array[int] = field(default_factory=lambda: array("Q"))
    kinds: array[int] = field(default_factory=lambda: array("I"))
    signatures: list[Signature] = field(default_factory=list)


def _scan(prepared: PreparedCampaign, rows: Iterable[Row]) -> _Scan:
    scan = _Scan()
    index: dict[Signature, int] = {}
    key = SeenIds.key
    for outcome in Evaluator(prepared, dedup=False).over(rows):
        scan.rows += 1
        if outcome.kind == "filtered":
            scan.filtered += 1
            continue
        if outcome.kind == "invalid":
            scan.invalid_rows.append(InvalidEntry(outcome.line, outcome.reason or "invalid row"))
            continue
        parts = []
        for ch in outcome.channels:
            sms = ch.rendered.sms if ch.rendered is not None and ch.status == "send" else None
            if sms is not None:
                parts.append((ch.status, sms.parts, str(sms.encoding), sms.non_gsm, bool(sms.replaced)))
            else:
                parts.append((ch.status, 0, "", (), False))
            if ch.status == "invalid":
                scan.invalid_messages.append(
                    InvalidEntry(
                        outcome.line, ch.reason or "invalid", channel=str(ch.channel.channel), code=ch.code
                    )
                )
        signature = tuple(parts)
        kind = index.get(signature)
        if kind is None:
            kind = index[signature] = len(scan.signatures)
            scan.signatures.append(signature)
        scan.lines.append(outcome.line)
        scan.keys.append(key(outcome.recipient_id or ""))
        scan.kinds.append(kind)
    return scan


_FORKED: PreparedCampaign | None = (
    None  # the campaign, inherited by forked processes (templates don't pickle)
)


def _scan_shard(shard: Shard) -> _Scan:
    assert _FORKED is not None  # noqa: S101 - set before the pool forks
    return _scan(_FORKED, _FORKED.audience.rows(shard))


def _scans(prepared: PreparedCampaign, processes: int) -> tuple[list[_Scan], int]:
    global _FORKED
    shards = prepared.audience.shards(processes) if processes > 1 else None
    if not shards or "fork" not in multiprocessing.get_all_start_methods():
        return [_scan(prepared, prepared.audience)], 1
    _FORKED = prepared
    try:
        with multiprocessing.get_context("fork").Pool(len(shards), initializer=ignore_interrupts) as pool:
            return pool.map(_scan_shard, shards, chunksize=1), len(shards)
    finally:
        _FORKED = None


def make_plan(
    prepared: PreparedCampaign, *, processes: int | None = None, now: datetime | None = None
) -> Plan:
    """Stream the audience once (in ``processes`` shards when it is large) and add everything up.

    Durations are counted from ``now`` (default: the current time), or from ``schedule.at`` when the
    campaign is scheduled later.
    """
    started = time.perf_counter()
    if processes is None:
        processes = min(os.cpu_count() or 1, MAX_AUTO_PROCESSES)
    campaign = prepared.campaign
    audience = prepared.audience
    plan = Plan(
        campaign=campaign.name,
        file=prepared.file,
        category=str(campaign.category),
        strategy=campaign.strategy,
        audience=campaign.audience.source,
        encoding=audience.encoding,
        delimiter=audience.delimiter,
        segment_size=campaign.segments.size,
    )
    scans, plan.processes = _scans(prepared, processes)
    seen = SeenIds(capacity=sum(len(scan.lines) for scan in scans))  # sized once: no doubling peaks
    duplicate_lines: set[int] = set()
    counts: Counter[Signature] = Counter()
    while scans:
        scan = scans.pop(0)  # each shard's arrays are freed once merged
        plan.rows += scan.rows
        plan.filtered += scan.filtered
        plan.invalid_rows.extend(scan.invalid_rows)
        for line, key, kind in zip(scan.lines, scan.keys, scan.kinds, strict=True):
            first = seen.add_key(key, line)
            if first is not None:
                plan.duplicates.append((line, first))
                duplicate_lines.add(line)
            else:
                counts[scan.signatures[kind]] += 1
        plan.invalid_messages.extend(e for e in scan.invalid_messages if e.line not in duplicate_lines)
    plan.recipients = sum(counts.values())
    _add_up(prepared, plan, counts, now or datetime.now(UTC))
    plan.segments = math.ceil(plan.recipients / plan.segment_size) if plan.recipients else 0
    plan.elapsed_s = time.perf_counter() - started
    return plan


def _add_up(prepared: PreparedCampaign, plan: Plan, counts: Counter[Signature], now: datetime) -> None:
    totals = [ChannelTotals(str(c.channel), c.providers) for c in prepared.channels]
    loads = {acc: ProviderLoad(acc) for c in prepared.channels for acc in c.providers[:1]}
    for signature, n in counts.items():
        reached = False
        for tot, (status, parts, encoding, non_gsm, replaced) in zip(totals, signature, strict=True):
            if status == "send":
                reached = True
                tot.send += n
                load = loads[tot.providers[0]]
                load.messages += n
                if encoding:
                    tot.sms_parts += parts * n
                    tot.by_encoding[encoding] += n
                    for ch in non_gsm:
                        tot.forced_ucs2[ch] += n
                    tot.transliterated += n if replaced else 0
                    load.units += parts * n
                else:
                    load.units += n
            elif status == "fallback":
                tot.fallback += n
            elif status == "skipped":
                tot.skipped += n
            else:
                tot.invalid += n
        if not reached:
            plan.unreachable += n
    plan.channels = totals
    _estimate(prepared, plan, totals, loads, now)


def _estimate(
    prepared: PreparedCampaign,
    plan: Plan,
    totals: list[ChannelTotals],
    loads: dict[str, ProviderLoad],
    now: datetime,
) -> None:
    accounts = prepared.config.accounts
    for tot in totals:
        options = accounts[tot.providers[0]]
        if isinstance(options, SmsProviderOptions) and options.price_per_part is not None and tot.sms_parts:
            tot.cost = options.price_per_part * tot.sms_parts
    campaign = prepared.campaign
    at = campaign.schedule.at
    plan.scheduled = at is not None and at > now
    start = at if at is not None and plan.scheduled else now
    plan.start = start.astimezone(UTC)
    window = effective_window(campaign)
    plan.window = describe(window) if window is not None else None
    plan.timezone = window.timezone if window is not None else prepared.config.settings.timezone
    quota_timezone = prepared.config.settings.timezone
    opens = next_opening(window, start) if window is not None else plan.start
    ends: list[datetime | None] = []
    for load in loads.values():
        options = accounts[load.account]
        per_parts = isinstance(options, SmsProviderOptions) and options.rate_unit == "parts"
        load.unit = "parts" if per_parts else "messages"
        load.units = load.units if per_parts else load.messages
        load.daily_quota = options.daily_quota
        load.per_second = options.messages_per_second
        if options.rate is not None:
            load.rate = str(options.rate)
        if load.per_second:
            load.sending = timedelta(seconds=math.ceil(load.units / load.per_second))
        load.starts_at = opens
        load.done_by = finish_time(
            window,
            plan.start,
            load.units,
            load.per_second,
            load.daily_quota,
            quota_timezone=quota_timezone,
        )
        if load.done_by is not None:
            load.duration = timedelta(seconds=math.ceil((load.done_by - plan.start).total_seconds()))
        if load.units:
            ends.append(load.done_by)
    plan.providers = list(loads.values())
    if ends and all(end is not None for end in ends):
        plan.done_by = max(end for end in ends if end is not None)
        plan.duration = timedelta(seconds=math.ceil((plan.done_by - plan.start).total_seconds()))
    elif not ends:
        plan.done_by, plan.duration = plan.start, timedelta(0)
