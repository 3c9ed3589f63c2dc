"""How runs look: launch confirmation, live progress, summaries, run lists and reports."""

from __future__ import annotations

import csv
import html
import json
import sys
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from types import TracebackType
from typing import IO, Any

import click
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from smartpush.config import Config
from smartpush.launch import Launch
from smartpush.ledger import FAILED, FINAL, MessageRecord, RunRecord, RunState, Status
from smartpush.loading import PreparedCampaign

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


def run_dict(run: RunRecord, counts: dict[tuple[str, Status], int]) -> dict[str, Any]:
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


def summary(run: RunRecord, counts: dict[tuple[str, Status], int]) -> None:
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
    if run.state is RunState.PAUSED:
        out.print("Paused: `smartpush resume " + run.id + "` continues it.")


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
