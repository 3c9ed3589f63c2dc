"""End to end through the real commands: send, serve, receipts, one-click unsubscribe, send again, report.

One scenario (a module fixture), then one test per thing it must show:

1. `smartpush send` (embedded) an `information` campaign to 10 people by SMS (a `webhook` account
   pointed at a FakeProviderServer) and email (the `outbox` account writes .eml files);
2. `smartpush serve` starts as a process; half the SMS get a `delivered` receipt through
   `/webhooks/sms`, authenticated with the account's `webhook_secret` (as `?token=` and as
   `Authorization: Bearer`);
3. one person unsubscribes by POSTing the one-click link read from their .eml, as Gmail does;
4. `smartpush send` again (another `--key`): a new run;
5. `smartpush report RUN --json`: the first run shows `delivered` for that half, the second run shows
   the unsubscribed person's email `suppressed` (their SMS still goes: the opt-out is per channel).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.policy import default as email_policy
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import smartpush_exe
from sqlalchemy import create_engine, select

from smartpush.ledger_schema import suppressions
from smartpush.testing import FakeProviderServer

PEOPLE = 10
UNSUBSCRIBER = "3"
SECRET = "e2e-webhook-secret-7f3a"
ENV = {"SMS_WEBHOOK_SECRET": SECRET, "NO_COLOR": "1", "COLUMNS": "200"}

CAMPAIGN = """\
name: rappel-e2e
category: information
audience:
  source: people.csv
  id: id
channels:
  - channel: sms
    provider: sms
    body: "Bonjour {{ prenom }}, votre rendez-vous est confirmé."
  - channel: email
    provider: mail
    from: "Mairie <ne-pas-repondre@mairie.example.fr>"
    subject: "Votre rendez-vous"
    text: "Bonjour {{ prenom }}, votre rendez-vous est confirmé. Se désabonner : {{ unsubscribe_url }}"
strategy: all
"""


#: Launch-time suppression (smartpush/suppression.py, applied by smartpush/launch.py) is another
#: engineer's part; without it the second run cannot show `suppressed`.
LAUNCH_SCREENS = importlib.util.find_spec("smartpush.suppression") is not None


@dataclass
class Scenario:
    project: Path
    first: dict[str, Any]
    second: dict[str, Any]
    first_report: list[dict[str, Any]]
    second_report: list[dict[str, Any]]
    delivered_refs: set[str]
    receipt_answers: list[int]
    unsubscribe_url: str
    unsubscribe_answers: list[int]
    serve_rc: int
    serve_stderr: str
    suppression_entries: list[tuple[str, str, str]] = field(default_factory=list)


def _cli(project: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [smartpush_exe(), *args],
        cwd=project,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_project(project: Path, provider_url: str, port: int) -> None:
    project.mkdir(parents=True)
    (project / "smartpush.yaml").write_text(
        f"database: sqlite:///{project / 'ledger.db'}\n"
        f"public_url: http://127.0.0.1:{port}\n"
        "providers:\n"
        f"  sms:\n    type: webhook\n    base_url: {provider_url}\n    path: /sms\n    sender: MAIRIE\n"
        "    webhook_secret: ${SMS_WEBHOOK_SECRET}\n"
        "  mail:\n    type: outbox\n    path: outbox\n",
        encoding="utf-8",
    )
    rows = ["id;prenom;phone;email"]
    rows += [f"{i};Zoé{i};06{12345600 + i:08d};personne{i}@example.fr" for i in range(PEOPLE)]
    (project / "people.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (project / "campaign.yaml").write_text(CAMPAIGN, encoding="utf-8")


def _send(project: Path, key: str) -> dict[str, Any]:
    result = _cli(project, "send", "campaign.yaml", "--yes", "--key", key, "--json")
    assert result.returncode == 0, result.stderr
    run: dict[str, Any] = json.loads(result.stdout)
    return run


def _report(project: Path, run_id: str) -> list[dict[str, Any]]:
    result = _cli(project, "report", run_id, "--json")
    assert result.returncode == 0, result.stderr
    messages: list[dict[str, Any]] = json.loads(result.stdout)["messages"]
    return messages


@contextmanager
def _serving(project: Path, port: int) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`smartpush serve --port PORT` as a process, once /healthz answers; stopped with SIGTERM."""
    proc = subprocess.Popen(
        [smartpush_exe(), "serve", "--port", str(port)],
        cwd=project,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "smartpush serve did not become healthy"
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def _unsubscribe_link(project: Path, run_id: str, message_id: str) -> str:
    """The https link of the List-Unsubscribe header of the .eml the outbox wrote for this message."""
    (eml,) = (project / "outbox" / run_id / "email").glob(f"{message_id}*")
    message = message_from_bytes(eml.read_bytes(), policy=email_policy)
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    links = [part.strip().strip("<>") for part in str(message["List-Unsubscribe"]).split(",")]
    (link,) = [link for link in links if link.startswith("http")]
    return link


def _suppression_entries(project: Path) -> list[tuple[str, str, str]]:
    engine = create_engine(f"sqlite:///{project / 'ledger.db'}")
    try:
        with engine.connect() as conn:
            c = suppressions.c
            return [(r[0], r[1], r[2]) for r in conn.execute(select(c.channel, c.reason, c.source))]
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    project = tmp_path_factory.mktemp("e2e") / "project"
    port = _free_port()
    with FakeProviderServer() as provider:
        _write_project(project, provider.url, port)
        first = _send(project, "rappel-e2e-1")
        first_report = _report(project, first["run_id"])
        sms = sorted((m for m in first_report if m["channel"] == "sms"), key=lambda m: int(m["recipient_id"]))
        assert len(sms) == PEOPLE and all(m["provider_reference"] for m in sms)
        delivered_refs = {m["provider_reference"] for m in sms[: PEOPLE // 2]}
        email = {m["recipient_id"]: m for m in first_report if m["channel"] == "email"}
        link = _unsubscribe_link(project, first["run_id"], email[UNSUBSCRIBER]["message_id"])

        with _serving(project, port) as (base, proc), httpx.Client(timeout=10) as client:
            receipt_answers = []
            for i, ref in enumerate(sorted(delivered_refs)):
                receipt = {"reference": ref, "status": "delivered"}
                if i % 2:  # both ways of presenting the account's secret
                    r = client.post(
                        f"{base}/webhooks/sms", json=receipt, headers={"Authorization": f"Bearer {SECRET}"}
                    )
                else:
                    r = client.post(f"{base}/webhooks/sms", params={"token": SECRET}, json=receipt)
                receipt_answers.append(r.status_code)
            # One click, exactly as Gmail sends it: no cookie, the one form field, twice (idempotent).
            unsubscribe_answers = [
                httpx.post(
                    link,
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                    content=b"List-Unsubscribe=One-Click",
                    timeout=10,
                ).status_code
                for _ in range(2)
            ]
            second = _send(project, "rappel-e2e-2")
            proc.send_signal(signal.SIGTERM)
            _, serve_stderr = proc.communicate(timeout=20)
        yield Scenario(
            project=project,
            first=first,
            second=second,
            first_report=_report(project, first["run_id"]),
            second_report=_report(project, second["run_id"]),
            delivered_refs=delivered_refs,
            receipt_answers=receipt_answers,
            unsubscribe_url=link,
            unsubscribe_answers=unsubscribe_answers,
            serve_rc=proc.returncode,
            serve_stderr=serve_stderr,
            suppression_entries=_suppression_entries(project),
        )


def test_the_first_run_sent_every_message(scenario: Scenario) -> None:
    assert scenario.first["counts"] == {"sent": 2 * PEOPLE}
    assert scenario.second["run_id"] != scenario.first["run_id"]


def test_the_one_click_link_from_the_email_unsubscribes(scenario: Scenario) -> None:
    assert scenario.unsubscribe_url.startswith("http://127.0.0.1:")
    assert scenario.unsubscribe_answers == [200, 200]
    assert scenario.suppression_entries == [("email", "opt-out", "unsubscribe:rappel-e2e")]


def test_receipts_mark_half_the_sms_delivered(scenario: Scenario) -> None:
    assert len(scenario.receipt_answers) == PEOPLE // 2
    assert all(200 <= answer < 300 for answer in scenario.receipt_answers), scenario.receipt_answers
    sms = {m["provider_reference"]: m for m in scenario.first_report if m["channel"] == "sms"}
    statuses = {ref: m["status"] for ref, m in sms.items()}
    assert {statuses[ref] for ref in scenario.delivered_refs} == {"delivered"}
    assert all(sms[ref]["delivered_at"] for ref in scenario.delivered_refs)
    assert {s for ref, s in statuses.items() if ref not in scenario.delivered_refs} == {"sent"}


@pytest.mark.xfail(
    not LAUNCH_SCREENS,
    reason="launch-time suppression (smartpush/suppression.py, smartpush/launch.py) is another engineer's "
    "part, not built yet",
    strict=True,
)
def test_the_next_run_suppresses_the_unsubscribed_email(scenario: Scenario) -> None:
    statuses = {(m["recipient_id"], m["channel"]): m["status"] for m in scenario.second_report}
    assert statuses[(UNSUBSCRIBER, "email")] == "suppressed"
    assert statuses[(UNSUBSCRIBER, "sms")] == "sent"  # the opt-out is for the channel it came from
    others = {s for (rid, _), s in statuses.items() if rid != UNSUBSCRIBER}
    assert others == {"sent"}
    assert scenario.second["counts"] == {"sent": 2 * PEOPLE - 1, "suppressed": 1}


def test_serve_stopped_cleanly_and_logged_no_token(scenario: Scenario) -> None:
    assert scenario.serve_rc == 0, scenario.serve_stderr
    token = scenario.unsubscribe_url.rsplit("/", 1)[1]
    log = scenario.serve_stderr
    assert "POST /unsubscribe/{token} 200" in log and "POST /webhooks/{account}" in log
    for secret in (token, SECRET, "personne3@example.fr"):
        assert secret not in log
    assert "Traceback" not in log
