"""``plan``: a dry run over the whole audience, streamed, that touches no broker and no provider.

It answers what the officer must know before launching: how many citizens each channel and provider
will reach, which rows are invalid and why (with their line numbers), duplicates, SMS parts and their
cost, the segments the run will be split into and how long the rate limits make it last.

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
from datetime import timedelta
from decimal import Decimal

from .audience import Row, Shard
from .dedup import SeenIds
from .loading import PreparedCampaign
from .provider import SmsProviderOptions
from .recipients import Evaluator

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
    account: str
    messages: int = 0
    units: int = 0
    unit: str = "messages"
    rate: str | None = None
    daily_quota: int | None = None
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
        with multiprocessing.get_context("fork").Pool(len(shards)) as pool:
            return pool.map(_scan_shard, shards, chunksize=1), len(shards)
    finally:
        _FORKED = None


def make_plan(prepared: PreparedCampaign, *, processes: int | None = None) -> Plan:
    """Stream the audience once (in ``processes`` shards when it is large) and add everything up."""
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
    _add_up(prepared, plan, counts)
    plan.segments = math.ceil(plan.recipients / plan.segment_size) if plan.recipients else 0
    plan.elapsed_s = time.perf_counter() - started
    return plan


def _add_up(prepared: PreparedCampaign, plan: Plan, counts: Counter[Signature]) -> None:
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
    _estimate(prepared, plan, totals, loads)


def _estimate(
    prepared: PreparedCampaign, plan: Plan, totals: list[ChannelTotals], loads: dict[str, ProviderLoad]
) -> None:
    accounts = prepared.config.accounts
    for tot in totals:
        options = accounts[tot.providers[0]]
        if isinstance(options, SmsProviderOptions) and options.price_per_part is not None and tot.sms_parts:
            tot.cost = options.price_per_part * tot.sms_parts
    durations: list[timedelta] = []
    for load in loads.values():
        options = accounts[load.account]
        per_parts = isinstance(options, SmsProviderOptions) and options.rate_unit == "parts"
        load.unit = "parts" if per_parts else "messages"
        count = load.units if per_parts else load.messages
        load.units = count
        load.daily_quota = options.daily_quota
        if options.rate is not None:
            load.rate = str(options.rate)
            seconds = count / options.rate.per_second
            if options.daily_quota and count > options.daily_quota:
                # Whole days spent waiting for the quota to refill, then the last day's share.
                full_days = math.ceil(count / options.daily_quota) - 1
                seconds = (
                    full_days * 86400 + (count - full_days * options.daily_quota) / options.rate.per_second
                )
            load.duration = timedelta(seconds=math.ceil(seconds))
            durations.append(load.duration)
    plan.providers = list(loads.values())
    plan.duration = max(durations) if durations else None
