"""How results look: rich tables for people, JSON for machines (``--json``: stdout holds only JSON)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from smartpush.errors import ConfigError, Problem, SmartpushError
from smartpush.loading import PreparedCampaign
from smartpush.planning import InvalidEntry, Plan, ProviderLoad
from smartpush.recipients import RecipientOutcome
from smartpush.windows import describe_moment

out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)


def print_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2, default=str) + "\n")


def _problems(exc: SmartpushError) -> Sequence[Problem]:
    return exc.problems if isinstance(exc, ConfigError) else [Problem(str(exc))]


def error_dict(exc: SmartpushError) -> dict[str, Any]:
    return {"ok": False, "error": type(exc).__name__, "problems": [p.as_dict() for p in _problems(exc)]}


def error(exc: SmartpushError, *, as_json: bool) -> None:
    problems = _problems(exc)
    if as_json:
        print_json(error_dict(exc))
        return
    noun = "problem" if len(problems) == 1 else "problems"
    err.print(f"[bold red]{len(problems)} {noun}[/] to fix:")
    for p in problems:
        err.print(f"  [red]✗[/] {escape(str(p))}")


def warnings(problems: Sequence[Problem]) -> None:
    for p in problems:
        err.print(f"[yellow]warning:[/] {escape(str(p))}")


def initialised(directory: Path, written: list[str], *, as_json: bool) -> None:
    if as_json:
        print_json({"ok": True, "directory": str(directory), "files": written})
        return
    out.print(f"Wrote {len(written)} files into [bold]{escape(str(directory))}[/]. Next:")
    out.print(f"  cd {escape(str(directory))}")
    out.print("  smartpush validate campaigns/rappel-vaccination-grippe.yaml")
    out.print("  smartpush preview campaigns/rappel-vaccination-grippe.yaml")
    out.print("  smartpush plan campaigns/rappel-vaccination-grippe.yaml")


def human_duration(value: timedelta | None) -> str:
    if value is None:
        return "not limited by any rate"
    seconds = int(value.total_seconds())
    if seconds < 60:  # noqa: PLR2004
        return f"{seconds} s"
    parts = []
    units = (("d", 86400), ("h", 3600), ("min", 60)) + ((("s", 1),) if seconds < 3600 else ())  # noqa: PLR2004
    for unit, size in units:
        n, seconds = divmod(seconds, size)
        if n:
            parts.append(f"{n} {unit}")
    return " ".join(parts)


def _moment(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _entry(e: InvalidEntry) -> dict[str, Any]:
    return {"line": e.line, "channel": e.channel, "code": e.code, "reason": e.reason}


def _findings(p: Plan) -> dict[str, Any]:
    return {
        "duplicates": [{"line": line, "first_line": first} for line, first in p.duplicates],
        "invalid_rows": [_entry(e) for e in p.invalid_rows],
        "invalid_messages": [_entry(e) for e in p.invalid_messages],
    }


def plan_dict(p: Plan) -> dict[str, Any]:
    return {
        "ok": not p.has_invalid,
        "campaign": p.campaign,
        "file": p.file,
        "category": p.category,
        "strategy": p.strategy,
        "audience": {"source": p.audience, "encoding": p.encoding, "delimiter": p.delimiter, "rows": p.rows},
        "recipients": p.recipients,
        "messages": p.messages,
        "filtered_out": p.filtered,
        "unreachable": p.unreachable,
        **_findings(p),
        "channels": [
            {
                "channel": c.channel,
                "providers": c.providers,
                "send": c.send,
                "fallback": c.fallback,
                "skipped": c.skipped,
                "invalid": c.invalid,
                **(
                    {
                        "sms_parts": c.sms_parts,
                        "by_encoding": dict(c.by_encoding),
                        "characters_forcing_ucs2": dict(c.forced_ucs2.most_common()),
                        "transliterated": c.transliterated,
                        "cost": str(c.cost) if c.cost is not None else None,
                    }
                    if c.channel == "sms"
                    else {}
                ),
            }
            for c in p.channels
        ],
        "providers": [
            {
                "account": pl.account,
                "messages": pl.messages,
                "units": pl.units,
                "unit": pl.unit,
                "rate": pl.rate,
                "rate_per_s": pl.per_second,
                "daily_quota": pl.daily_quota,
                "sending_s": int(pl.sending.total_seconds()) if pl.sending is not None else None,
                "starts_at": _moment(pl.starts_at),
                "done_by": _moment(pl.done_by),
                "duration_s": int(pl.duration.total_seconds()) if pl.duration is not None else None,
            }
            for pl in p.providers
        ],
        "segments": {"size": p.segment_size, "count": p.segments},
        "start": _moment(p.start),
        "scheduled": p.scheduled,
        "window": p.window,
        "timezone": p.timezone,
        "done_by": _moment(p.done_by),
        "estimated_duration_s": int(p.duration.total_seconds()) if p.duration is not None else None,
        "processes": p.processes,
        "elapsed_s": round(p.elapsed_s, 3),
    }


def _invalid_table(p: Plan, limit: int) -> None:
    entries = sorted([*p.invalid_rows, *p.invalid_messages], key=lambda e: e.line)
    total = len(entries)
    if not total:
        return
    shown = entries if limit == 0 else entries[:limit]
    table = Table(title=f"Invalid: {total}", title_justify="left", show_edge=False)
    table.add_column("line", justify="right")
    table.add_column("channel")
    table.add_column("reason")
    for e in shown:
        table.add_row(str(e.line), e.channel or "(row)", escape(e.reason))
    out.print(table)
    if len(shown) < total:
        out.print(f"  … and {total - len(shown)} more (all of them with --limit 0 or --json)")


def plan(p: Plan, prepared: PreparedCampaign, *, limit: int) -> None:
    out.print(f"[bold]Plan for {escape(p.campaign)}[/] ({p.category}, strategy {p.strategy})")
    delim = f" · delimiter '{p.delimiter}'" if p.delimiter else ""
    out.print(f"Audience {escape(p.audience)} · {p.encoding}{delim} · {p.rows:,} rows")
    out.print(
        f"  recipients {p.recipients:,} · left out by `where` {p.filtered:,} · "
        f"duplicates {len(p.duplicates):,} · invalid rows {len(p.invalid_rows):,} · "
        f"reachable on no channel {p.unreachable:,}"
    )
    table = Table(show_edge=False)
    for col, justify in (
        ("channel", "left"),
        ("provider", "left"),
        ("to send", "right"),
        ("fallback", "right"),
        ("no address", "right"),
        ("invalid", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for c in p.channels:
        table.add_row(
            c.channel,
            " → ".join(c.providers),
            f"{c.send:,}",
            f"{c.fallback:,}",
            f"{c.skipped:,}",
            f"{c.invalid:,}",
        )
    out.print(table)
    for c in p.channels:
        if c.channel != "sms" or not c.send:
            continue
        enc = ", ".join(f"{k} {v:,}" for k, v in sorted(c.by_encoding.items()))
        summary = f"SMS: {c.send:,} messages, {c.sms_parts:,} parts ({enc})"
        if c.cost is not None:
            summary += f"; estimated cost {c.cost:,.2f} (parts × price_per_part)"
        out.print(summary)
        if c.forced_ucs2:
            chars = ", ".join(f"'{ch}' ×{n:,}" for ch, n in c.forced_ucs2.most_common(10))
            out.print(
                f"  characters that forced UCS-2 (70 characters a part instead of 160): {escape(chars)}"
            )
            if not prepared.campaign.sms.transliterate:
                out.print("  sms.transliterate: true in the campaign would replace the French ones")
        if c.transliterated:
            out.print(f"  {c.transliterated:,} messages had characters replaced (sms.transliterate)")
    out.print(
        f"Run: {p.recipients:,} recipients in {p.segments:,} segment(s) of up to {p.segment_size:,}; "
        f"{p.messages:,} messages"
    )
    for pl in p.providers:
        out.print(f"  {escape(_load_line(p, pl))}")
    out.print(escape(_estimate_line(p)))
    for line, first in p.duplicates[: limit or None]:
        out.print(f"  [yellow]duplicate[/] line {line}: same recipient id as line {first}; sent once")
    _invalid_table(p, limit)
    status = (
        "[red]invalid rows found: fix them or they will not be sent[/]" if p.has_invalid else "[green]ok[/]"
    )
    procs = f" by {p.processes} processes" if p.processes > 1 else ""
    out.print(f"Planned {p.rows:,} rows in {p.elapsed_s:.1f} s{procs}. {status}")


def _when(p: Plan, value: datetime, *, up: bool = False) -> str:
    """A moment in the plan's time zone; ``up`` rounds to the next minute ("done by" is a promise)."""
    if up and (value.second or value.microsecond):
        value = value.replace(second=0, microsecond=0) + timedelta(minutes=1)
    return describe_moment(value, p.timezone, now=p.start)


def _load_line(p: Plan, pl: ProviderLoad) -> str:
    """``sms-main: 12,400 SMS parts at 100/s, quota 250,000/day → 2 min 4 s of sending; window …``."""
    unit = "SMS parts" if pl.unit == "parts" else "messages"
    text = f"{pl.account}: {pl.units:,} {unit} " + (f"at {pl.rate}" if pl.rate else "no rate limit set")
    if pl.daily_quota:
        text += f", quota {pl.daily_quota:,}/day"
    if pl.sending is not None:
        text += f" → {human_duration(pl.sending)} of sending"
    else:
        text += " → as fast as the provider takes them"
    text += f"; window {p.window}: " if p.window else "; no send window: "
    if pl.starts_at is None:
        return text + "the window never opens, nothing would be sent"
    now = not p.scheduled and p.start is not None and pl.starts_at <= p.start
    starts = "starts now" if now else f"starts {_when(p, pl.starts_at)}"
    if not pl.units:
        return text + "nothing to send"
    if pl.done_by is None:
        return text + f"{starts}, not done within ten years"
    return text + f"{starts}, done by {_when(p, pl.done_by, up=True)}"


def _estimate_line(p: Plan) -> str:
    if p.start is None:
        return "Estimated duration: unknown"
    if p.done_by is None or p.duration is None:
        return "Estimated duration: never done (the send window never opens, or more than ten years)"
    since = f"schedule.at {_when(p, p.start)}" if p.scheduled else "now"
    return (
        f"Estimated duration: {human_duration(p.duration)} from {since} "
        f"(rates, daily quotas and send windows counted): done by {_when(p, p.done_by, up=True)} {p.timezone}"
    )


def validated_dict(p: Plan) -> dict[str, Any]:
    return {
        "ok": not p.has_invalid,
        "campaign": p.campaign,
        "file": p.file,
        "rows": p.rows,
        "recipients": p.recipients,
        **_findings(p),
    }


def validated(p: Plan) -> None:
    for line, first in p.duplicates:
        out.print(
            f"[yellow]duplicate[/] {escape(p.audience)}:{line}: same recipient id as line {first}; sent once"
        )
    for e in sorted([*p.invalid_rows, *p.invalid_messages], key=lambda e: e.line):
        where = f"{e.channel}: " if e.channel else ""
        out.print(f"[red]✗[/] {escape(p.audience)}:{e.line}: {where}{escape(e.reason)}")
    if p.has_invalid:
        n = len(p.invalid_rows) + len(p.invalid_messages)
        out.print(f"[red]{p.campaign}: {n:,} invalid row(s) or message(s) in {p.rows:,} rows[/]")
    else:
        out.print(
            f"[green]✓[/] {escape(p.campaign)} is valid: {p.recipients:,} recipients, {p.messages:,} messages"
        )


def mask(address: str) -> str:
    """Hide most of an address: +336****5678, j***@example.fr, abcd…wxyz."""
    if "@" in address:
        local, _, domain = address.partition("@")
        return f"{local[:1]}***@{domain}"
    if address.startswith("+"):
        return address[:4] + "*" * max(0, len(address) - 8) + address[-4:]
    return f"{address[:4]}…{address[-4:]}" if len(address) > 12 else "****"  # noqa: PLR2004


def preview(
    prepared: PreparedCampaign, found: list[RecipientOutcome], *, mask: Callable[[str], str], as_json: bool
) -> None:
    if as_json:
        print_json({"campaign": prepared.name, "recipients": [_preview_dict(o, mask) for o in found]})
        return
    if not found:
        out.print("No recipient to show: every row is invalid, left out or unreachable (run `plan`).")
    for o in found:
        out.print(f"[bold]Recipient {escape(o.recipient_id or '?')}[/] (line {o.line})")
        if o.kind != "recipient":
            out.print(f"  {o.kind}: {escape(o.reason or '')}")
            continue
        for ch in o.channels:
            head = f"{ch.channel.channel} via {' → '.join(ch.channel.providers)}: {ch.status}"
            if ch.address:
                head += f", to {escape(mask(ch.address))}"
            if ch.status in ("skipped", "invalid"):
                out.print(f"  {head} — {escape(ch.reason or '')}")
                continue
            if ch.rendered is None:
                out.print(f"  {head}")
                continue
            body = "\n".join(
                f"[dim]{name}:[/] {escape(text)}"
                for name, text in ch.rendered.fields.items()
                if name != "html"
            )
            if "html" in ch.rendered.fields:
                body += f"\n[dim]html:[/] {len(ch.rendered.fields['html']):,} characters of HTML"
            sms = ch.rendered.sms
            if sms is not None:
                facts = f"{sms.encoding}, {sms.characters} characters, {sms.parts} part(s)"
                if sms.non_gsm:
                    facts += ", UCS-2 forced by " + " ".join(f"'{c}'" for c in sms.non_gsm)
                if sms.replaced:
                    facts += ", replaced " + " ".join(f"'{a}'→'{b}'" for a, b in sms.replaced)
                body += f"\n[dim]{escape(facts)}[/]"
            out.print(Panel(body, title=head, title_align="left"))


def _preview_dict(o: RecipientOutcome, mask: Callable[[str], str]) -> dict[str, Any]:
    channels = []
    for ch in o.channels:
        item: dict[str, Any] = {
            "channel": str(ch.channel.channel),
            "providers": ch.channel.providers,
            "status": ch.status,
            "to": mask(ch.address) if ch.address else None,
            "reason": ch.reason,
        }
        if ch.rendered is not None:
            item["content"] = ch.rendered.fields
            sms = ch.rendered.sms
            if sms is not None:
                item["sms"] = {
                    "encoding": str(sms.encoding),
                    "characters": sms.characters,
                    "units": sms.units,
                    "parts": sms.parts,
                    "non_gsm": list(sms.non_gsm),
                    "replaced": [list(r) for r in sms.replaced],
                }
        channels.append(item)
    return {
        "recipient_id": o.recipient_id,
        "line": o.line,
        "kind": o.kind,
        "reason": o.reason,
        "channels": channels,
    }
