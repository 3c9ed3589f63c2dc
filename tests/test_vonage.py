"""The ``vonage`` driver against a loopback server that speaks the Vonage SMS API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from pydantic import SecretStr, ValidationError
from smartpush.providers.twilio import Receipt
from smartpush.providers.vonage import STATUSES, VonageOptions, VonageProvider, parse_receipt

from smartpush import registry
from smartpush.config import load_config
from smartpush.errors import (
    ConfigError,
    PermanentError,
    ProviderError,
    TechnicalError,
    ThrottledError,
    TransientError,
)
from smartpush.provider import Channel, OutboundMessage, SendResult
from smartpush.sms import analyse
from smartpush.testing import FakeProviderServer, RecordedRequest, Reply

API_KEY = "abcd1234"
SECRET = "sec-9c2d-very-secret"
OK_NUMBER = "+33612345678"
FIRST_ID = "0C000000217B7F02"
SECOND_ID = "0C000000217B7F03"

#: Numbers the fake refuses with a documented status: E.164 without '+' -> status.
SCRIPTED = {f"3360000{status.zfill(4)}": status for status in STATUSES}
#: The documented status -> (error class, suppress flag or None when not a permanent error).
EXPECTED: dict[str, tuple[type[ProviderError], bool | None]] = {
    "1": (ThrottledError, None),
    "2": (TechnicalError, None),
    "3": (TechnicalError, None),
    "4": (TechnicalError, None),
    "5": (TransientError, None),
    "6": (PermanentError, False),
    "7": (PermanentError, True),
    "8": (TechnicalError, None),
    "9": (TechnicalError, None),
    "10": (TransientError, None),
    "11": (TechnicalError, None),
    "12": (PermanentError, False),
    "14": (TechnicalError, None),
    "15": (TechnicalError, None),
    "22": (TechnicalError, None),
    "23": (TechnicalError, None),
    "29": (TechnicalError, None),
    "32": (TechnicalError, None),
    "33": (PermanentError, True),
}


def failure(to: str, status: str, text: str) -> Reply:
    return Reply(200, json={"message-count": "1", "messages": [{"status": status, "error-text": text}]})


def responder(request: RecordedRequest) -> Reply:
    """What rest.nexmo.com answers, for the account and numbers of these tests."""
    if request.method != "POST" or request.path != "/sms/json":
        return Reply(404, body=b"")
    form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
    for name in ("api_key", "api_secret", "from", "to", "text"):
        if not form.get(name):
            return failure("", "2", f"Missing {name}")
    if (form["api_key"], form["api_secret"]) != (API_KEY, SECRET):
        return failure(form["to"], "4", "Bad Credentials")
    to = form["to"]
    if to in SCRIPTED:
        return failure(to, SCRIPTED[to], f"Refused for {to}")
    parts = analyse(form["text"]).parts
    return Reply(
        200,
        json={
            "message-count": str(parts),
            "messages": [
                {
                    "to": to,
                    "message-id": [FIRST_ID, SECOND_ID][i % 2],
                    "status": "0",
                    "remaining-balance": "15.53590000",
                    "message-price": "0.03330000",
                    "network": "20801",
                    "client-ref": form.get("client-ref", ""),
                }
                for i in range(parts)
            ],
        },
    )


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(responder=responder) as fake:
        yield fake


def options(server: FakeProviderServer | None = None, **values: Any) -> VonageOptions:
    data: dict[str, Any] = {"type": "vonage", "api_key": API_KEY, "api_secret": SECRET, "sender": "ASSURANCE"}
    if server is not None:
        data["base_url"] = server.url
    data.update(values)
    return VonageOptions.model_validate({k: v for k, v in data.items() if v is not None})


def sms(to: str = OK_NUMBER, body: str = "Votre rendez-vous est confirme.", **values: Any) -> OutboundMessage:
    return OutboundMessage(message_id="m-1", run_id="r-1", channel=Channel.SMS, to=to, body=body, **values)


def send(opts: VonageOptions, message: OutboundMessage) -> SendResult:
    async def go() -> SendResult:
        provider = VonageProvider("vonage", opts)
        try:
            return await provider.send(message)
        finally:
            await provider.close()

    return asyncio.run(go())


def refused(opts: VonageOptions, message: OutboundMessage) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        send(opts, message)
    error = caught.value
    for text in (str(error), error.detail, repr(error.args)):
        assert message.to.removeprefix("+") not in text
        assert message.body not in text
        assert SECRET not in text
    return error


def form_of(server: FakeProviderServer) -> dict[str, list[str]]:
    (request,) = server.requests
    return parse_qs(request.body.decode(), strict_parsing=True)


# -- the request --------------------------------------------------------------------------------------


def test_registered_by_entry_point() -> None:
    assert registry.driver("vonage") is VonageProvider
    assert VonageProvider.channels == frozenset({Channel.SMS})


def test_request_shape(server: FakeProviderServer) -> None:
    result = send(options(server, callback="https://hooks.example.org/vonage/dlr"), sms())
    assert result == SendResult(provider_reference=FIRST_ID, parts=1)
    (request,) = server.requests
    assert request.method == "POST"
    assert request.path == "/sms/json"
    assert request.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert "Authorization" not in request.headers
    assert form_of(server) == {
        "api_key": [API_KEY],
        "api_secret": [SECRET],
        "from": ["ASSURANCE"],
        "to": ["33612345678"],
        "text": ["Votre rendez-vous est confirme."],
        "client-ref": ["m-1"],
        "callback": ["https://hooks.example.org/vonage/dlr"],
    }


def test_unicode_text_is_sent_as_unicode(server: FakeProviderServer) -> None:
    send(options(server), sms(body="Votre prochaine fête de quartier"))
    form = form_of(server)
    assert form["type"] == ["unicode"]
    assert form["text"] == ["Votre prochaine fête de quartier"]


def test_gsm7_text_has_no_type(server: FakeProviderServer) -> None:
    send(options(server), sms(body="Rendez-vous à 14h, café offert : été"))  # à é are GSM-7
    assert "type" not in form_of(server)


def test_numeric_sender_loses_its_plus(server: FakeProviderServer) -> None:
    send(options(server, sender="+33700000000"), sms())
    assert form_of(server)["from"] == ["33700000000"]


def test_multipart_reference_is_the_first_part(server: FakeProviderServer) -> None:
    result = send(options(server), sms(body="x" * 200))
    assert result == SendResult(provider_reference=FIRST_ID, parts=2)


def test_the_engine_stop_mention_is_not_appended_again(server: FakeProviderServer) -> None:
    body = "Offre de prevention. STOP 36179"
    send(options(server, stop_mention="STOP 36179"), sms(body=body))
    assert form_of(server)["text"] == [body]


def test_default_base_url() -> None:
    assert VonageProvider("vonage", options()).url == "https://rest.nexmo.com/sms/json"


# -- errors -------------------------------------------------------------------------------------------


def test_every_documented_status_is_expected() -> None:
    assert set(EXPECTED) == set(STATUSES)


def test_wrong_credentials_are_technical(server: FakeProviderServer) -> None:
    error = refused(options(server, api_secret="wrong"), sms())
    assert type(error) is TechnicalError
    assert error.code == "4"


@pytest.mark.parametrize("status", sorted(EXPECTED, key=int))
def test_documented_statuses(server: FakeProviderServer, status: str) -> None:
    kind, suppress = EXPECTED[status]
    error = refused(options(server), sms(to="+" + f"3360000{status.zfill(4)}"))
    assert type(error) is kind
    assert error.code == status
    if suppress is not None:
        assert isinstance(error, PermanentError)
        assert error.suppress is suppress


def test_an_unknown_status_is_technical(server: FakeProviderServer) -> None:
    server.script([failure("", "99", "Something new")])
    error = refused(options(server), sms())
    assert type(error) is TechnicalError
    assert error.code == "99"


def test_a_failed_later_part_refuses_the_message(server: FakeProviderServer) -> None:
    server.script(
        [
            Reply(
                200,
                json={
                    "message-count": "2",
                    "messages": [{"status": "0", "message-id": FIRST_ID}, {"status": "5", "error-text": "x"}],
                },
            )
        ]
    )
    assert type(refused(options(server), sms())) is TransientError


def test_throttled_status_honours_retry_after(server: FakeProviderServer) -> None:
    server.script(
        [Reply(200, json={"message-count": "1", "messages": [{"status": "1"}]}, headers={"Retry-After": "2"})]
    )
    error = refused(options(server), sms())
    assert type(error) is ThrottledError
    assert error.retry_after_s == 2.0


def test_http_429_honours_retry_after(server: FakeProviderServer) -> None:
    server.script([Reply(429, body=b"", headers={"Retry-After": "5"})])
    error = refused(options(server), sms())
    assert type(error) is ThrottledError
    assert error.retry_after_s == 5.0


def test_http_5xx_is_transient(server: FakeProviderServer) -> None:
    server.script([Reply(503, body=b"<html>down</html>")])
    assert type(refused(options(server), sms())) is TransientError


def test_an_answer_without_messages_is_technical(server: FakeProviderServer) -> None:
    server.script([Reply(200, json={"message-count": "0"})])
    error = refused(options(server), sms())
    assert type(error) is TechnicalError
    assert error.code == "invalid-answer"


# -- options ------------------------------------------------------------------------------------------


def write(tmp_path: Path, account: str) -> Path:
    path = tmp_path / "smartpush.yaml"
    path.write_text("providers:\n  sms:\n    type: vonage\n" + account, encoding="utf-8")
    return path


def test_an_account_loads_from_smartpush_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"    api_key: {API_KEY}\n"
        "    api_secret: ${VONAGE_API_SECRET}\n"
        "    sender: ASSURANCE\n"
        "    stop_mention: STOP 36179\n"
        "    callback: https://hooks.example.org/vonage/dlr\n"
        "    rate: 30/s\n",
    )
    config = load_config(path, env={"VONAGE_API_SECRET": SECRET})
    account = config.account("sms")
    assert isinstance(account, VonageOptions)
    assert isinstance(account.api_secret, SecretStr)
    assert account.api_secret.get_secret_value() == SECRET
    assert config.warnings == []
    for text in (repr(account), str(account), str(account.model_dump()), repr(config.accounts)):
        assert SECRET not in text


def test_a_literal_secret_gets_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, f"    api_key: {API_KEY}\n    api_secret: plain-secret\n    sender: ASSURANCE\n")
    config = load_config(path, env={})
    assert any("api_secret" in w.message for w in config.warnings)
    assert all("plain-secret" not in str(w) for w in config.warnings)


def test_a_sender_is_required(tmp_path: Path) -> None:
    path = write(tmp_path, f"    api_key: {API_KEY}\n    api_secret: ${{S}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"S": SECRET})
    assert "give a sender" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"api_key": "ab cd"}, "without spaces"),
        ({"callback": "hooks.example.org/dlr"}, "http(s)"),
        ({"sender": "Mairie de Paris"}, "3 to 11"),
    ],
)
def test_invalid_options(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        options(**values)
    assert message in str(caught.value)
    assert SECRET not in str(caught.value)


# -- receipts -----------------------------------------------------------------------------------------


def dlr(status: str, err: str = "0") -> dict[str, list[str]]:
    """A DLR as parse_qs reads Vonage's query string or form body."""
    fields = {
        "msisdn": "33612345678",
        "to": "ASSURANCE",
        "network-code": "20801",
        "messageId": FIRST_ID,
        "price": "0.03330000",
        "status": status,
        "scts": "2611261738",
        "err-code": err,
        "api-key": API_KEY,
        "client-ref": "m-1",
        "message-timestamp": "2026-11-26 17:38:00",
    }
    return parse_qs("&".join(f"{k}={v}" for k, v in fields.items()))


@pytest.mark.parametrize(
    ("status", "err", "expected", "code"),
    [
        ("delivered", "0", "delivered", None),
        ("accepted", "0", "sent", None),
        ("buffered", "0", "sent", None),
        ("expired", "5", "temporary-failure", "5"),
        ("failed", "1", "permanent-failure", "1"),
        ("rejected", "6", "permanent-failure", "6"),
    ],
)
def test_receipts(status: str, err: str, expected: str, code: str | None) -> None:
    receipt = parse_receipt(dlr(status, err))
    assert receipt is not None
    assert isinstance(receipt, Receipt)
    assert receipt.provider_reference == FIRST_ID
    assert receipt.status == expected
    assert receipt.error_code == code
    if expected.endswith("failure"):
        assert receipt.error_text
        assert "33612345678" not in receipt.error_text


def test_unknown_status_gives_no_receipt() -> None:
    assert parse_receipt(dlr("unknown")) is None


def test_receipt_from_json() -> None:
    receipt = parse_receipt({"messageId": SECOND_ID, "status": "delivered", "err-code": 0, "extra": {"x": 1}})
    assert receipt == Receipt(SECOND_ID, "delivered", None, None)


def test_receipt_without_message_id_is_ignored() -> None:
    assert parse_receipt({"status": "delivered"}) is None
