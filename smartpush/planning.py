"""``plan``: a dry run over the whole audience, streamed, that touches no broker and no provider.

It answers what the officer must know before launching: how many citizens each channel and provider
will reach, which rows are invalid and why (with their line numbers), duplicates, SMS parts and their
cost, the segments the run will be split into and how long the rate limits make it last.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

from .loading import PreparedCampaign
from .provider import SmsProviderOptions
from .recipients import Evaluator

__all__ = ["ChannelTotals", "InvalidEntry", "Plan", "ProviderLoad", "make_plan"]


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
    elapsed_s: float = 0.0

    @property
    def messages(self) -> int:
        return sum(c.send for c in self.channels)

    @property
    def has_invalid(self) -> bool:
        return bool(self.invalid_rows or self.invalid_messages)


def make_plan(prepared: PreparedCampaign) -> Plan:
    """Stream the audience once and add everything up."""
    started = time.perf_counter()
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
    totals = [ChannelTotals(str(c.channel), c.providers) for c in prepared.channels]
    loads = {acc: ProviderLoad(acc) for c in prepared.channels for acc in c.providers[:1]}
    for outcome in Evaluator(prepared):
        plan.rows += 1
        kind = outcome.kind
        if kind == "filtered":
            plan.filtered += 1
            continue
        if kind == "duplicate":
            plan.duplicates.append((outcome.line, outcome.duplicate_of or 0))
            continue
        if kind == "invalid":
            plan.invalid_rows.append(InvalidEntry(outcome.line, outcome.reason or "invalid row"))
            continue
        plan.recipients += 1
        reached = False
        for tot, ch in zip(totals, outcome.channels, strict=True):
            status = ch.status
            if status == "send":
                reached = True
                tot.send += 1
                load = loads[ch.provider]
                load.messages += 1
                sms = ch.rendered.sms if ch.rendered is not None else None
                if sms is not None:
                    tot.sms_parts += sms.parts
                    tot.by_encoding[sms.encoding] += 1
                    tot.forced_ucs2.update(sms.non_gsm)
                    if sms.replaced:
                        tot.transliterated += 1
                    load.units += sms.parts
                else:
                    load.units += 1
            elif status == "fallback":
                tot.fallback += 1
            elif status == "skipped":
                tot.skipped += 1
            else:
                tot.invalid += 1
                plan.invalid_messages.append(
                    InvalidEntry(outcome.line, ch.reason or "invalid", channel=tot.channel, code=ch.code)
                )
        if not reached:
            plan.unreachable += 1
    plan.channels = totals
    plan.segments = math.ceil(plan.recipients / plan.segment_size) if plan.recipients else 0
    _estimate(prepared, plan, totals, loads)
    plan.elapsed_s = time.perf_counter() - started
    return plan


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
