"""How runs look: launch confirmation, live progress, summaries, run lists and reports."""

from __future__ import annotations

import csv
import html
import json
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from zoneinfo import ZoneInfo

import click
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from smartpush.campaign import Campaign, Window
from smartpush.config import Config
from smartpush.launch import Launch
from smartpush.ledger import (
    FAILED,
    FINAL,
    Ledger,
    MessageRecord,
    OccurrenceRecord,
    RunRecord,
    RunState,
    Status,
)
from smartpush.loading import PreparedCampaign
from smartpush.provider import SmsProviderOptions
from smartpush.ratelimit import DAILY_QUOTA_CODE
from smartpush.windows import (
    describe,
    describe_moment,
    effective_window,
    finish_time,
    is_holiday,
    local_midnight_after,
    next_opening,
)

from .output import err, out

REPORT_COLUMNS = [
    "message_id",
    "recipient_id",
    "channel",
    "provider",
    "status",
    "attempts",
    "created_at",
    "sent_at",
    "delivered_at",
    "provider_reference",
    "error",
]
#: Shown first, in this order, in tables; other statuses follow.
STATUS_ORDER = [s.value for s in Status]


# What a running run waits for, per provider account ----------------------------------------------
#: Messages handed to an account over this many seconds make its current rate.
RATE_WINDOW_S = 60


@dataclass
class AccountStatus:
    """One provider account's part of a run, as ``status`` shows it."""

    account: str
    #: Messages handed to the account over the last :data:`RATE_WINDOW_S` seconds, per second.
    current_per_s: float
    rate: str | None = None
    per_second: float | None = None
    daily_quota: int | None = None
    unit: str = "messages"
    #: Messages still to hand over (``created`` or ``sending``), of which ``held`` wait for the quota.
    left: int = 0
    held: int = 0
    #: Fallback messages that go out only if the channels before them fail.
    fallbacks: int = 0
    sent_today: int = 0
    done_by: datetime | None = None
    #: Whether the config names this account (a run may outlive an account's entry).
    known: bool = True


@dataclass
class RunStatus:
    """Per provider account rates and ETA of a run, and what it waits for (a window, a quota)."""

    now: datetime
    #: The config's time zone: where daily quotas reset at midnight.
    timezone: str
    window: Window | None = None
    #: Set when the window is closed now: when it opens again (None with ``never_opens``).
    window_opens_at: datetime | None = None
    never_opens: bool = False
    accounts: list[AccountStatus] = field(default_factory=list)
    quota_resets_at: datetime | None = None
    done_by: datetime | None = None
    note: str | None = None

    @property
    def display_timezone(self) -> str:
        return self.window.timezone if self.window is not None else self.timezone

    def _when(self, at: datetime, *, up: bool = False) -> str:
        if up and (at.second or at.microsecond):
            at = at.replace(second=0, microsecond=0) + timedelta(minutes=1)
        return f"{describe_moment(at, self.display_timezone, now=self.now)} {self.display_timezone}"

    def waiting(self) -> list[str]:
        """What holds the run back now, in words."""
        found = []
        if self.never_opens and self.window is not None:
            found.append(f"its send window never opens ({describe(self.window)}): check schedule.window")
        elif self.window_opens_at is not None and self.window is not None:
            today = self.now.astimezone(ZoneInfo(self.window.timezone)).date()
            holiday = " (a public holiday today)" if is_holiday(self.window.holidays, today) else ""
            found.append(
                f"outside its send window{holiday} until {self._when(self.window_opens_at)} "
                f"— window {describe(self.window)}"
            )
        resets = self.quota_resets_at
        for a in self.accounts:
            if a.held and resets is not None:
                local = resets.astimezone(ZoneInfo(self.timezone))
                found.append(
                    f"{a.held:,} messages wait for account {a.account}'s daily quota "
                    f"(resets at {local:%H:%M} {self.timezone})"
                )
        return found

    def lines(self) -> list[str]:
        out_ = [f"Waiting: {w}" for w in self.waiting()]
        if self.note:
            out_.append(self.note)
        for a in self.accounts:
            limits = ", ".join(
                x
                for x in (
                    "not in this config"
                    if not a.known
                    else f"rate {a.rate}"
                    if a.rate
                    else "no rate limit set",
                    _quota_text(a) if a.daily_quota else "",
                )
                if x
            )
            text = f"  {a.account}: {a.current_per_s:,.1f}/s over the last {RATE_WINDOW_S} s ({limits})"
            if a.left:
                parts = " (counting one SMS part a message)" if a.unit == "parts" else ""
                text += f"; {a.left:,} messages left"
                if a.done_by is not None:
                    text += f" → done by {self._when(a.done_by, up=True)}{parts}"
            if a.fallbacks:
                text += f"; {a.fallbacks:,} fallbacks in reserve"
            out_.append(text)
        if self.accounts:
            out_.insert(len(out_) - len(self.accounts), "Provider accounts (rate now, limits, ETA):")
        if self.done_by is not None:
            out_.append(
                f"Expected done by {self._when(self.done_by, up=True)} (rates, quotas and window counted)"
            )
        return out_

    def as_dict(self) -> dict[str, Any]:
        waiting: list[dict[str, Any]] = []
        if self.window_opens_at is not None or self.never_opens:
            waiting.append({"reason": "send-window", "until": _iso(self.window_opens_at)})
        waiting.extend(
            {
                "reason": DAILY_QUOTA_CODE,
                "account": a.account,
                "messages": a.held,
                "resets_at": _iso(self.quota_resets_at),
            }
            for a in self.accounts
            if a.held
        )
        return {
            "window": describe(self.window) if self.window is not None else None,
            "waiting": waiting,
            "waiting_text": self.waiting(),
            "providers": [
                {
                    "account": a.account,
                    "current_rate_per_s": round(a.current_per_s, 2),
                    "rate": a.rate,
                    "rate_per_s": a.per_second,
                    "daily_quota": a.daily_quota,
                    "sent_today": a.sent_today,
                    "left": a.left,
                    "waiting_for_quota": a.held,
                    "fallbacks": a.fallbacks,
                    "done_by": _iso(a.done_by),
                    "eta_s": _seconds_until(self.now, a.done_by),
                }
                for a in self.accounts
            ],
            "done_by": _iso(self.done_by),
            "done_in_s": _seconds_until(self.now, self.done_by),
        }


def _quota_text(a: AccountStatus) -> str:
    if a.held:
        return f"quota {a.daily_quota:,}/day, used up today"
    return f"quota {a.daily_quota:,}/day, {a.sent_today:,} sent today by this run"


def _seconds_until(now: datetime, at: datetime | None) -> int | None:
    return max(0, int((at - now).total_seconds() + 0.999)) if at is not None else None


def _campaign_of(run: RunRecord) -> Campaign | None:
    """The run's campaign as its file says now (only its shape: no audience, no templates)."""
    from pydantic import ValidationError

    from smartpush.errors import SmartpushError
    from smartpush.yamlfile import load

    try:
        raw, _ = load(Path(run.campaign_file), run.campaign_file)
        return Campaign.model_validate(raw)
    except (SmartpushError, ValidationError, OSError):
        return None


def run_status(
    run: RunRecord, ledger: Ledger, config: Config, now: datetime | None = None
) -> RunStatus | None:
    """What a run that is not over yet does per provider account, and what it waits for.

    Current rate: messages the run handed to each account over the last minute (``sent_at``). ETA:
    the messages left (``created``/``sending``) at the account's ``rate``, within the campaign's send
    window, under its ``daily_quota`` (calendar days in the config's ``timezone``; the run's own sends
    since local midnight count as today's use, all of it while messages wait for the quota). None
    for a finished or cancelled run.
    """
    if run.state in (RunState.FINISHED, RunState.CANCELLED):
        return None
    now = (now or datetime.now(UTC)).astimezone(UTC)
    tz = config.settings.timezone
    campaign = _campaign_of(run)
    view = RunStatus(now=now, timezone=tz)
    if campaign is None:
        view.note = f"The campaign file {run.campaign_file} cannot be read now: its send window is not shown."
    else:
        view.window = effective_window(campaign)
    if view.window is not None:
        opens = next_opening(view.window, now)
        view.never_opens = opens is None
        view.window_opens_at = opens if opens is not None and opens > now else None
    resets = local_midnight_after(now, tz)
    today = datetime.combine(
        resets.astimezone(ZoneInfo(tz)).date() - timedelta(days=1), time(0), ZoneInfo(tz)
    )
    since = max(now - timedelta(seconds=RATE_WINDOW_S), run.started_at or now - timedelta(seconds=1))
    window_s = max((now - since).total_seconds(), 1.0)
    sent = ledger.sent_per_provider(run.id, [since, today])
    unsent = ledger.unsent_per_provider(run.id, DAILY_QUOTA_CODE, now)
    ends: list[datetime | None] = []
    for account in sorted(set(sent) | set(unsent)):
        recent, today_n = sent.get(account, [0, 0])
        counts = unsent.get(account, {})
        a = AccountStatus(account, current_per_s=recent / window_s, sent_today=today_n)
        a.left = counts.get(Status.CREATED.value, 0) + counts.get(Status.SENDING.value, 0)
        a.held = counts.get(DAILY_QUOTA_CODE, 0)
        a.fallbacks = counts.get(Status.WAITING.value, 0)
        options = config.accounts.get(account)
        a.known = options is not None
        if options is not None:
            a.rate = str(options.rate) if options.rate is not None else None
            a.per_second = options.messages_per_second
            a.daily_quota = options.daily_quota
            if isinstance(options, SmsProviderOptions) and options.rate_unit == "parts":
                a.unit = "parts"
        if a.left and run.state is not RunState.PAUSED and not view.never_opens:
            used = a.daily_quota if a.held and a.daily_quota else a.sent_today
            a.done_by = finish_time(
                view.window, now, a.left, a.per_second, a.daily_quota, quota_timezone=tz, used_today=used
            )
            ends.append(a.done_by)
        view.accounts.append(a)
    if any(a.held for a in view.accounts):
        view.quota_resets_at = resets
    if ends and all(e is not None for e in ends):
        view.done_by = max(e for e in ends if e is not None)
    return view


def confirm(prepared: PreparedCampaign, config: Config) -> None:
    campaign = prepared.campaign
    rows = prepared.audience.lines_hint()
    size = f"about {rows:,} rows" if rows is not None else "its rows"
    channels = ", ".join(f"{c.channel} via {' → '.join(c.providers)}" for c in prepared.channels)
    mode = f"broker {config.settings.broker}" if config.settings.broker else "embedded, in this process"
    err.print(
        f"Campaign [bold]{escape(campaign.name)}[/] ({campaign.category}) to {size} of "
        f"{escape(campaign.audience.source)}: {escape(channels)}; {mode}."
    )
    click.confirm("Send it now?", abort=True, err=True)


def launched(result: Launch) -> None:
    run = result.run
    what = "resumed the split of" if result.resumed else ("launched" if result.created else "found")
    err.print(
        f"{what.capitalize()} run [bold]{run.id}[/] of {escape(run.campaign)}: "
        f"{result.recipients:,} recipients stored now, {result.duplicates:,} duplicate ids sent once, "
        f"{result.invalid_rows:,} invalid rows recorded, {result.filtered:,} left out by `where`."
    )
    if result.reached_recently or result.capped:
        err.print(
            f"Skipped as reached recently: {result.reached_recently:,} by this campaign "
            f"(audience.exclude_reached), {result.capped:,} by the frequency cap (limits.per_recipient)."
        )


def by_status(counts: dict[tuple[str, Status], int]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for (_, status), n in counts.items():
        total[status.value] += n
    return {s: total[s] for s in STATUS_ORDER if total[s]}


def by_channel(counts: dict[tuple[str, Status], int]) -> dict[str, dict[str, int]]:
    out_: dict[str, dict[str, int]] = {}
    for (channel, status), n in sorted(
        counts.items(), key=lambda kv: (kv[0][0], STATUS_ORDER.index(kv[0][1]))
    ):
        out_.setdefault(channel, {})[status.value] = n
    return out_


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def pace(run: RunRecord, total: int, final: int) -> tuple[float | None, int | None]:
    """Messages made final per second since the run started, and the seconds left at that pace."""
    if run.started_at is None or run.state is not RunState.RUNNING:
        return None, None
    elapsed = (datetime.now(UTC) - run.started_at).total_seconds()
    if elapsed <= 0 or final == 0:
        return None, None
    rate = final / elapsed
    return rate, int((total - final) / rate)


def run_dict(
    run: RunRecord, counts: dict[tuple[str, Status], int], view: RunStatus | None = None
) -> dict[str, Any]:
    """The run for ``--json``; with ``view`` (``status``), per account rates, ETA and what it waits for."""
    total = sum(counts.values())
    final = sum(n for (_, s), n in counts.items() if s in FINAL)
    rate, eta = pace(run, total, final)
    return {
        "run_id": run.id,
        "campaign": run.campaign,
        "state": run.state.value,
        "key": run.key,
        "recipients": run.recipients,
        "segments": run.segments,
        "messages": total,
        "final": final,
        "failed": sum(n for (_, s), n in counts.items() if s in FAILED),
        "rate_per_s": round(rate, 1) if rate is not None else None,
        "eta_s": eta,
        "counts": by_status(counts),
        "by_channel": by_channel(counts),
        "parent_run_id": run.parent_run_id,
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        **(view.as_dict() if view is not None else {}),
    }


def _counts_table(counts: dict[tuple[str, Status], int]) -> Table:
    channels = by_channel(counts)
    statuses = list(by_status(counts))
    table = Table(show_edge=False)
    table.add_column("channel")
    for s in statuses:
        table.add_column(s, justify="right")
    table.add_column("total", justify="right")
    for channel, row in channels.items():
        table.add_row(channel, *(f"{row.get(s, 0):,}" for s in statuses), f"{sum(row.values()):,}")
    return table


class Progress:
    """Live progress on a terminal; a line every few seconds otherwise; nothing with --json."""

    #: Seconds between progress lines when the output is not a terminal.
    LINE_EVERY_S = 5.0

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.live: Live | None = None
        self.last_line = 0.0
        self.started = datetime.now(UTC)
        self.first_final: int | None = None
        self.notes: list[str] = []

    def __enter__(self) -> Progress:
        if self.enabled and self.tty:
            self.live = Live(console=err, refresh_per_second=4, transient=True)
            self.live.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.live is not None:
            self.live.__exit__(kind, exc, tb)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def update(self, run: RunRecord, counts: dict[tuple[str, Status], int]) -> None:
        if not self.enabled:
            return
        total = sum(counts.values())
        final = sum(n for (_, s), n in counts.items() if s in FINAL)
        if self.first_final is None:
            self.first_final = final
        elapsed = max((datetime.now(UTC) - self.started).total_seconds(), 1e-3)
        rate = (final - self.first_final) / elapsed
        eta = f", about {int((total - final) / rate)} s left" if rate > 0 and total > final else ""
        head = f"run {run.id} · {run.state.value} · {final:,}/{total:,} messages final · {rate:,.0f}/s{eta}"
        if self.live is not None:
            table = _counts_table(counts)
            table.title = head + ("\n" + "; ".join(self.notes) if self.notes else "")
            self.live.update(table)
        elif datetime.now(UTC).timestamp() - self.last_line >= self.LINE_EVERY_S:
            self.last_line = datetime.now(UTC).timestamp()
            err.print(head)


def summary(run: RunRecord, counts: dict[tuple[str, Status], int], view: RunStatus | None = None) -> None:
    d = run_dict(run, counts)
    pace_text = ""
    if d["rate_per_s"] is not None:
        pace_text = f"; {d['rate_per_s']:,.0f} messages/s, about {d['eta_s']:,} s left"
    out.print(
        f"[bold]Run {run.id}[/] of {escape(run.campaign)}: {run.state.value}; "
        f"{d['final']:,}/{d['messages']:,} messages final, {d['failed']:,} failed{pace_text}"
    )
    if counts:
        out.print(_counts_table(counts))
    if view is not None:
        for line in view.lines():
            out.print(escape(line))
    if run.state is RunState.PAUSED:
        out.print("Paused: `smartpush resume " + run.id + "` continues it.")


def occurrence_dict(
    occ: OccurrenceRecord, run: RunRecord | None, counts: dict[tuple[str, Status], int]
) -> dict[str, Any]:
    """One slot of a scheduled campaign for ``runs --campaign --json``."""
    return {
        "key": occ.key,
        "slot": _iso(occ.slot),
        "outcome": occ.outcome,
        "source": occ.source,
        "reason": occ.reason,
        "recorded_at": _iso(occ.recorded_at),
        "run_id": occ.run_id,
        "state": run.state.value if run is not None else None,
        "counts": by_status(counts),
    }


def occurrence_table(
    campaign: str,
    history: list[tuple[OccurrenceRecord, RunRecord | None, dict[tuple[str, Status], int]]],
) -> None:
    """The slots of a scheduled campaign, latest first: launched (with the run's counts) or skipped."""
    table = Table(title=f"Occurrences of {escape(campaign)}", show_edge=False, title_justify="left")
    numbers = ("sent", "delivered", "skipped", "failed")
    for col in ("key", "outcome", "run / reason", *numbers):
        table.add_column(col, justify="right" if col in numbers else "left", overflow="fold")
    for occ, run, counts in history:
        outcome = f"{occ.outcome} ({occ.source})"
        if run is None:
            table.add_row(escape(occ.key), outcome, escape(occ.reason or ""), *("",) * 4)
            continue
        total = by_status(counts)
        failed = sum(n for (_, s), n in counts.items() if s in FAILED)
        table.add_row(
            escape(occ.key),
            outcome,
            f"{run.id} ({run.state.value})",
            f"{total.get('sent', 0):,}",
            f"{total.get('delivered', 0):,}",
            f"{total.get('skipped', 0):,}",
            f"{failed:,}",
        )
    out.print(table)
    out.print()


def run_table(found: list[tuple[RunRecord, dict[tuple[str, Status], int]]]) -> None:
    if not found:
        out.print("No runs yet: `smartpush send CAMPAIGN` launches one.")
        return
    table = Table(show_edge=False)
    for col in ("run", "campaign", "state", "key", "created", "messages", "final", "failed"):
        table.add_column(col, justify="right" if col in ("messages", "final", "failed") else "left")
    for run, counts in found:
        d = run_dict(run, counts)
        created = run.created_at.astimezone().strftime("%Y-%m-%d %H:%M") if run.created_at else ""
        table.add_row(
            run.id,
            escape(run.campaign),
            run.state.value,
            escape(run.key or ""),
            created,
            f"{d['messages']:,}",
            f"{d['final']:,}",
            f"{d['failed']:,}",
        )
    out.print(table)


def _record(m: MessageRecord, include_addresses: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "message_id": m.id,
        "recipient_id": m.recipient_id,
        "channel": m.channel,
        "provider": m.provider,
        "status": m.status.value,
        "attempts": m.attempts,
        "created_at": _iso(m.created_at),
        "sent_at": _iso(m.sent_at),
        "delivered_at": _iso(m.delivered_at),
        "provider_reference": m.provider_reference,
        "error": " ".join(x for x in (m.error_code, m.error_text) if x) or None,
    }
    if include_addresses:
        row["address"] = m.address
    return row


def report(
    stream: IO[str],
    fmt: str,
    run: RunRecord,
    counts: dict[tuple[str, Status], int],
    messages: Iterable[MessageRecord],
    *,
    include_addresses: bool,
) -> None:
    columns = REPORT_COLUMNS + (["address"] if include_addresses else [])
    if fmt == "csv":
        writer = csv.writer(stream)
        writer.writerow(columns)
        for m in messages:
            rec = _record(m, include_addresses)
            writer.writerow(["" if rec[c] is None else rec[c] for c in columns])
    elif fmt == "json":
        stream.write('{"run": ' + json.dumps(run_dict(run, counts), ensure_ascii=False) + ', "messages": [')
        for i, m in enumerate(messages):
            stream.write(
                ("," if i else "") + "\n" + json.dumps(_record(m, include_addresses), ensure_ascii=False)
            )
        stream.write("\n]}\n")
    elif fmt == "html":
        d = run_dict(run, counts)
        stream.write(
            '<!DOCTYPE html>\n<html lang="fr"><head><meta charset="utf-8">'
            f"<title>Rapport {html.escape(run.id)}"
            f"</title></head><body>\n<h1>Run {html.escape(run.id)} — {html.escape(run.campaign)}</h1>\n"
            f"<p>State: {html.escape(run.state.value)}; {d['final']:,}/{d['messages']:,} messages final, "
            f"{d['failed']:,} failed.</p>\n<table>\n<caption>Messages</caption>\n<thead><tr>"
            + "".join(f'<th scope="col">{html.escape(c)}</th>' for c in columns)
            + "</tr></thead>\n<tbody>\n"
        )
        for m in messages:
            rec = _record(m, include_addresses)
            stream.write(
                "<tr>" + "".join(f"<td>{html.escape(str(rec[c] or ''))}</td>" for c in columns) + "</tr>\n"
            )
        stream.write("</tbody></table></body></html>\n")
    else:
        summary(run, counts)
        table = Table(show_edge=False)
        for c in columns:
            table.add_column(c)
        for m in messages:
            rec = _record(m, include_addresses)
            table.add_row(*(escape(str(rec[c])) if rec[c] is not None else "" for c in columns))
        out.print(table)
