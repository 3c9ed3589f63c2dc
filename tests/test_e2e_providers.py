"""End to end: the `init` example campaign sent by the `smartpush` command through three real protocols.

Email goes to a real SMTP server (aiosmtpd), SMS to a server speaking Twilio's Messages API, push to a
server speaking FCM HTTP v1 and Google's OAuth token endpoint; all on loopback.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from aiosmtpd.controller import Controller
from test_fcm import FakeGoogle, service_account
from test_twilio import SID, TOKEN
from test_twilio import responder as twilio_api

from smartpush.testing import FakeProviderServer

Run = Callable[..., subprocess.CompletedProcess[str]]
CAMPAIGN = "campaigns/rappel-vaccination-grippe.yaml"


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Message accepted"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_example_campaign_through_smtp_twilio_and_fcm(project: Path, run_cli: Run) -> None:
    mailbox = Mailbox()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    google = FakeGoogle()
    try:
        with FakeProviderServer(responder=twilio_api) as twilio, google.server:
            (project / "service-account.json").write_text(json.dumps(service_account(google.url)))
            config = project / "smartpush.yaml"
            config.write_text(
                config.read_text(encoding="utf-8")
                + f"  mail:\n    type: smtp\n    host: 127.0.0.1\n    port: {smtp.port}\n"
                "    starttls: false\n"
                f"  sms:\n    type: twilio\n    base_url: {twilio.url}\n    account_sid: {SID}\n"
                f"    auth_token: ${{TWILIO_TOKEN}}\n    sender: AMELI\n"
                f"  push:\n    type: fcm\n    service_account_file: service-account.json\n"
                f"    base_url: {google.url}\n",
                encoding="utf-8",
            )
            campaign = project / CAMPAIGN
            text = campaign.read_text(encoding="utf-8").replace("strategy: first-reachable", "strategy: all")
            lines, channel = [], None
            for line in text.splitlines():
                if line.startswith("  - channel: "):
                    channel = line.split(": ")[1]
                if line.strip() == "provider: outbox":
                    line = line.replace(
                        "outbox", {"push": "push", "sms": "sms", "email": "mail"}[channel or ""]
                    )
                lines.append(line)
            campaign.write_text("\n".join(lines) + "\n", encoding="utf-8")

            result = run_cli("send", CAMPAIGN, "--yes", "--json", cwd=project, env={"TWILIO_TOKEN": TOKEN})
            assert result.returncode == 0, result.stderr
            run = json.loads(result.stdout)
            twilio_requests = list(twilio.requests)
            push_requests = google.send_requests()
    finally:
        smtp.stop()

    by_channel = run["by_channel"]
    assert run["failed"] == 0 and run["messages"] == run["final"] == run["recipients"] * 3
    # every message with an address was sent; the others were skipped (no address in the row)
    for channel in ("sms", "email", "push"):
        assert set(by_channel[channel]) <= {"sent", "skipped"}

    # SMS: Twilio's form fields, E.164 numbers, the rendered French text
    assert len(twilio_requests) == by_channel["sms"]["sent"]
    forms = [{k: v[0] for k, v in parse_qs(r.body.decode()).items()} for r in twilio_requests]
    assert all(f["From"] == "AMELI" and f["To"].startswith("+33") and len(f["To"]) == 12 for f in forms)
    assert all(
        f["Body"].startswith("Assurance Maladie : ") and "pris en charge à 100 %" in f["Body"] for f in forms
    )

    # Push: FCM HTTP v1 messages with the title and the rendered body
    assert len(push_requests) == by_channel["push"]["sent"]
    assert google.token_requests()  # the OAuth token was fetched (and reused)
    assert len(google.token_requests()) <= 2
    for request in push_requests:
        message = request.json["message"]
        assert message["token"].startswith("fcm:")
        assert message["notification"]["title"] == "Vaccination grippe"
        assert "votre vaccin contre la grippe est pris en charge à 100 %" in message["notification"]["body"]

    # Email: one SMTP transaction per message, the exact headers that matter, text and HTML parts
    assert len(mailbox.messages) == by_channel["email"]["sent"]
    for rcpt, raw in mailbox.messages:
        mail = message_from_bytes(raw, policy=policy.default)
        assert isinstance(mail, EmailMessage)
        assert mail["To"] == rcpt[0]
        assert mail["From"] == "Assurance Maladie <ne-pas-repondre@info.exemple.fr>"
        assert str(mail["Subject"]).endswith(", votre invitation à la vaccination contre la grippe")
        assert mail["List-Unsubscribe"].startswith("<http://127.0.0.1:8080/unsubscribe/")
        assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert mail["Message-ID"].endswith("@info.exemple.fr>")
        assert mail.get_content_type() == "multipart/alternative"
        plain = mail.get_body(("plain",))
        html = mail.get_body(("html",))
        assert plain is not None and html is not None
        assert "Munissez-vous de votre carte Vitale." in plain.get_content()
        assert '<html lang="fr"' in html.get_content()

    # The ledger: one record per message, each sent one with the provider's reference
    report = run_cli(
        "report",
        run["run_id"],
        "--format",
        "csv",
        "--status",
        "sent",
        cwd=project,
        env={"TWILIO_TOKEN": TOKEN},
    )
    rows = list(csv.DictReader(io.StringIO(report.stdout)))
    assert len(rows) == sum(c.get("sent", 0) for c in by_channel.values())
    assert all(r["provider_reference"] for r in rows)
    assert {r["provider"] for r in rows} == {"mail", "sms", "push"}
