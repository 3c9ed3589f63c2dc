"""`smartpush suppress` end to end, through the real command in a fresh `smartpush init` project."""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

Run = Callable[..., subprocess.CompletedProcess[str]]


def ok_json(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def test_add_list_remove(project: Path, run_cli: Run) -> None:
    added = ok_json(run_cli("suppress", "add", "--channel", "sms", "06 12 34 56 78", "--json", cwd=project))
    assert (added["added"], added["already_there"], added["reason"]) == (1, 0, "manual")
    assert str(added["source"]).startswith(("manual:", "cli"))
    (first,) = added["entries"]  # type: ignore[misc]
    # The same number written another way, unquoted (the shell splits it): the same entry.
    again = run_cli(
        "--json", "suppress", "add", "--channel", "sms", "+33", "6", "12", "34", "56", "78", cwd=project
    )
    assert ok_json(again)["already_there"] == 1
    ok_json(
        run_cli(
            "suppress",
            "add",
            "--channel",
            "email",
            "--reason",
            "opt-out",
            "A@Example.FR",
            "--json",
            cwd=project,
        )
    )
    ok_json(
        run_cli(
            "suppress", "add", "--channel", "sms", "--reason", "opt-out", "0698765432", "--json", cwd=project
        )
    )

    listed = ok_json(run_cli("suppress", "list", "--json", cwd=project))
    assert listed["total"] == 3
    assert listed["counts"] == {"sms": {"manual": 1, "opt-out": 1}, "email": {"opt-out": 1}}
    entries = listed["entries"]
    assert isinstance(entries, list) and len(entries) == 3
    assert set(entries[0]) == {"channel", "address_hash", "reason", "source", "created_at"}
    assert first["address_hash"] in {e["address_hash"] for e in entries}
    assert "612345678" not in json.dumps(listed) and "xample" not in json.dumps(listed)

    table = run_cli("suppress", "list", "--channel", "sms", cwd=project)
    assert table.returncode == 0, table.stderr
    assert first["address_hash"] in table.stdout and "2 entries" in table.stdout
    assert "612345678" not in table.stdout
    only = ok_json(run_cli("suppress", "list", "--reason", "opt-out", "--limit", "1", "--json", cwd=project))
    assert only["total"] == 2 and len(only["entries"]) == 1  # type: ignore[arg-type]

    removed = run_cli(
        "suppress", "remove", "--channel", "sms", "0612345678", "0611111111", "--json", cwd=project
    )
    assert ok_json(removed) == {"ok": True, "channel": "sms", "removed": 1, "not_listed": 1}
    assert ok_json(run_cli("suppress", "list", "--json", cwd=project))["total"] == 2


def test_an_invalid_address_adds_nothing_and_is_named(project: Path, run_cli: Run) -> None:
    result = run_cli("suppress", "add", "--channel", "sms", "0612345678", "06 12", cwd=project)
    assert result.returncode == 1
    assert "address 2 ('06 12') is not a valid sms address" in " ".join(result.stderr.split())
    as_json = run_cli("suppress", "add", "--channel", "email", "nobody@", "--json", cwd=project)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["ok"] is False
    assert ok_json(run_cli("suppress", "list", "--json", cwd=project))["total"] == 0


def test_a_bad_reason_or_channel_is_a_usage_error(project: Path, run_cli: Run) -> None:
    assert run_cli("suppress", "add", "--channel", "fax", "1", cwd=project).returncode == 2
    assert (
        run_cli(
            "suppress", "add", "--channel", "sms", "--reason", "bored", "0612345678", cwd=project
        ).returncode
        == 2
    )


def test_import_reports_bad_rows_by_line_and_adds_the_others(project: Path, run_cli: Run) -> None:
    run_cli("suppress", "add", "--channel", "sms", "07 60 79 33 67", cwd=project)
    source = project / "opposition.csv"
    source.write_bytes(
        "nom;téléphone\n"
        "Gaëlle;06 10 97 22 23\n"
        "Pierre;0760793367\n"  # already on the list
        "Loïc;12\n"
        "Zoé;\n"
        "Jean;+33 6 10 97 22 23\n"  # the first row again, written another way
        "Anaïs;06 80 62 52 22;extra\n".encode("cp1252")  # a French Excel export
    )
    result = run_cli(
        "suppress", "import", source, "--channel", "sms", "--column", "téléphone", "--json", cwd=project
    )
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rows"] == 6
    assert (summary["added"], summary["already_there"], summary["invalid"]) == (1, 2, 3)
    assert [r["line"] for r in summary["invalid_rows"]] == [4, 5, 7]
    assert summary["reason"] == "opt-out"
    assert "0610972223" not in result.stdout and "10 97" not in result.stdout

    human = run_cli("suppress", "import", source, "--channel", "sms", "--column", "téléphone", cwd=project)
    assert human.returncode == 1
    assert "opposition.csv:4:" in human.stderr and "opposition.csv:7:" in human.stderr
    assert "0 added, 3 already there, 3 invalid" in " ".join(human.stdout.split())
    assert ok_json(run_cli("suppress", "list", "--json", cwd=project))["total"] == 2


def test_import_a_plain_list_without_header(project: Path, run_cli: Run) -> None:
    source = project / "emails.csv"
    source.write_text("jean@example.fr\nMARIE@Example.fr\n\njean@example.fr\n", encoding="utf-8")
    summary = ok_json(run_cli("suppress", "import", source, "--channel", "email", "--json", cwd=project))
    assert (summary["rows"], summary["added"], summary["already_there"], summary["invalid"]) == (3, 2, 1, 0)
    named = project / "tokens.csv"
    named.write_text("id,push_token,other\n1,tok-1,x\n", encoding="utf-8")
    summary = ok_json(
        run_cli(
            "suppress",
            "import",
            named,
            "--channel",
            "push",
            "--reason",
            "unregistered",
            "--json",
            cwd=project,
        )
    )
    assert (summary["column"], summary["added"]) == ("push_token", 1)
    missing = run_cli("suppress", "import", named, "--channel", "push", "--column", "push_tokn", cwd=project)
    assert missing.returncode == 1 and "did you mean 'push_token'" in missing.stderr


def test_export(project: Path, run_cli: Run) -> None:
    run_cli("suppress", "add", "--channel", "sms", "0612345678", "0698765432", cwd=project)
    run_cli("suppress", "add", "--channel", "push", "--reason", "unregistered", "tok-1", cwd=project)
    result = run_cli("suppress", "export", cwd=project)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(result.stdout.splitlines()))
    assert list(rows[0]) == ["channel", "address_hash", "reason", "source", "created_at"]
    assert [r["channel"] for r in rows] == ["push", "sms", "sms"]
    assert "612345678" not in result.stdout and "tok-1" not in result.stdout

    out = project / "list.csv"
    written = ok_json(run_cli("suppress", "export", "--out", out, "--json", cwd=project))
    assert written == {"ok": True, "file": str(out), "entries": 3}
    assert out.read_text(encoding="utf-8") == result.stdout

    as_json = run_cli("suppress", "export", "--json", "--channel", "sms", cwd=project)
    assert as_json.returncode == 0
    records = json.loads(as_json.stdout)
    assert len(records) == 2 and {r["reason"] for r in records} == {"manual"}
    empty = run_cli("suppress", "export", "--json", "--channel", "email", cwd=project)
    assert json.loads(empty.stdout) == []


def test_a_send_skips_an_address_put_on_the_list(project: Path, run_cli: Run) -> None:
    # The demo's first person (age 73) has a phone and an email but no push token: SMS first.
    ok_json(
        run_cli(
            "suppress",
            "add",
            "--channel",
            "sms",
            "--reason",
            "opt-out",
            "06 10 97 22 23",
            "--json",
            cwd=project,
        )
    )
    campaign = "campaigns/rappel-vaccination-grippe.yaml"
    sent = run_cli("send", campaign, "--yes", "--json", cwd=project)
    assert sent.returncode == 0, sent.stderr
    run_id = json.loads(sent.stdout)["run_id"]
    report = run_cli("report", run_id, "--format", "csv", cwd=project)
    rows = [r for r in csv.DictReader(report.stdout.splitlines()) if r["recipient_id"] == "1000000000"]
    by_channel = {r["channel"]: r for r in rows}
    assert by_channel["sms"]["status"] == "suppressed" and "opt-out" in by_channel["sms"]["error"]
    assert by_channel["email"]["status"] == "sent"  # first-reachable: the next channel took over
