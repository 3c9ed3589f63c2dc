"""The ``brevo`` driver against a loopback server that speaks Brevo's transactional SMS API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from smartpush.providers.brevo import BrevoOptions, BrevoProvider, parse_receipt
from smartpush.providers.twilio import Receipt

from smartpush import registry
from smartpush.config import load_config
from smartpush.errors import PermanentError, ProviderError, TechnicalError, ThrottledError, TransientError
from smartpush.provider import Channel, OutboundMessage, SendResult
from smartpush.sms import analyse
from smartpush.testing import FakeProviderServer, RecordedRequest, Reply

API_KEY = "xkeysib-0123456789abcdef-very-secret"
OK_NUMBER = "+33612345678"
REFERENCE = "ab1cde2fgh3i4jklmno"
MESSAGE_ID = 1511882900176220

#: Numbers the fake refuses: digits -> (HTTP status, Brevo error document or None, headers).
SCRIPTED: dict[str, tuple[int, dict[str, str] | None, dict[str, str]]] = {
    "33600000001": (
        400,
        {"code": "invalid_parameter", "message": "Invalid recipient number 33600000001"},
        {},
    ),
    "33600000002": (400, {"code": "invalid_parameter", "message": "sender is not valid"}, {}),
    "33600000003": (402, {"code": "not_enough_credits", "message": "Not enough credits"}, {}),
    "33600000004": (429, {"code": "too_many_requests", "message": "Too many requests"}, {"Retry-After": "4"}),
    "33600000005": (
        429,
        {"code": "too_many_requests", "message": "Too many requests"},
        {"x-sib-ratelimit-limit": "150", "x-sib-ratelimit-remaining": "0", "x-sib-ratelimit-reset": "2"},
    ),
    "33600000006": (500, None, {}),
    "33600000007": (403, {"code": "permission_denied", "message": "Unrecognised IP address"}, {}),
    "33600000008": (400, {"code": "missing_parameter", "message": "content is missing"}, {}),
}


def responder(request: RecordedRequest) -> Reply:
    """What api.brevo.com answers, for the key and numbers of these tests."""
    if request.method != "POST" or request.path != "/v3/transactionalSMS/sms":
        return Reply(404, json={"code": "document_not_found", "message": "Not found"})
    if request.headers.get("api-key") != API_KEY:
        return Reply(401, json={"code": "unauthorized", "message": "Key not found"})
    document = json.loads(request.body)
    recipient = document.get("recipient", "")
    if recipient in SCRIPTED:
        status, error, headers = SCRIPTED[recipient]
        if error is None:
            return Reply(status, body=b"", headers=headers)
        return Reply(status, json=error, headers=headers)
    count = analyse(document["content"]).parts
    return Reply(
        201,
        json={
            "reference": REFERENCE,
            "messageId": MESSAGE_ID,
            "smsCount": count,
            "usedCredits": 0.7 * count,
            "remainingCredits": 812.5,
        },
    )


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(responder=responder) as fake:
        yield fake


def options(server: FakeProviderServer | None = None, **values: Any) -> BrevoOptions:
    data: dict[str, Any] = {"type": "brevo", "api_key": API_KEY, "sender": "ASSURANCE"}
    if server is not None:
        data["base_url"] = server.url
    data.update(values)
    return BrevoOptions.model_validate({k: v for k, v in data.items() if v is not None})


def sms(to: str = OK_NUMBER, body: str = "Votre rendez-vous est confirme.", **values: Any) -> OutboundMessage:
    return OutboundMessage(message_id="m-1", run_id="r-1", channel=Channel.SMS, to=to, body=body, **values)


def send(opts: BrevoOptions, message: OutboundMessage) -> SendResult:
    async def go() -> SendResult:
        provider = BrevoProvider("brevo", opts)
        try:
            return await provider.send(message)
        finally:
            await provider.close()

    return asyncio.run(go())


def refused(opts: BrevoOptions, message: OutboundMessage) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        send(opts, message)
    error = caught.value
    for text in (str(error), error.detail, repr(error.args)):
        assert message.to.removeprefix("+") not in text
        assert message.body not in text
        assert API_KEY not in text
    return error


# -- the request --------------------------------------------------------------------------------------


def test_registered_by_entry_point() -> None:
    assert registry.driver("brevo") is BrevoProvider
    assert BrevoProvider.channels == frozenset({Channel.SMS})


def test_request_shape(server: FakeProviderServer) -> None:
    result = send(options(server, tag="rdv-2026", web_url="https://hooks.example.org/brevo/sms"), sms())
    assert result == SendResult(provider_reference=REFERENCE, parts=1)
    (request,) = server.requests
    assert request.method == "POST"
    assert request.path == "/v3/transactionalSMS/sms"
    assert request.headers["api-key"] == API_KEY
    assert request.headers["Content-Type"].startswith("application/json")
    assert "Authorization" not in request.headers
    assert json.loads(request.body) == {
        "sender": "ASSURANCE",
        "recipient": "33612345678",
        "content": "Votre rendez-vous est confirme.",
        "type": "transactional",
        "tag": "rdv-2026",
        "webUrl": "https://hooks.example.org/brevo/sms",
    }


def test_minimal_request_and_marketing_type(server: FakeProviderServer) -> None:
    send(options(server, sms_type="marketing"), sms())
    assert json.loads(server.requests[0].body) == {
        "sender": "ASSURANCE",
        "recipient": "33612345678",
        "content": "Votre rendez-vous est confirme.",
        "type": "marketing",
    }


def test_unicode_and_long_bodies(server: FakeProviderServer) -> None:
    send(options(server), sms(body="Accès confirmé 👍"))
    assert json.loads(server.requests[0].body)["unicodeEnabled"] is True
    assert send(options(server), sms(body="x" * 200)).parts == 2


def test_message_sender_overrides_the_account(server: FakeProviderServer) -> None:
    send(options(server), sms(sender="MAIRIE"))
    assert json.loads(server.requests[0].body)["sender"] == "MAIRIE"


def test_the_engine_stop_mention_is_not_appended_again(server: FakeProviderServer) -> None:
    body = "Offre de prevention. STOP 36111"
    send(options(server, stop_mention="STOP 36111", sms_type="marketing"), sms(body=body))
    assert json.loads(server.requests[0].body)["content"] == body


def test_the_successor_answer_gives_the_message_id(server: FakeProviderServer) -> None:
    server.script([Reply(201, json={"messageId": MESSAGE_ID})])
    assert send(options(server), sms()) == SendResult(provider_reference=str(MESSAGE_ID), parts=1)


def test_a_2xx_without_json_is_still_accepted(server: FakeProviderServer) -> None:
    server.script([Reply(201, body=b"not json")])
    assert send(options(server), sms()) == SendResult(provider_reference=None, parts=1)


def test_default_base_url() -> None:
    assert BrevoProvider("brevo", options()).url == "https://api.brevo.com/v3/transactionalSMS/sms"


# -- errors -------------------------------------------------------------------------------------------


def test_a_wrong_key_is_technical(server: FakeProviderServer) -> None:
    error = refused(options(server, api_key="wrong-key"), sms())
    assert type(error) is TechnicalError
    assert error.code == "unauthorized"
    assert "wrong-key" not in str(error)


@pytest.mark.parametrize(
    ("number", "kind", "code", "wait"),
    [
        ("+33600000001", PermanentError, "invalid_parameter", None),
        ("+33600000002", TechnicalError, "invalid_parameter", None),
        ("+33600000003", TechnicalError, "not_enough_credits", None),
        ("+33600000004", ThrottledError, "too_many_requests", 4.0),
        ("+33600000005", ThrottledError, "too_many_requests", 2.0),
        ("+33600000006", TransientError, "500", None),
        ("+33600000007", TechnicalError, "permission_denied", None),
        ("+33600000008", TechnicalError, "missing_parameter", None),
    ],
)
def test_documented_errors(
    server: FakeProviderServer, number: str, kind: type[ProviderError], code: str, wait: float | None
) -> None:
    error = refused(options(server), sms(to=number))
    assert type(error) is kind
    assert error.code == code
    if isinstance(error, PermanentError):
        assert error.suppress is True
    if isinstance(error, ThrottledError | TransientError):
        assert error.retry_after_s == wait


def test_a_404_is_technical_not_the_recipient(server: FakeProviderServer) -> None:
    error = refused(options(server, base_url=server.url + "/elsewhere"), sms())
    assert type(error) is TechnicalError
    assert error.code == "document_not_found"


def test_a_5xx_html_page_is_transient(server: FakeProviderServer) -> None:
    server.script([Reply(502, body=b"<html>Bad gateway</html>")])
    error = refused(options(server), sms())
    assert type(error) is TransientError
    assert error.code == "502"


# -- options ------------------------------------------------------------------------------------------


def write(tmp_path: Path, account: str) -> Path:
    path = tmp_path / "smartpush.yaml"
    path.write_text("providers:\n  sms:\n    type: brevo\n" + account, encoding="utf-8")
    return path


def test_an_account_loads_from_smartpush_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "    api_key: ${BREVO_API_KEY}\n"
        "    sender: ASSURANCE\n"
        "    sms_type: transactional\n"
        "    web_url: https://hooks.example.org/brevo/sms\n"
        "    rate: 100/s\n",
    )
    config = load_config(path, env={"BREVO_API_KEY": API_KEY})
    account = config.account("sms")
    assert isinstance(account, BrevoOptions)
    assert isinstance(account.api_key, SecretStr)
    assert account.api_key.get_secret_value() == API_KEY
    assert config.warnings == []
    for text in (repr(account), str(account), str(account.model_dump()), repr(config.accounts)):
        assert API_KEY not in text


def test_a_literal_key_gets_a_warning(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "    api_key: plain-secret\n    sender: ASSURANCE\n"), env={})
    assert any("api_key" in w.message for w in config.warnings)
    assert all("plain-secret" not in str(w) for w in config.warnings)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sender": None}, "give a sender"),
        ({"sms_type": "promo"}, "sms_type"),
        ({"web_url": "ftp://hooks.example.org"}, "http(s)"),
        ({"tag": ""}, "1 to 255"),
        ({"sender": "Mairie de Paris"}, "3 to 11"),
    ],
)
def test_invalid_options(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        options(**values)
    assert message in str(caught.value)
    assert API_KEY not in str(caught.value)


# -- receipts -----------------------------------------------------------------------------------------


def event(status: str, **extra: Any) -> dict[str, Any]:
    """A transactional SMS webhook event as Brevo posts it."""
    return {
        "id": 123456,
        "to": "33612345678",
        "sms_count": 1,
        "credits_used": 0.7,
        "messageId": MESSAGE_ID,
        "remaining_credit": 811.8,
        "msg_status": status,
        "date": "2026-11-26 18:00:00",
        "type": "transactional",
        "reference": REFERENCE,
        "tag": "rdv-2026",
        "ts_event": 1795806000,
        **extra,
    }


@pytest.mark.parametrize(
    ("status", "expected", "code"),
    [
        ("sent", "sent", None),
        ("accepted", "sent", None),
        ("delivered", "delivered", None),
        ("soft_bounce", "temporary-failure", "soft_bounce"),
        ("softBounce", "temporary-failure", "soft_bounce"),
        ("hard_bounce", "permanent-failure", "hard_bounce"),
        ("hardBounce", "permanent-failure", "hard_bounce"),
        ("unsubscribed", "permanent-failure", "unsubscribed"),
        ("blacklisted", "permanent-failure", "blacklisted"),
        ("rejected", "permanent-failure", "rejected"),
    ],
)
def test_receipts(status: str, expected: str, code: str | None) -> None:
    receipt = parse_receipt(event(status))
    assert receipt is not None
    assert receipt.provider_reference == REFERENCE
    assert receipt.status == expected
    assert receipt.error_code == code
    assert (receipt.error_text is not None) == expected.endswith("failure")
    assert "33612345678" not in repr(receipt)


@pytest.mark.parametrize("status", ["replied", "skip", "", "queued"])
def test_other_events_give_no_receipt(status: str) -> None:
    assert parse_receipt(event(status)) is None


def test_receipt_falls_back_on_message_id_and_event_field() -> None:
    assert parse_receipt({"messageId": MESSAGE_ID, "event": "delivered"}) == Receipt(
        str(MESSAGE_ID), "delivered"
    )


def test_receipt_without_reference_is_ignored() -> None:
    assert parse_receipt({"msg_status": "delivered"}) is None
