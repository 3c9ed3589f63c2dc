"""End to end, embedded: `smartpush send`, `runs`, `status`, `report`, `pause`/`cancel`, `resend`."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from smartpush.testing import FakeProviderServer, Reply

Run = Callable[..., subprocess.CompletedProcess[str]]
CAMPAIGN = "campaigns/rappel-vaccination-grippe.yaml"
SPEC_COLUMNS = [
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


def test_send_the_example_to_the_outbox(project: Path, run_cli: Run) -> None:
    result = run_cli("send", CAMPAIGN, "--yes", "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert run["state"] == "finished"
    # counts add up: every recipient × channel has one final status
    assert run["messages"] == run["recipients"] * 3 == run["final"]
    assert sum(run["counts"].values()) == run["messages"]
    assert run["failed"] == 0
    files = [p for p in (project / "outbox" / run["run_id"]).rglob("*") if p.is_file()]
    assert len(files) == run["counts"]["sent"]
    assert {p.suffix for p in files} == {".json", ".eml"}
    eml = next(p for p in files if p.suffix == ".eml").read_text()
    assert "List-Unsubscribe: <http://127.0.0.1:8080/unsubscribe/" in eml
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in eml


def test_send_needs_yes_without_a_terminal(project: Path, run_cli: Run) -> None:
    result = run_cli("send", CAMPAIGN, cwd=project)
    assert result.returncode == 2
    assert "--yes" in result.stderr
    assert not (project / "outbox").exists()


def test_key_makes_a_second_launch_return_the_first_run(project: Path, run_cli: Run) -> None:
    first = json.loads(
        run_cli("send", CAMPAIGN, "--yes", "--key", "grippe@2026-12-01", "--json", cwd=project).stdout
    )
    second = run_cli("send", CAMPAIGN, "--yes", "--key", "grippe@2026-12-01", "--json", cwd=project)
    assert json.loads(second.stdout)["run_id"] == first["run_id"]
    files = [p for p in (project / "outbox").rglob("*") if p.is_file()]
    assert len(files) == first["counts"]["sent"]  # nothing sent twice
    runs = json.loads(run_cli("runs", "--json", cwd=project).stdout)
    assert [r["run_id"] for r in runs] == [first["run_id"]]


def test_status_report_and_control(project: Path, run_cli: Run) -> None:
    run = json.loads(run_cli("send", CAMPAIGN, "--yes", "--json", cwd=project).stdout)
    rid = run["run_id"]
    status = json.loads(run_cli("status", rid[:8], "--json", cwd=project).stdout)
    assert status["run_id"] == rid and status["counts"] == run["counts"]

    report = run_cli("report", rid, "--format", "csv", cwd=project)
    assert report.returncode == 0, report.stderr
    rows = list(csv.reader(io.StringIO(report.stdout)))
    assert rows[0] == SPEC_COLUMNS
    assert len(rows) - 1 == run["messages"]
    assert "+33" not in report.stdout and "@example" not in report.stdout  # no addresses by default
    sent = list(
        csv.DictReader(
            io.StringIO(
                run_cli(
                    "report", rid, "--format", "csv", "--status", "sent", "--include-addresses", cwd=project
                ).stdout
            )
        )
    )
    assert len(sent) == run["counts"]["sent"] and all(r["address"] for r in sent)
    assert all(r["status"] == "sent" and r["sent_at"] for r in sent)

    as_json = json.loads(run_cli("report", rid, "--json", cwd=project).stdout)
    assert as_json["run"]["run_id"] == rid and len(as_json["messages"]) == run["messages"]
    html = run_cli("report", rid, "--format", "html", cwd=project).stdout
    assert html.startswith("<!DOCTYPE html>") and '<th scope="col">status</th>' in html

    for action in ("pause", "cancel"):
        refused = run_cli(action, rid, cwd=project)
        assert refused.returncode == 1 and "finished" in refused.stdout
    assert run_cli("status", "nosuchrun", cwd=project).returncode == 1
    bad = run_cli("report", rid, "--status", "sentt", cwd=project)
    assert bad.returncode == 2 and "did you mean 'sent'" in bad.stderr


def test_failed_messages_exit_3_and_resend_reaches_them(tmp_path: Path, run_cli: Run) -> None:
    with FakeProviderServer() as server:
        server.responder = lambda r: (
            Reply(503) if (r.json or {}).get("to", "").endswith(("1", "2")) else Reply(200)
        )
        (tmp_path / "smartpush.yaml").write_text(
            f"providers:\n  sms:\n    type: webhook\n    base_url: {server.url}\n    sender: MAIRIE\n"
        )
        (tmp_path / "people.csv").write_text(
            "id;phone\n" + "".join(f"{i};06123456{i:02d}\n" for i in range(10)), encoding="utf-8"
        )
        (tmp_path / "c.yaml").write_text(
            "name: rappel\ncategory: service\naudience: {source: people.csv, id: id}\n"
            "channels:\n  - {channel: sms, provider: sms, body: Votre dossier est prêt.}\n"
            "retry: {max_attempts: 2, backoff: {min: 10ms, max: 20ms}}\n"
        )
        first = run_cli("send", "c.yaml", "--yes", "--json", cwd=tmp_path)
        assert first.returncode == 3, first.stderr  # some messages failed
        run = json.loads(first.stdout)
        assert run["counts"] == {"sent": 8, "temporary-failure": 2}
        server.responder = None
        again = run_cli(
            "resend", run["run_id"], "--status", "temporary-failure", "--yes", "--json", cwd=tmp_path
        )
        assert again.returncode == 0, again.stderr
        second = json.loads(again.stdout)
        assert second["parent_run_id"] == run["run_id"]
        assert second["recipients"] == 2 and second["counts"] == {"sent": 2}
        assert {r.json["to"] for r in server.requests[-2:]} == {"+33612345601", "+33612345602"}


def test_unreachable_broker_or_database_exits_4(project: Path, run_cli: Run) -> None:
    config = project / "smartpush.yaml"
    base = config.read_text()
    config.write_text(base + "broker: redis://:hunter2@127.0.0.1:1/0\n")
    result = run_cli("send", CAMPAIGN, "--yes", cwd=project)
    assert result.returncode == 4
    assert "broker" in result.stderr and "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr + result.stdout  # a password in the URL is never printed
    config.write_text(base + "database: postgresql://postgres:hunter2@127.0.0.1:1/none\n")
    result = run_cli("send", CAMPAIGN, "--yes", cwd=project)
    assert result.returncode == 4
    assert "ledger database" in result.stderr and "hunter2" not in result.stderr
