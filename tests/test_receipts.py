"""Receipts and replies without HTTP: the settling rule, STOP words, the ledger's receipt methods on
SQLite and PostgreSQL, the record hook, the batching writer, and every driver's webhook hooks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from pydantic import SecretStr, ValidationError
from servers import ledger_of_kind
from smartpush.providers.brevo import BrevoOptions, BrevoProvider
from smartpush.providers.ovh import OvhOptions, OvhProvider
from smartpush.providers.twilio import TwilioOptions, TwilioProvider, request_signature
from smartpush.providers.vonage import VonageOptions, VonageProvider
from smartpush.providers.vonage import request_signature as vonage_signature
from smartpush.providers.webhook import WebhookOptions, WebhookProvider

from smartpush import receipts as receipts_module
from smartpush.errors import ConfigError
from smartpush.ledger import Ledger, NewMessage, NewRecipient, Result, RunRecord, Status
from smartpush.provider import Receipt, WebhookRequest, shared_secret_ok
from smartpush.receipts import (
    RANK,
    IncomingReceipt,
    MessageState,
    ReceiptWriter,
    fold,
    is_stop,
    settle,
)
from smartpush.unsubscribe import recipient_hash

KEY = b"k" * 48
T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


# -- fixtures and helpers -----------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    with ledger_of_kind(request.param, tmp_path, "receipts_test") as led:
        yield led


_ids = itertools.count()


def sending(ledger: Ledger, n: int, *, account: str = "sms-main", channel: str = "sms") -> list[str]:
    """A run with ``n`` messages of ``account``, claimed (``sending``); their ids."""
    run, _ = ledger.create_run(
        RunRecord(
            id=f"run{next(_ids):08d}{secrets.token_hex(4)}",
            campaign="essai",
            campaign_file="/srv/essai.yaml",
            config_file=None,
            channels=[channel],
        )
    )
    recipients = [NewRecipient(f"p{i}", 0, i + 2, {}) for i in range(n)]
    messages = [
        NewMessage(
            f"m{next(_ids):08d}{secrets.token_hex(4)}",
            f"p{i}",
            0,
            channel,
            0,
            account,
            Status.CREATED,
            address=f"+336{12345000 + i:08d}",
        )
        for i in range(n)
    ]
    ledger.add_batch(run.id, recipients, messages)
    ids = [m.id for m in messages]
    assert ledger.claim(ids, T0) == set(ids)
    return ids


def sent(ledger: Ledger, ids: list[str], refs: list[str], at: datetime = T0) -> None:
    ledger.record([Result(i, Status.SENT, provider_reference=r) for i, r in zip(ids, refs, strict=True)], at)


def message(ledger: Ledger, message_id: str) -> Any:
    found = [m for run in ledger.list_runs(limit=1000) for m in ledger.messages(run.id) if m.id == message_id]
    assert len(found) == 1
    return found[0]


def incoming(
    ref: str, status: Any, *, account: str = "sms-main", code: str | None = None, **kw: Any
) -> IncomingReceipt:
    at = kw.pop("received_at", T0 + timedelta(seconds=30))
    return IncomingReceipt(account, Receipt(ref, status, code, f"text {code}" if code else None, **kw), at)


def delivered_count(channel: str) -> float:
    found = REGISTRY.get_sample_value("smartpush_time_to_delivery_seconds_count", {"channel": channel})
    return found or 0.0


def counted(status: str, channel: str = "sms", provider: str = "sms-main") -> float:
    """smartpush_messages_total for the test runs' campaign ("essai")."""
    labels = {"campaign": "essai", "channel": channel, "provider": provider, "status": status}
    return REGISTRY.get_sample_value("smartpush_messages_total", labels) or 0.0


# -- the settling rule ---------------------------------------------------------------------------------


def state(status: str = "sent") -> MessageState:
    return MessageState("m", status, "sms", "+33612345678", T0, None, None, None)


@given(st.lists(st.sampled_from(sorted(RANK)), max_size=6), st.randoms())
def test_any_order_of_receipts_ends_in_the_same_state(statuses: list[str], rnd: Any) -> None:
    first, second = state(), state()
    shuffled = statuses[:]
    rnd.shuffle(shuffled)
    for s in statuses:
        settle(first, s, f"c-{s}", None, T0 + timedelta(seconds=5), T0 + timedelta(seconds=10))
    for s in shuffled:
        settle(second, s, f"c-{s}", None, T0 + timedelta(seconds=5), T0 + timedelta(seconds=10))
    expected = max(["sent", *statuses], key=RANK.__getitem__)
    assert first.status == second.status == expected
    assert (first.error_code, first.delivered_at) == (second.error_code, second.delivered_at)
    assert first.changed == (expected != "sent")


def test_delivered_wins_clears_the_error_and_never_goes_back() -> None:
    s = state()
    assert settle(s, "permanent-failure", "30005", "dead", T0, T0)
    assert settle(s, "delivered", None, None, T0 + timedelta(seconds=3), T0 + timedelta(seconds=4))
    assert (s.status, s.error_code, s.error_text) == ("delivered", None, None)
    assert s.delivered_at == T0 + timedelta(seconds=3)
    for late in ("sent", "temporary-failure", "permanent-failure", "delivered"):
        assert not settle(s, late, "x", "x", T0 + timedelta(hours=1), T0 + timedelta(hours=1))
    assert s.status == "delivered"


def test_delivered_at_is_never_before_sent_nor_in_the_future() -> None:
    early = state()
    settle(early, "delivered", None, None, T0 - timedelta(minutes=5), T0 + timedelta(minutes=1))
    assert early.delivered_at == T0
    future = state()
    settle(future, "delivered", None, None, T0 + timedelta(days=1), T0 + timedelta(minutes=1))
    assert future.delivered_at == T0 + timedelta(minutes=1)


@pytest.mark.parametrize("status", ["created", "sending", "suppressed", "cancelled", "technical-failure"])
def test_messages_not_handed_to_a_provider_do_not_move(status: str) -> None:
    assert not settle(state(status), "delivered", None, None, T0, T0)


# -- STOP ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "STOP",
        "stop",
        "Stop.",
        " stop ! ",
        "ARRÊT",
        "Arrêt",
        "arret",
        "« Arrêt »",
        "STOP SMS",
        "stop  sms",
        "STOPSMS",
        "Stop all",
        "UNSUBSCRIBE",
        "Désabonner",
        "désinscription",
        "stop 🙏",
        "ＳＴＯＰ",
        "\tSTOP\n",
    ],
)
def test_stop_replies(text: str) -> None:
    assert is_stop(text)


@pytest.mark.parametrize(
    "text",
    ["", "Bonjour", "stop merci", "ne pas arrêter", "STOP 36111", "stopper", "arrête", "OK", "non stop"],
)
def test_other_replies(text: str) -> None:
    assert not is_stop(text)


def test_fold_documents_what_matches() -> None:
    assert fold("  « Arrêt   SMS » !! ") == "arret sms"


# -- the ledger -----------------------------------------------------------------------------------------


def test_receipt_after_the_send_is_applied_and_stored(ledger: Ledger) -> None:
    (mid,) = sending(ledger, 1)
    sent(ledger, [mid], ["SM1"])
    before = delivered_count("sms")
    counted_before = counted("delivered")
    now = T0 + timedelta(minutes=1)
    [one] = ledger.store_receipts([incoming("SM1", "delivered", received_at=T0 + timedelta(seconds=40))], now)
    assert one.changed and one.message is not None and one.message.id == mid
    record = message(ledger, mid)
    assert record.status == Status.DELIVERED
    assert record.delivered_at == T0 + timedelta(seconds=40)
    assert record.final_at == now
    assert delivered_count("sms") == before + 1
    assert counted("delivered") == counted_before + 1  # the delivery ratio's numerator
    [proof] = ledger.message_receipts(mid)
    assert (proof.provider, proof.reference, proof.status, proof.message_id) == (
        "sms-main",
        "SM1",
        "delivered",
        mid,
    )
    assert proof.applied_at == now


def test_duplicates_and_late_news_change_nothing_but_are_stored(ledger: Ledger) -> None:
    (mid,) = sending(ledger, 1)
    sent(ledger, [mid], ["SM1"])
    ledger.store_receipts([incoming("SM1", "delivered")], T0 + timedelta(minutes=1))
    before = delivered_count("sms")
    counted_before = {s: counted(s) for s in ("delivered", "permanent-failure", "temporary-failure")}
    later = [
        incoming("SM1", s, code="30005" if "failure" in s else None)
        for s in ("delivered", "sent", "permanent-failure", "temporary-failure")
    ]
    settled = ledger.store_receipts(later, T0 + timedelta(minutes=2))
    assert [s.changed for s in settled] == [False] * 4
    record = message(ledger, mid)
    assert (record.status, record.error_code) == (Status.DELIVERED, None)
    assert len(ledger.message_receipts(mid)) == 5
    assert delivered_count("sms") == before
    assert {s: counted(s) for s in counted_before} == counted_before  # nothing moved, nothing counted


def test_a_failure_then_a_delivery_ends_delivered(ledger: Ledger) -> None:
    a, b = sending(ledger, 2)
    sent(ledger, [a, b], ["A", "B"])
    ledger.store_receipts([incoming("A", "temporary-failure", code="30003")], T0 + timedelta(minutes=1))
    ledger.store_receipts([incoming("B", "permanent-failure", code="30005")], T0 + timedelta(minutes=1))
    assert message(ledger, a).status == Status.TEMPORARY_FAILURE
    assert message(ledger, b).error_code == "30005"
    ledger.store_receipts(
        [incoming("A", "permanent-failure", code="30006"), incoming("B", "delivered")],
        T0 + timedelta(minutes=2),
    )
    assert (message(ledger, a).status, message(ledger, a).error_code) == (Status.PERMANENT_FAILURE, "30006")
    assert (message(ledger, b).status, message(ledger, b).error_code) == (Status.DELIVERED, None)


def test_a_receipt_before_the_send_waits_for_record(ledger: Ledger) -> None:
    early, other = sending(ledger, 2)
    [waiting] = ledger.store_receipts(
        [incoming("EARLY", "delivered", received_at=T0 - timedelta(seconds=1))], T0
    )
    assert waiting.message is None and not waiting.changed
    assert message(ledger, early).status == Status.SENDING
    before = delivered_count("sms")
    recorded = T0 + timedelta(seconds=2)
    sent(ledger, [early, other], ["EARLY", "OTHER"], recorded)
    record = message(ledger, early)
    assert record.status == Status.DELIVERED
    assert record.delivered_at == recorded  # the receipt came first: never before sent_at
    assert message(ledger, other).status == Status.SENT
    assert delivered_count("sms") == before + 1
    [proof] = ledger.message_receipts(early)
    assert proof.applied_at == recorded


def test_receipts_match_by_account_and_reference(ledger: Ledger) -> None:
    (mid,) = sending(ledger, 1, account="sms-main")
    sent(ledger, [mid], ["SAME"])
    [other] = ledger.store_receipts([incoming("SAME", "delivered", account="sms-backup")], T0)
    assert other.message is None
    assert message(ledger, mid).status == Status.SENT


def test_settle_receipts_applies_what_the_hook_missed(ledger: Ledger) -> None:
    (mid,) = sending(ledger, 1)
    ledger.store_receipts([incoming("LATE", "permanent-failure", code="30005")], T0)
    # The record hook and the receipt's transaction passed each other: the reference is set, the receipt
    # still waits. (Simulated by writing the reference behind the ledger's back.)
    ledger.record([Result(mid, Status.SENT, provider_reference=None)], T0)
    with ledger._tx() as conn:
        conn.exec_driver_sql(f"UPDATE messages SET provider_reference = 'LATE' WHERE id = '{mid}'")
    assert message(ledger, mid).status == Status.SENT
    found = ledger.settle_receipts("sms-main", {"LATE", "NEVER"}, T0 + timedelta(minutes=1))
    assert set(found) == {"LATE"}
    assert found["LATE"].status == "permanent-failure"
    assert message(ledger, mid).status == Status.PERMANENT_FAILURE
    assert ledger.message_receipts(mid)[0].message_id == mid
    again = ledger.settle_receipts("sms-main", {"LATE"}, T0 + timedelta(minutes=2))
    assert not again["LATE"].changed


def test_many_receipts_in_one_call(ledger: Ledger) -> None:
    ids = sending(ledger, 600)
    refs = [f"R{i}" for i in range(600)]
    sent(ledger, ids, refs)
    batch = [incoming(r, "delivered") for r in refs] + [incoming(f"X{i}", "delivered") for i in range(50)]
    settled = ledger.store_receipts(batch, T0 + timedelta(minutes=1))
    assert sum(s.changed for s in settled) == 600
    assert sum(s.message is None for s in settled) == 50
    counts = ledger.counts(message(ledger, ids[0]).run_id)
    assert counts == {("sms", Status.DELIVERED): 600}


# -- the batching writer ---------------------------------------------------------------------------------


def test_the_writer_commits_concurrent_requests_together_and_suppresses_dead_numbers(ledger: Ledger) -> None:
    ids = sending(ledger, 120)
    sent(ledger, ids, [f"W{i}" for i in range(120)])
    writer = ReceiptWriter(ledger, KEY)

    async def main() -> list[Any]:
        await writer.start()
        try:
            jobs = [
                writer.submit([incoming(f"W{i}", "permanent-failure", code="30005", suppress=i % 2 == 0)])
                for i in range(120)
            ]
            return await asyncio.gather(*jobs)
        finally:
            await writer.stop()

    answers = asyncio.run(main())
    assert all(len(a) == 1 and a[0].changed for a in answers)
    assert writer.stored == 120
    assert writer.flushes < 120  # batched
    hashes = {recipient_hash(KEY, "sms", f"+336{12345000 + i:08d}"): i for i in range(120)}
    listed = ledger.suppressed("sms", hashes)
    assert {hashes[h] for h in listed} == set(range(0, 120, 2))


def test_the_writer_rechecks_receipts_that_came_first(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(receipts_module, "RECHECK_AFTER_S", (0.05, 0.1, 0.2))
    (mid,) = sending(ledger, 1)
    writer = ReceiptWriter(ledger, KEY)

    async def main() -> None:
        await writer.start()
        try:
            [first] = await writer.submit(
                [incoming("DEAD", "permanent-failure", code="30005", suppress=True)]
            )
            assert first.message is None
            await asyncio.to_thread(sent, ledger, [mid], ["DEAD"])  # the hook applies the status...
            await asyncio.sleep(0.5)  # ...and the writer's recheck files the dead number
        finally:
            await writer.stop()

    asyncio.run(main())
    assert message(ledger, mid).status == Status.PERMANENT_FAILURE
    assert ledger.suppressed("sms", {recipient_hash(KEY, "sms", "+33612345000")})


def test_a_stopped_writer_refuses() -> None:
    writer = ReceiptWriter(Ledger("sqlite://"), KEY)
    with pytest.raises(RuntimeError):
        asyncio.run(writer.submit([incoming("X", "delivered")]))


# -- drivers: authentication ---------------------------------------------------------------------------

URL = "https://hooks.example.org/webhooks/sms-main"
SID = "AC" + "0" * 32


def hook(
    *,
    url: str | None = URL,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    query: dict[str, list[str]] | None = None,
    form: dict[str, list[str]] | None = None,
    json: Any = None,
) -> WebhookRequest:
    return WebhookRequest(method, url, headers or {}, query or {}, form or {}, json)


def test_twilio_signature_matches_twilios_published_example() -> None:
    params = {
        "CallSid": ["CA1234567890ABCDE"],
        "Caller": ["+12349013030"],
        "Digits": ["1234"],
        "From": ["+12349013030"],
        "To": ["+18005551212"],
    }
    assert request_signature("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", params) == (
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    )


def twilio(**options: Any) -> TwilioProvider:
    data = {"type": "twilio", "account_sid": SID, "auth_token": "tok", "sender": "MAIRIE", **options}
    return TwilioProvider("sms-main", TwilioOptions.model_validate(data))


def test_twilio_verification() -> None:
    form = {"MessageSid": ["SM1"], "MessageStatus": ["delivered"]}
    good = request_signature("tok", URL, form)
    driver = twilio()
    assert driver.verify_webhook(hook(form=form, headers={"x-twilio-signature": good}))
    with_port = request_signature("tok", "https://hooks.example.org:443/webhooks/sms-main", form)
    assert driver.verify_webhook(hook(form=form, headers={"x-twilio-signature": with_port}))
    assert not driver.verify_webhook(hook(form=form))
    assert not driver.verify_webhook(
        hook(form={**form, "MessageStatus": ["failed"]}, headers={"x-twilio-signature": good})
    )
    assert not driver.verify_webhook(hook(url=URL + "x", form=form, headers={"x-twilio-signature": good}))
    assert not twilio(auth_token="other").verify_webhook(
        hook(form=form, headers={"x-twilio-signature": good})
    )
    get = request_signature("tok", URL + "?MessageSid=SM1", {})
    assert driver.verify_webhook(
        hook(method="GET", url=URL + "?MessageSid=SM1", headers={"x-twilio-signature": get})
    )


def test_twilio_without_a_way_to_verify_says_what_to_set() -> None:
    with pytest.raises(ConfigError, match="public_url"):
        twilio().verify_webhook(hook(url=None))
    keyed = twilio(auth_token=None, api_key_sid="SK" + "1" * 32, api_key_secret="x")
    with pytest.raises(ConfigError, match="webhook_auth_token"):
        keyed.verify_webhook(hook())
    signed = twilio(
        auth_token=None, api_key_sid="SK" + "1" * 32, api_key_secret="x", webhook_auth_token="tok"
    )
    form = {"MessageSid": ["SM1"]}
    assert signed.verify_webhook(
        hook(form=form, headers={"x-twilio-signature": request_signature("tok", URL, form)})
    )


def test_twilio_receipts_and_replies() -> None:
    driver = twilio()
    [dead] = driver.parse_receipts(
        hook(form={"MessageSid": ["SM1"], "MessageStatus": ["undelivered"], "ErrorCode": ["30005"]})
    )
    assert (dead.status, dead.suppress) == ("permanent-failure", True)
    [passing] = driver.parse_receipts(
        hook(form={"MessageSid": ["SM1"], "MessageStatus": ["undelivered"], "ErrorCode": ["30003"]})
    )
    assert (passing.status, passing.suppress) == ("temporary-failure", False)
    assert driver.parse_receipts(hook(form={"MessageSid": ["SM1"], "MessageStatus": ["queued"]})) == []
    reply = driver.parse_inbound(hook(form={"From": ["+33612345678"], "Body": ["STOP"]}))
    assert reply is not None and (reply.sender, reply.text) == ("+33612345678", "STOP")
    answer = driver.inbound_answer()
    assert (answer.status, answer.media_type) == (200, "text/xml")
    assert answer.body.endswith(b"<Response/>")


def vonage(**options: Any) -> VonageProvider:
    data = {"type": "vonage", "api_key": "key", "api_secret": "s", "sender": "MAIRIE", **options}
    return VonageProvider("sms-v", VonageOptions.model_validate(data))


DLR = {
    "msisdn": "33612345678",
    "to": "MAIRIE",
    "messageId": "0C00",
    "status": "delivered",
    "err-code": "0",
    "scts": "2611261738",
    "message-timestamp": "2026-11-26 17:38:05",
    "timestamp": "1795721885",
    "nonce": "9f1c",
    "text": "a&b=c",
}


@pytest.mark.parametrize("method", ["md5hash", "md5", "sha1", "sha256", "sha512"])
def test_vonage_signatures(method: str) -> None:
    driver = vonage(signature_secret="sigsecret", signature_method=method)
    sig = vonage_signature("sigsecret", method, DLR)  # type: ignore[arg-type]
    query = {k: [v] for k, v in {**DLR, "sig": sig.upper()}.items()}
    assert driver.verify_webhook(hook(method="GET", query=query))
    assert driver.verify_webhook(hook(json={**DLR, "sig": sig}))
    assert not driver.verify_webhook(hook(json={**DLR, "status": "failed", "sig": sig}))
    assert not driver.verify_webhook(hook(json=DLR))
    assert not vonage(signature_secret="other", signature_method=method).verify_webhook(
        hook(json={**DLR, "sig": sig})
    )


def test_vonage_md5hash_is_md5_of_the_sorted_pairs_and_the_secret() -> None:
    expected = hashlib.md5(b"&a=1&b=x_y_z" + b"secret").hexdigest()
    assert vonage_signature("secret", "md5hash", {"b": "x&y=z", "a": 1}) == expected
    keyed = hmac.new(b"secret", b"&a=1&b=x_y_z", "sha256").hexdigest()
    assert vonage_signature("secret", "sha256", {"b": "x&y=z", "a": 1}) == keyed


def test_vonage_without_signature_takes_a_token_or_says_what_to_set() -> None:
    with pytest.raises(ConfigError, match="signature_secret"):
        vonage().verify_webhook(hook(json=DLR))
    driver = vonage(webhook_secret="tok")
    assert driver.verify_webhook(hook(query={"token": ["tok"]}, json=DLR))
    assert not driver.verify_webhook(hook(query={"token": ["nope"]}, json=DLR))


def test_vonage_receipts_and_replies() -> None:
    driver = vonage(webhook_secret="tok")
    [ok] = driver.parse_receipts(hook(json=DLR))
    assert (ok.status, ok.occurred_at) == ("delivered", datetime(2026, 11, 26, 17, 38, tzinfo=UTC))
    [dead] = driver.parse_receipts(hook(json={**DLR, "status": "failed", "err-code": "3"}))
    assert (dead.status, dead.suppress) == ("permanent-failure", True)
    [absent] = driver.parse_receipts(hook(json={**DLR, "status": "failed", "err-code": "2"}))
    assert (absent.status, absent.suppress) == ("temporary-failure", False)
    reply = driver.parse_inbound(hook(method="GET", query={"msisdn": ["33612345678"], "text": ["Stop"]}))
    assert reply is not None and reply.sender == "+33612345678"


def test_shared_secret() -> None:
    secret = SecretStr("s3cret")
    assert shared_secret_ok(hook(query={"token": ["s3cret"]}), secret, "a")
    assert shared_secret_ok(hook(headers={"authorization": "Bearer s3cret"}), secret, "a")
    assert shared_secret_ok(hook(headers={"authorization": "bearer  s3cret "}), secret, "a")
    assert not shared_secret_ok(hook(headers={"authorization": "Basic s3cret"}), secret, "a")
    assert not shared_secret_ok(hook(query={"token": ["s3cre"]}), secret, "a")
    assert not shared_secret_ok(hook(), secret, "a")
    with pytest.raises(ConfigError, match="webhook_secret"):
        shared_secret_ok(hook(query={"token": [""]}), SecretStr(""), "a")


def test_ovh_and_brevo_take_the_account_secret() -> None:
    ovh = OvhProvider(
        "ovh",
        OvhOptions.model_validate(
            {
                "type": "ovh",
                "application_key": "ak",
                "application_secret": "as",
                "consumer_key": "ck",
                "service_name": "sms-ab12345-1",
                "sender": "MAIRIE",
                "webhook_secret": "tok",
            }
        ),
    )
    assert ovh.verify_webhook(hook(query={"token": ["tok"], "id": ["1"], "dlr": ["1"]}))
    [receipt] = ovh.parse_receipts(hook(method="GET", query={"token": ["tok"], "id": ["77"], "dlr": ["1"]}))
    assert receipt == Receipt("77", "delivered")
    brevo_options = {"type": "brevo", "api_key": "k", "sender": "MAIRIE"}
    with pytest.raises(ConfigError, match="webhook_secret"):
        BrevoProvider("brevo", BrevoOptions.model_validate(brevo_options)).verify_webhook(hook())
    brevo = BrevoProvider("brevo", BrevoOptions.model_validate({**brevo_options, "webhook_secret": "tok"}))
    [bounce] = brevo.parse_receipts(
        hook(json={"reference": "R1", "msg_status": "hard_bounce", "ts_event": 1795721885})
    )
    assert (bounce.status, bounce.suppress) == ("permanent-failure", True)
    assert bounce.occurred_at == datetime.fromtimestamp(1795721885, UTC)
    reply = brevo.parse_inbound(hook(json={"from": "33612345678", "text": "STOP"}))
    assert reply is not None and reply.sender == "+33612345678"


def webhook(**options: Any) -> WebhookProvider:
    data = {"type": "webhook", "base_url": "https://api.example", "webhook_secret": "tok", **options}
    return WebhookProvider("agg", WebhookOptions.model_validate(data))


def test_webhook_receipts_with_the_default_shape() -> None:
    driver = webhook(unregistered_codes=["UNKNOWN_SUBSCRIBER"])
    body = [
        {"reference": "a", "status": "delivered"},
        {"reference": "b", "status": "failed", "error_code": "UNKNOWN_SUBSCRIBER"},
        {"reference": "c", "status": "expired", "error_code": 17},
        {"reference": "d", "status": "queued"},
    ]
    a, b, c = driver.parse_receipts(hook(json=body))
    assert a == Receipt("a", "delivered")
    assert (b.status, b.error_code, b.suppress) == ("permanent-failure", "UNKNOWN_SUBSCRIBER", True)
    assert (c.status, c.error_code, c.suppress) == ("temporary-failure", "17", False)
    [form] = driver.parse_receipts(hook(form={"reference": ["f"], "status": ["sent"]}))
    assert form == Receipt("f", "sent")


def test_webhook_receipts_with_renamed_fields_and_statuses() -> None:
    driver = webhook(
        receipt_fields={"reference": "data.id", "status": "data.state", "error_code": "data.reason"},
        receipt_statuses={"DELIVRD": "delivered", "UNDELIV": "permanent-failure"},
        inbound_fields={"from": "msisdn", "text": "message.body"},
    )
    [r] = driver.parse_receipts(hook(json={"data": {"id": 42, "state": "UNDELIV", "reason": "X"}}))
    assert (r.provider_reference, r.status, r.error_code) == ("42", "permanent-failure", "X")
    assert driver.parse_receipts(hook(json={"data": {"id": 42, "state": "delivered"}})) == []
    reply = driver.parse_inbound(hook(json={"msisdn": "+33612345678", "message": {"body": "STOP"}}))
    assert reply is not None and reply.text == "STOP"


@pytest.mark.parametrize(
    "body",
    [{"status": "delivered"}, {"reference": "a"}, [1, 2], "text", {"reference": {"x": 1}, "status": "sent"}],
)
def test_webhook_malformed_receipts(body: Any) -> None:
    with pytest.raises(ValueError):
        webhook().parse_receipts(hook(json=body))


def test_webhook_receipt_options_are_checked() -> None:
    with pytest.raises(ValidationError, match="did you mean"):
        webhook(receipt_fields={"refrence": "id"})
    with pytest.raises(ValidationError, match="cannot be left out"):
        webhook(receipt_fields={"status": ""})
    with pytest.raises(ValidationError):
        webhook(receipt_statuses={"OK": "fine"})


def test_twilio_signature_is_base64_of_hmac_sha1() -> None:
    digest = hmac.new(b"tok", (URL + "ANameZvalue").encode(), hashlib.sha1).digest()
    assert request_signature("tok", URL, {"Z": ["value"], "A": ["Name"]}) == base64.b64encode(digest).decode()
