"""``/webhooks/{account}`` and ``/inbound/{account}`` through real HTTP: the app served by uvicorn on a
free loopback port (in a thread), the ledger on SQLite and PostgreSQL.

Every test also checks that nothing a provider sent (numbers, texts, tokens, secrets) reached a log line.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import psycopg
import pytest
import uvicorn
from prometheus_client import REGISTRY
from smartpush.providers.twilio import request_signature as twilio_signature
from smartpush.providers.vonage import request_signature as vonage_signature

from smartpush.config import Config, load_config
from smartpush.launch import launch
from smartpush.ledger import Ledger, MessageRecord, NewMessage, NewRecipient, Result, RunRecord, Status
from smartpush.loading import load_campaign
from smartpush.runtime import Runtime
from smartpush.sending import process_segment
from smartpush.serve.app import create_app
from smartpush.testing import FakeProviderServer
from smartpush.unsubscribe import recipient_hash

PG_URL = os.environ.get("SMARTPUSH_TEST_POSTGRESQL", "postgresql://postgres@127.0.0.1:5432/test")
PUBLIC = "https://hooks.example.org"
SID = "AC" + "1" * 32
ENV = {
    "SMARTPUSH_SECRET_KEY": "k" * 48,
    "TWILIO_TOKEN": "twilio-auth-token-123",
    "VONAGE_SECRET": "vonage-api-secret",
    "VONAGE_SIG": "vonage-signature-secret",
    "BREVO_KEY": "brevo-api-key",
    "HOOK_SECRET": "shared-hook-secret-456",
}
#: Strings that must never appear in a log line.
#: (The tests' numbers are +3361234xxxx; written nationally, 06 12 34 ...)
NEVER_LOGGED = [
    *ENV.values(),
    "+33612",
    "3361234",
    "06 12 34",
    "061234",
    "Arrêt",
    "Bonjour",
    "STOP SMS",
    "stop",
]
CONFIG = f"""\
public_url: {PUBLIC}
secret_key: ${{SMARTPUSH_SECRET_KEY}}
region: FR
providers:
  twilio-sms:
    type: twilio
    account_sid: {SID}
    auth_token: ${{TWILIO_TOKEN}}
    sender: MAIRIE
  vonage-sms:
    type: vonage
    api_key: key
    api_secret: ${{VONAGE_SECRET}}
    sender: MAIRIE
    signature_secret: ${{VONAGE_SIG}}
    signature_method: sha256
  ovh-sms:
    type: ovh
    application_key: ak
    application_secret: ${{VONAGE_SECRET}}
    consumer_key: ${{VONAGE_SECRET}}
    service_name: sms-ab12345-1
    sender: MAIRIE
    webhook_secret: ${{HOOK_SECRET}}
  brevo-sms:
    type: brevo
    api_key: ${{BREVO_KEY}}
    sender: MAIRIE
    webhook_secret: ${{HOOK_SECRET}}
  agg:
    type: webhook
    base_url: {{send_to}}
    sender: MAIRIE
    webhook_secret: ${{HOOK_SECRET}}
    unregistered_codes: [DEAD]
  open:
    type: webhook
    base_url: http://127.0.0.1:9
  files:
    type: outbox
    path: outbox
"""


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at {PG_URL} is unreachable ({exc}); set SMARTPUSH_TEST_POSTGRESQL")
    schema = f"serve_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield f"{PG_URL}?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


def make_config(tmp_path: Path, db: str, send_to: str = "http://127.0.0.1:9") -> Config:
    (tmp_path / "smartpush.yaml").write_text(
        f"database: {db}\n" + CONFIG.replace("{send_to}", send_to), encoding="utf-8"
    )
    return load_config(tmp_path / "smartpush.yaml", env=ENV)


class Served:
    """The app of ``config`` served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, config: Config, ledger: Ledger) -> None:
        self.config, self.ledger = config, ledger
        self.app = create_app(config, ledger=ledger)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, lifespan="on", access_log=False, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def writer(self) -> Any:
        return self.app.state.ctx.extras["webhooks"].writer

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def start(db: str, send_to: str = "http://127.0.0.1:9") -> Served:
        config = make_config(tmp_path, db, send_to)
        ledger = Ledger(db)
        ledger.migrate()
        served = Served(config, ledger)
        made.append(served)
        return served

    yield start
    for served in made:
        served.close()
        served.ledger.close()


@pytest.fixture(autouse=True)
def no_personal_data_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    for record in [*caplog.get_records("setup"), *caplog.get_records("call")]:
        if record.name.startswith(("httpx", "httpcore")):  # the test's own client, not the server
            continue
        text = record.getMessage()
        leaked = [s for s in NEVER_LOGGED if s in text]
        assert not leaked, f"{leaked} logged by {record.name}: {text!r}"
        assert record.exc_info is None or record.name.startswith("uvicorn"), text


# -- helpers ---------------------------------------------------------------------------------------------

_n = iter(range(10**9))


def sent_messages(ledger: Ledger, account: str, refs: list[str | None]) -> list[str]:
    """Messages handed to ``account`` with these references (``None``: still ``sending``); their ids."""
    run, _ = ledger.create_run(
        RunRecord(
            id=f"run{next(_n):06d}{secrets.token_hex(4)}",
            campaign="essai",
            campaign_file="/srv/essai.yaml",
            config_file=None,
            channels=["sms"],
        )
    )
    ids = [f"msg{next(_n):06d}{secrets.token_hex(4)}" for _ in refs]
    ledger.add_batch(
        run.id,
        [NewRecipient(f"p{i}", 0, i + 2, {}) for i in range(len(refs))],
        [
            NewMessage(mid, f"p{i}", 0, "sms", 0, account, Status.CREATED, address=f"+336{12340000 + i:08d}")
            for i, mid in enumerate(ids)
        ],
    )
    now = datetime.now(UTC)
    ledger.claim(ids, now)
    record(ledger, [(mid, ref) for mid, ref in zip(ids, refs, strict=True) if ref is not None])
    return ids


def record(ledger: Ledger, sent: list[tuple[str, str]]) -> None:
    ledger.record([Result(mid, Status.SENT, provider_reference=ref) for mid, ref in sent], datetime.now(UTC))


def get(ledger: Ledger, message_id: str) -> MessageRecord:
    for run in ledger.list_runs(limit=100):
        for m in ledger.messages(run.id):
            if m.id == message_id:
                return m
    raise AssertionError(message_id)


def twilio_post(
    served: Served, path: str, form: dict[str, str], *, token: str = ENV["TWILIO_TOKEN"]
) -> httpx.Response:
    signature = twilio_signature(token, PUBLIC + path, {k: [v] for k, v in form.items()})
    return served.http.post(path, data=form, headers={"X-Twilio-Signature": signature})


def hook_secret() -> dict[str, str]:
    return {"Authorization": f"Bearer {ENV['HOOK_SECRET']}"}


def suppressed(served: Served, phone: str) -> bool:
    return bool(served.ledger.suppressed("sms", {recipient_hash(served.config.secret_key(), "sms", phone)}))


# -- receipts ---------------------------------------------------------------------------------------------


def test_a_signed_twilio_receipt_delivers_the_message(serve: Callable[..., Served], db_url: str) -> None:
    served = serve(db_url)
    (mid,) = sent_messages(served.ledger, "twilio-sms", ["SM0001"])
    before = REGISTRY.get_sample_value("smartpush_time_to_delivery_seconds_count", {"channel": "sms"}) or 0.0
    answer = twilio_post(
        served,
        "/webhooks/twilio-sms",
        {"MessageSid": "SM0001", "MessageStatus": "delivered", "To": "+33612340000"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"stored": 1, "applied": 1, "pending": 0, "ignored": 0}
    message = get(served.ledger, mid)
    assert message.status == Status.DELIVERED
    assert message.delivered_at is not None and message.final_at is not None
    assert [r.status for r in served.ledger.message_receipts(mid)] == ["delivered"]
    after = REGISTRY.get_sample_value("smartpush_time_to_delivery_seconds_count", {"channel": "sms"})
    assert after == before + 1


def test_unsigned_and_forged_requests_are_refused_without_detail(
    serve: Callable[..., Served], db_url: str
) -> None:
    served = serve(db_url)
    (mid,) = sent_messages(served.ledger, "twilio-sms", ["SM0002"])
    form = {"MessageSid": "SM0002", "MessageStatus": "delivered"}
    path = "/webhooks/twilio-sms"
    attempts = [
        served.http.post(path, data=form),  # unsigned
        twilio_post(served, path, form, token="not-the-token"),  # forged
        served.http.post(  # signed for the address it was posted to, not the public one
            path,
            data=form,
            headers={
                "X-Twilio-Signature": twilio_signature(
                    ENV["TWILIO_TOKEN"], served.url + path, {k: [v] for k, v in form.items()}
                )
            },
        ),
        served.http.post(  # a genuine signature over other fields
            path,
            data={**form, "MessageStatus": "failed"},
            headers={
                "X-Twilio-Signature": twilio_signature(
                    ENV["TWILIO_TOKEN"], PUBLIC + path, {k: [v] for k, v in form.items()}
                )
            },
        ),
        served.http.post("/webhooks/agg?token=wrong", json={"reference": "SM0002", "status": "delivered"}),
        served.http.post("/webhooks/agg", json={"reference": "SM0002", "status": "delivered"}),
        served.http.post("/inbound/agg", json={"from": "+33612340000", "text": "STOP"}),
        served.http.get(
            "/webhooks/vonage-sms", params={"messageId": "SM0002", "status": "delivered", "sig": "00"}
        ),
    ]
    for answer in attempts:
        assert answer.status_code == 403
        assert answer.content == b""
    assert get(served.ledger, mid).status == Status.SENT
    assert served.ledger.message_receipts(mid) == []
    assert not suppressed(served, "+33612340000")


def test_an_account_that_cannot_authenticate_is_refused_and_named_in_the_log(
    serve: Callable[..., Served], sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    served = serve(sqlite_url)
    for _ in range(3):
        answer = served.http.post(
            "/webhooks/open?token=anything", json={"reference": "x", "status": "delivered"}
        )
        assert answer.status_code == 403
    lines = [r.getMessage() for r in caplog.records if r.name == "smartpush.serve.webhooks"]
    assert len(lines) == 1  # once a minute per account, not once per request
    assert "'open'" in lines[0] and "webhook_secret" in lines[0]
    assert "anything" not in lines[0]


def test_unknown_accounts_and_accounts_without_receipts_are_not_found(
    serve: Callable[..., Served], sqlite_url: str
) -> None:
    served = serve(sqlite_url)
    assert served.http.post("/webhooks/nobody", json={}).status_code == 404
    assert served.http.post("/webhooks/files", json={}).status_code == 404
    assert served.http.post("/inbound/files", json={}).status_code == 404


def test_vonage_signed_delivery_receipts_by_get(serve: Callable[..., Served], db_url: str) -> None:
    served = serve(db_url)
    ok, dead = sent_messages(served.ledger, "vonage-sms", ["0C000001", "0C000002"])
    for ref, status, err in (("0C000001", "delivered", "0"), ("0C000002", "failed", "3")):
        params = {
            "msisdn": "33612340000",
            "to": "MAIRIE",
            "messageId": ref,
            "status": status,
            "err-code": err,
            "scts": "2611261738",
            "timestamp": str(int(time.time())),
            "nonce": secrets.token_hex(4),
        }
        params["sig"] = vonage_signature(ENV["VONAGE_SIG"], "sha256", params)
        answer = served.http.get("/webhooks/vonage-sms", params=params)
        assert answer.status_code == 200, answer.text
    assert get(served.ledger, ok).status == Status.DELIVERED
    assert get(served.ledger, dead).status == Status.PERMANENT_FAILURE
    assert suppressed(served, "+33612340001")  # err-code 3: the number is no longer active
    assert not suppressed(served, "+33612340000")


def test_ovh_and_brevo_receipts_with_the_account_secret(serve: Callable[..., Served], db_url: str) -> None:
    served = serve(db_url)
    (ovh,) = sent_messages(served.ledger, "ovh-sms", ["987654"])
    (brevo,) = sent_messages(served.ledger, "brevo-sms", ["brevo-ref-1"])
    answer = served.http.get(
        "/webhooks/ovh-sms", params={"token": ENV["HOOK_SECRET"], "id": "987654", "dlr": "1"}
    )
    assert answer.status_code == 200
    answer = served.http.post(
        f"/webhooks/brevo-sms?token={ENV['HOOK_SECRET']}",
        json={"reference": "brevo-ref-1", "msg_status": "hard_bounce", "to": "33612340000"},
    )
    assert answer.status_code == 200
    assert get(served.ledger, ovh).status == Status.DELIVERED
    assert get(served.ledger, brevo).status == Status.PERMANENT_FAILURE
    assert suppressed(served, "+33612340000")


@pytest.mark.parametrize("first", ["receipt", "send"])
def test_receipts_in_both_orders(serve: Callable[..., Served], db_url: str, first: str) -> None:
    served = serve(db_url)
    (mid,) = sent_messages(served.ledger, "agg", [None])  # still sending: no reference recorded yet
    body = {"reference": "REF-ORDER", "status": "delivered"}
    if first == "send":
        record(served.ledger, [(mid, "REF-ORDER")])
    answer = served.http.post("/webhooks/agg", json=body, headers=hook_secret())
    assert answer.status_code == 200
    assert answer.json()["pending"] == (1 if first == "receipt" else 0)
    if first == "receipt":
        assert get(served.ledger, mid).status == Status.SENDING
        record(served.ledger, [(mid, "REF-ORDER")])
    message = get(served.ledger, mid)
    assert message.status == Status.DELIVERED
    assert message.delivered_at is not None and message.sent_at is not None
    assert message.delivered_at >= message.sent_at
    [proof] = served.ledger.message_receipts(mid)
    assert proof.message_id == mid


def test_a_dead_number_reported_before_its_send_is_recorded_is_suppressed(
    serve: Callable[..., Served], db_url: str
) -> None:
    served = serve(db_url)
    (mid,) = sent_messages(served.ledger, "agg", [None])
    answer = served.http.post(
        "/webhooks/agg",
        json={"reference": "EARLY-DEAD", "status": "failed", "error_code": "DEAD"},
        headers=hook_secret(),
    )
    assert answer.json()["pending"] == 1
    record(served.ledger, [(mid, "EARLY-DEAD")])
    assert get(served.ledger, mid).status == Status.PERMANENT_FAILURE  # by Ledger.record's hook
    deadline = time.monotonic() + 5
    while not suppressed(served, "+33612340000"):  # by serve's recheck, a second after the receipt
        assert time.monotonic() < deadline, "the dead number was not suppressed"
        time.sleep(0.05)


def test_a_late_failure_never_undoes_a_delivery(serve: Callable[..., Served], db_url: str) -> None:
    served = serve(db_url)
    a, b = sent_messages(served.ledger, "agg", ["LATE-A", "LATE-B"])
    post = lambda body: served.http.post("/webhooks/agg", json=body, headers=hook_secret())  # noqa: E731
    assert post({"reference": "LATE-A", "status": "delivered"}).json()["applied"] == 1
    assert post({"reference": "LATE-A", "status": "failed", "error_code": "DEAD"}).json()["applied"] == 0
    assert post({"reference": "LATE-A", "status": "sent"}).json()["applied"] == 0
    # the other way round: a failure, then the delivery
    assert post({"reference": "LATE-B", "status": "expired", "error_code": "E1"}).json()["applied"] == 1
    assert get(served.ledger, b).status == Status.TEMPORARY_FAILURE
    assert post(
        [{"reference": "LATE-B", "status": "delivered"}, {"reference": "LATE-B", "status": "delivered"}]
    ).json() == {"stored": 2, "applied": 1, "pending": 0, "ignored": 0}
    for mid in (a, b):
        message = get(served.ledger, mid)
        assert (message.status, message.error_code) == (Status.DELIVERED, None)
    assert len(served.ledger.message_receipts(a)) == 3
    assert not suppressed(served, "+33612340000")  # it was delivered: the DEAD report is wrong


def test_interim_statuses_are_answered_and_ignored(serve: Callable[..., Served], sqlite_url: str) -> None:
    served = serve(sqlite_url)
    answer = twilio_post(served, "/webhooks/twilio-sms", {"MessageSid": "SM9", "MessageStatus": "queued"})
    assert answer.json() == {"stored": 0, "applied": 0, "pending": 0, "ignored": 1}


def test_garbage_and_oversized_bodies(serve: Callable[..., Served], sqlite_url: str) -> None:
    served = serve(sqlite_url)
    (mid,) = sent_messages(served.ledger, "agg", ["G1"])
    path = f"/webhooks/agg?token={ENV['HOOK_SECRET']}"
    bad = [
        (b"{not json", "application/json"),
        (b"[" * 50_000, "application/json"),
        (b"\xff\xfe\x00garbage", "application/x-www-form-urlencoded"),
        (b"%%%&&==&", "application/x-www-form-urlencoded"),
        (b"reference=G1&status=delivered", "text/plain"),
        (b"[1, 2, 3]", "application/json"),
        (b'{"status": "delivered"}', "application/json"),
        (b'"just a string"', "application/json"),
    ]
    for body, media in bad:
        answer = served.http.post(path, content=body, headers={"Content-Type": media})
        assert answer.status_code == 400, (body[:20], answer.status_code)
        assert answer.content == b""
    try:  # the size limit may answer 413 before reading it all, and close: a reset is a refusal too
        huge = served.http.post(
            path,
            content=b'{"reference": "' + b"x" * 2_000_000 + b'"}',
            headers={"Content-Type": "application/json"},
        )
        assert huge.status_code in (400, 413)
        assert b"Traceback" not in huge.content
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        pass
    # a Twilio signature covers the URL only when the body is not a form: garbage behind it is still 400
    signature = twilio_signature(ENV["TWILIO_TOKEN"], PUBLIC + "/webhooks/twilio-sms", {})
    answer = served.http.post(
        "/webhooks/twilio-sms",
        content=b"{oops",
        headers={"Content-Type": "application/json", "X-Twilio-Signature": signature},
    )
    assert answer.status_code == 400
    assert get(served.ledger, mid).status == Status.SENT
    assert served.ledger.message_receipts(mid) == []


def test_many_concurrent_receipts_are_all_stored(serve: Callable[..., Served], db_url: str) -> None:
    served = serve(db_url)
    refs = [f"C{i:04d}" for i in range(300)]
    ids = sent_messages(served.ledger, "agg", refs)

    async def post_all() -> list[int]:
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            answers = await asyncio.gather(
                *(
                    client.post(
                        "/webhooks/agg", json={"reference": r, "status": "delivered"}, headers=hook_secret()
                    )
                    for r in refs
                )
            )
        return [a.status_code for a in answers]

    flushes = served.writer.flushes
    assert asyncio.run(post_all()) == [200] * 300
    assert all(get(served.ledger, mid).status == Status.DELIVERED for mid in ids[::37])
    run_id = get(served.ledger, ids[0]).run_id
    assert served.ledger.counts(run_id) == {("sms", Status.DELIVERED): 300}
    assert served.writer.flushes - flushes < 300  # requests were committed together


# -- replies and STOP ---------------------------------------------------------------------------------------


def test_a_twilio_stop_reply_opts_the_number_out(serve: Callable[..., Served], db_url: str) -> None:
    served = serve(db_url)
    answer = twilio_post(
        served, "/inbound/twilio-sms", {"From": "+33612340007", "To": "+33700000000", "Body": "  Arrêt !"}
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/xml")
    assert answer.content.endswith(b"<Response/>")
    assert suppressed(served, "+33612340007")
    [entry] = served.ledger.latest_suppressions(channel="sms")
    assert (entry.reason, entry.source) == ("opt-out", "twilio-sms")
    other = twilio_post(served, "/inbound/twilio-sms", {"From": "+33612340008", "Body": "Bonjour, merci"})
    assert other.status_code == 200
    assert not suppressed(served, "+33612340008")
    unsigned = served.http.post("/inbound/twilio-sms", data={"From": "+33612340009", "Body": "STOP"})
    assert unsigned.status_code == 403
    assert not suppressed(served, "+33612340009")


def test_vonage_and_webhook_stop_replies(serve: Callable[..., Served], sqlite_url: str) -> None:
    served = serve(sqlite_url)
    params = {
        "msisdn": "33612340010",
        "to": "33700000000",
        "messageId": "0D01",
        "text": "STOP SMS",
        "type": "text",
        "timestamp": str(int(time.time())),
    }
    params["sig"] = vonage_signature(ENV["VONAGE_SIG"], "sha256", params)
    assert served.http.get("/inbound/vonage-sms", params=params).status_code == 200
    assert suppressed(served, "+33612340010")
    answer = served.http.post(
        "/inbound/agg", json={"from": "06 12 34 00 11", "text": "stop"}, headers=hook_secret()
    )
    assert answer.status_code == 200
    assert suppressed(served, "+33612340011")  # a national number, read in smartpush.yaml's region
    assert served.http.post("/inbound/agg", json={"text": "STOP"}, headers=hook_secret()).status_code == 400
    not_a_phone = served.http.post(
        "/inbound/agg", json={"from": "MAIRIE", "text": "STOP"}, headers=hook_secret()
    )
    assert not_a_phone.status_code == 200
    assert served.ledger.latest_suppressions(channel="sms", limit=10).__len__() == 2


CAMPAIGN = """\
name: rappel
category: information
audience:
  source: people.csv
  id: id
segments:
  size: 3
channels:
  - channel: sms
    provider: agg
    body: "Bonjour {{ prenom }}, votre rendez-vous est confirmé."
"""


def test_stop_from_a_phone_mid_campaign(serve: Callable[..., Served], tmp_path: Path) -> None:
    """Segment 0 is sent and its receipts come back through serve; a person of segment 1 replies STOP;
    segment 1 then goes out without them."""
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    with FakeProviderServer() as provider:
        served = serve(db, provider.url)
        lines = ["id;prenom;phone"] + [f"{i};Zoé{i};06123400{i:02d}" for i in range(6)]
        (tmp_path / "people.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp_path / "campaign.yaml").write_text(CAMPAIGN, encoding="utf-8")
        config = load_config(tmp_path / "smartpush.yaml", env=ENV)
        rt = Runtime(config)  # the worker: a ledger of its own on the same database
        try:
            run_id = launch(
                rt, load_campaign(tmp_path / "campaign.yaml", config), enqueue=lambda *a: None
            ).run.id
            process_segment(rt, lambda *a: None, run_id, 0)
            first = [m for m in rt.ledger.messages(run_id) if m.segment == 0]
            assert [m.status for m in first] == [Status.SENT] * 3
            for m in first:
                body = {"reference": m.provider_reference, "status": "delivered"}
                assert (
                    served.http.post("/webhooks/agg", json=body, headers=hook_secret()).json()["applied"] == 1
                )
            stop = served.http.post(
                "/inbound/agg", json={"from": "+33612340004", "text": "STOP"}, headers=hook_secret()
            )
            assert stop.status_code == 200
            assert suppressed(served, "+33612340004")
            process_segment(rt, lambda *a: None, run_id, 1)
            final = {m.recipient_id: m for m in rt.ledger.messages(run_id)}
        finally:
            rt.close()
        assert [final[str(i)].status for i in range(3)] == [Status.DELIVERED] * 3
        assert {final["3"].status, final["5"].status} == {Status.SENT}
        if importlib.util.find_spec("smartpush.suppression") is None:  # the before-send check is not built
            return
        assert final["4"].status == Status.SUPPRESSED  # the before-send check of process_segment
        sent_to = [r.json["to"] for r in provider.requests if r.json]
        assert "+33612340004" not in sent_to and len(sent_to) == 5


def test_query_string_order_and_encoding_are_signed_as_sent(
    serve: Callable[..., Served], sqlite_url: str
) -> None:
    """Twilio signs the URL it called byte for byte: the query string is used as received."""
    served = serve(sqlite_url)
    (mid,) = sent_messages(served.ledger, "twilio-sms", ["SMQ"])
    query = urlencode({"z": "1", "a": "é d"})
    path = f"/webhooks/twilio-sms?{query}"
    form = {"MessageSid": "SMQ", "MessageStatus": "delivered"}
    signature = twilio_signature(ENV["TWILIO_TOKEN"], PUBLIC + path, {k: [v] for k, v in form.items()})
    assert served.http.post(path, data=form, headers={"X-Twilio-Signature": signature}).status_code == 200
    assert get(served.ledger, mid).status == Status.DELIVERED
