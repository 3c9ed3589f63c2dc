"""Bodies of `smartpush suppress`: add, remove, list, import and export entries of the suppression list.

Addresses are normalised as the ledger stores them (smartpush.suppression.normalise) and only their
keyed hashes are written, shown or exported. An address the operator typed may be echoed back in an
error (it is their own input); addresses read from a file never are: a bad row is named by its line.
"""

from __future__ import annotations

import csv
import getpass
import json
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rich.markup import escape
from rich.table import Table

from smartpush import suppression
from smartpush.audience import AudienceFile
from smartpush.config import Config, load_config
from smartpush.errors import ConfigError, Problem, RecipientError
from smartpush.ledger import Ledger, Suppression
from smartpush.unsubscribe import recipient_hash

from . import output
from .commands import reporting
from .main import EXIT_INVALID

if TYPE_CHECKING:
    from .main import State

#: Entries written per transaction by `import`.
IMPORT_BATCH = 1_000
#: Bad rows of an import listed on the terminal (all of them with --json).
SHOWN_INVALID = 50
#: The column an import reads by default, per channel: the audience's default column names.
DEFAULT_COLUMNS = {"sms": "phone", "email": "email", "push": "push_token"}
EXPORT_FIELDS = ("channel", "address_hash", "reason", "source", "created_at")
#: What a piece of a phone number split by the shell looks like: `06`, `12`, `+33`.
_PHONE_PIECE = re.compile(r"\+?[0-9().-]+")


def _source() -> str:
    """Who added entries from the command line: ``manual:<OS user>``, or ``cli`` when it is unknown."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError, ImportError):  # no login name (a container without a passwd entry)
        return "cli"
    return f"manual:{user}" if user else "cli"


@contextmanager
def _ledger(state: State) -> Iterator[tuple[Config, Ledger]]:
    from smartpush.runtime import open_ledger

    config = load_config(state.config)
    ledger = open_ledger(config)
    try:
        yield config, ledger
    finally:
        ledger.close()


def _normalise_all(channel: str, addresses: Sequence[str], region: str) -> list[str]:
    """Every address in the ledger's form, or a :class:`ConfigError` naming each invalid one."""
    found: list[str] = []
    problems: list[Problem] = []
    for i, raw in enumerate(addresses, 1):
        try:
            found.append(suppression.normalise(channel, raw, region=region))
        except RecipientError as exc:
            problems.append(Problem(f"address {i} ({raw!r}) is not a valid {channel} address: {exc.reason}"))
    if not problems:
        return found
    if (
        channel == "sms"
        and len(problems) == len(addresses) > 1
        and all(map(_PHONE_PIECE.fullmatch, addresses))
    ):
        # `suppress add 06 12 34 56 78`: one number the shell split at its spaces.
        try:
            return [suppression.normalise(channel, " ".join(addresses), region=region)]
        except RecipientError:
            pass
        problems.append(Problem("a phone number written with spaces needs quotes: '06 12 34 56 78'"))
    raise ConfigError(problems)


def add(state: State, channel: str, reason: str, addresses: Sequence[str]) -> None:
    with reporting(state), _ledger(state) as (config, ledger):
        normalised = _normalise_all(channel, addresses, config.settings.region)
        key = config.secret_key()
        now = datetime.now(UTC)
        source = _source()
        entries = [suppression.entry(key, channel, a, reason, source, now) for a in normalised]
        hashes = [e.address_hash for e in entries]
        before = ledger.suppression_reasons(channel, hashes)
        ledger.suppress(entries)
        after = ledger.suppression_reasons(channel, hashes)
    rows = []
    for h in dict.fromkeys(hashes):
        if h not in before:
            status = "added"
        elif before[h] != after.get(h):
            status = "made-stricter"
        else:
            status = "already-there"
        rows.append({"address_hash": h, "status": status, "reason": after.get(h, reason)})
    tally = {s: sum(1 for r in rows if r["status"] == s) for s in ("added", "made-stricter", "already-there")}
    if state.json:
        output.print_json(
            {"ok": True, "channel": channel, "reason": reason, "source": source, "added": tally["added"],
             "made_stricter": tally["made-stricter"], "already_there": tally["already-there"],
             "entries": rows}
        )  # fmt: skip
        return
    stricter = f", {tally['made-stricter']} made stricter" if tally["made-stricter"] else ""
    output.out.print(
        f"{channel} suppression list: {tally['added']} added{stricter}, {tally['already-there']} already "
        f"there (reason {reason}, source {escape(source)})."
    )
    for r in rows:
        note = "" if r["status"] == "added" else f" ({r['status'].replace('-', ' ')}, reason {r['reason']})"
        output.out.print(f"  {r['address_hash']}{note}")


def remove(state: State, channel: str, addresses: Sequence[str]) -> None:
    with reporting(state), _ledger(state) as (config, ledger):
        normalised = _normalise_all(channel, addresses, config.settings.region)
        key = config.secret_key()
        hashes = {recipient_hash(key, channel, a) for a in normalised}
        removed = ledger.unsuppress(channel, hashes)
    if state.json:
        output.print_json(
            {"ok": True, "channel": channel, "removed": removed, "not_listed": len(hashes) - removed}
        )
        return
    output.out.print(f"{channel} suppression list: {removed} removed; not on it: {len(hashes) - removed}.")


def _entry_dict(e: Suppression) -> dict[str, Any]:
    return {
        "channel": e.channel,
        "address_hash": e.address_hash,
        "reason": e.reason,
        "source": e.source,
        "created_at": e.created_at.isoformat(),
    }


def list_entries(state: State, channel: str | None, reason: str | None, limit: int) -> None:
    with reporting(state), _ledger(state) as (_, ledger):
        counts = ledger.suppression_counts()
        entries = ledger.latest_suppressions(channel=channel, reason=reason, limit=limit)
    matching = {
        (c, r): n
        for (c, r), n in sorted(counts.items())
        if (channel is None or c == channel) and (reason is None or r == reason)
    }
    total = sum(matching.values())
    if state.json:
        by_channel: dict[str, dict[str, int]] = {}
        for (c, r), n in matching.items():
            by_channel.setdefault(c, {})[r] = n
        output.print_json(
            {"ok": True, "total": total, "counts": by_channel, "entries": [_entry_dict(e) for e in entries]}
        )
        return
    if not total:
        output.out.print(
            "The suppression list has no entry" + (" matching" if channel or reason else "") + "."
        )
        return
    summary = ", ".join(f"{c} {r}: {n:,}" for (c, r), n in matching.items())
    output.out.print(f"{total:,} entries ({summary}); the newest {len(entries):,}:")
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("channel", no_wrap=True)
    table.add_column("hash", no_wrap=True, min_width=32)  # whole: it is how an entry is told apart
    table.add_column("reason", no_wrap=True)
    table.add_column("source")
    table.add_column("added (UTC)", no_wrap=True)
    for e in entries:
        table.add_row(
            e.channel, e.address_hash, e.reason, escape(e.source), e.created_at.strftime("%Y-%m-%d %H:%M:%S")
        )
    output.out.print(table)


def _import_column(channel: str, columns: Sequence[str], column: str | None, file: Path) -> str:
    if column is not None:
        if column in columns:
            return column
        from smartpush.schema import did_you_mean

        raise ConfigError(
            Problem(
                f"the file has no column {column!r}{did_you_mean(column, list(columns))}; its columns: "
                f"{', '.join(columns)}",
                file=str(file),
                line=1,
            )
        )
    default = DEFAULT_COLUMNS[channel]
    if default in columns:
        return default
    if len(columns) == 1:
        return columns[0]
    raise ConfigError(
        Problem(
            f"the file has no column {default!r} and several others: name the one holding the addresses "
            f"with --column (its columns: {', '.join(columns)})",
            file=str(file),
            line=1,
        )
    )


def import_file(state: State, file: Path, channel: str, column: str | None, reason: str) -> None:
    with reporting(state), _ledger(state) as (config, ledger):
        if file.suffix.lower() != ".csv":
            raise ConfigError(f"{file} is not a .csv file: export the list as CSV, one address a row")
        audience = AudienceFile(file, display_name=str(file))
        columns = audience.columns
        name = _import_column(channel, columns, column, file)
        key = config.secret_key()
        region = config.settings.region
        now = datetime.now(UTC)
        source = _source()
        rows = valid = added = 0
        invalid: list[dict[str, Any]] = []
        batch: list[Suppression] = []

        def take(line: int, raw: str) -> None:
            nonlocal valid
            if not raw.strip():
                invalid.append({"line": line, "reason": f"the column {name!r} is empty"})
                return
            try:
                address = suppression.normalise(channel, raw, region=region)
            except RecipientError as exc:
                invalid.append({"line": line, "reason": exc.reason})
                return
            valid += 1
            batch.append(suppression.entry(key, channel, address, reason, source, now))

        if column is None and len(columns) == 1:
            # A plain list without a header: its first line is an address too.
            try:
                suppression.normalise(channel, columns[0], region=region)
            except RecipientError:
                pass
            else:
                rows += 1
                take(1, columns[0])
        for row in audience:
            rows += 1
            if row.error is not None:
                invalid.append({"line": row.line, "reason": row.error})
            else:
                take(row.line, str(row.data.get(name) or ""))
            if len(batch) >= IMPORT_BATCH:
                added += ledger.suppress(batch)
                batch.clear()
        added += ledger.suppress(batch)
    summary = {
        "ok": not invalid,
        "file": str(file),
        "channel": channel,
        "column": name,
        "reason": reason,
        "source": source,
        "rows": rows,
        "added": added,
        "already_there": valid - added,
        "invalid": len(invalid),
        "invalid_rows": invalid,
    }
    if state.json:
        output.print_json(summary)
    else:
        for bad in invalid[:SHOWN_INVALID]:
            output.err.print(f"  [red]✗[/] {escape(str(file))}:{bad['line']}: {escape(bad['reason'])}")
        if len(invalid) > SHOWN_INVALID:
            output.err.print(f"  … and {len(invalid) - SHOWN_INVALID:,} more invalid rows (--json lists all)")
        output.out.print(
            f"{channel} suppression list, from {escape(str(file))} (column {escape(name)}, reason {reason}): "
            f"{added:,} added, {valid - added:,} already there, {len(invalid):,} invalid."
        )
    if invalid:
        raise SystemExit(EXIT_INVALID)


def _write_csv(stream: TextIO, entries: Iterator[Suppression]) -> int:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(EXPORT_FIELDS)
    n = 0
    for e in entries:
        writer.writerow([e.channel, e.address_hash, e.reason, e.source, e.created_at.isoformat()])
        n += 1
    return n


def _write_json(stream: TextIO, entries: Iterator[Suppression]) -> int:
    """A JSON array written entry by entry: the list may hold millions."""
    n = 0
    stream.write("[")
    for e in entries:
        stream.write(("," if n else "") + "\n  " + json.dumps(_entry_dict(e), ensure_ascii=False))
        n += 1
    stream.write("\n]\n" if n else "]\n")
    return n


def export(state: State, out: Path | None, channel: str | None) -> None:
    with reporting(state), _ledger(state) as (_, ledger):
        entries = ledger.iter_suppressions(channel=channel)
        if out is None:
            (_write_json if state.json else _write_csv)(sys.stdout, entries)
            return
        try:
            with out.open("w", encoding="utf-8", newline="") as stream:
                n = _write_csv(stream, entries)
        except OSError as exc:
            raise ConfigError(f"cannot write {out}: {exc.strerror}") from None
    if state.json:
        output.print_json({"ok": True, "file": str(out), "entries": n})
    else:
        output.out.print(f"Wrote {n:,} entries to {escape(str(out))}.")
