"""Body of ``smartpush bounces``: apply the DSNs of a Maildir or an mbox to the ledger, print the counts.

The output holds counts, status codes, message ids and mailbox keys: never an address or a
server's diagnostic text.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.table import Table

from smartpush.bounces import BounceReport, Outcome, apply_bounces, open_mailbox
from smartpush.config import Config, load_config
from smartpush.ledger import Ledger

from . import output
from .commands import reporting

if TYPE_CHECKING:
    from .main import State

#: Message ids listed per outcome in the table output (``--json`` lists them all).
SHOWN_IDS = 10

#: Each outcome as the table says it: done (or, with --dry-run, to be done).
_LABELS: dict[Outcome, tuple[str, str]] = {
    Outcome.HARD_BOUNCE: (
        "hard bounce: message failed, address suppressed",
        "hard bounce: message would fail, address would be suppressed",
    ),
    Outcome.SENDER_SIDE: (
        "sender-side (5.7.x, 5.1.7, 5.1.8): message failed, address kept",
        "sender-side (5.7.x, 5.1.7, 5.1.8): message would fail, address kept",
    ),
    Outcome.MAILBOX_FULL: (
        "full mailbox (5.2.2): message failed, address kept",
        "full mailbox (5.2.2): message would fail, address kept",
    ),
    Outcome.IGNORED: ("delayed (4.x.x) or not a failure: ignored",) * 2,
    Outcome.UNKNOWN: ("DSN for a message this ledger does not hold",) * 2,
    Outcome.SKIPPED: ("skipped: not a DSN (auto-reply, complaint...) or unreadable",) * 2,
    Outcome.ALREADY_APPLIED: ("already applied (message already failed or delivered)",) * 2,
    Outcome.OTHER_STATUS: ("message not in status sent: left as it is",) * 2,
}


def _ledger(config: Config) -> Ledger:
    from smartpush.runtime import open_ledger

    return open_ledger(config)


def bounces(state: State, path: Path, dry_run: bool) -> None:
    with reporting(state):
        config = load_config(state.config)
        source = open_mailbox(path)  # a wrong path is reported before the database is touched
        try:
            ledger = _ledger(config)
            try:
                report = apply_bounces(
                    ledger, source, key=config.secret_key(), providers=list(config.accounts), dry_run=dry_run
                )
            finally:
                ledger.close()
        finally:
            source.close()
    if state.json:
        output.print_json(report.as_dict())
    else:
        show(report)


def show(report: BounceReport) -> None:
    out = output.out
    what = "Dry run, nothing changed: " if report.dry_run else ""
    mails = "mail" if report.read == 1 else "mails"
    out.print(f"{what}{report.read} {mails} read from the {report.kind} {escape(report.path)}")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("outcome")
    table.add_column("mails", justify="right")
    for outcome in Outcome:
        table.add_row(_LABELS[outcome][report.dry_run], f"{report.counts[outcome]:,}")
    out.print(table)
    verb = "would be added" if report.dry_run else "added"
    out.print(f"Suppression list: {report.suppressed:,} address(es) {verb} (reason hard-bounce).")
    if report.address_missing:
        out.print(
            f"{report.address_missing:,} hard bounce(s) for messages whose address was purged: "
            "nothing to suppress."
        )
    if report.codes:
        codes = ", ".join(f"{code} ×{n}" for code, n in sorted(report.codes.items()))
        out.print(f"Status codes: {codes}")
    if report.skipped:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(report.skipped.items()))
        out.print(f"Skipped: {reasons}")
    for outcome in (Outcome.HARD_BOUNCE, Outcome.SENDER_SIDE, Outcome.MAILBOX_FULL, Outcome.OTHER_STATUS):
        ids = report.message_ids.get(outcome, [])
        if ids:
            more = f" and {len(ids) - SHOWN_IDS:,} more (--json lists them)" if len(ids) > SHOWN_IDS else ""
            out.print(f"{outcome.value} messages: {', '.join(ids[:SHOWN_IDS])}{more}")
