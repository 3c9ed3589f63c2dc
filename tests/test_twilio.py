"""The ``twilio`` driver against a loopback server that speaks Twilio's Messages API."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from pydantic import SecretStr, ValidationError
from smartpush.providers.twilio import Receipt, TwilioOptions, TwilioProvider, parse_receipt

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
from smartpush.testing import FakeProviderServer, RecordedRequest, Reply

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "tok-5e1f-very-secret"
KEY_SID = "SK" + "fedcba9876543210" * 2
KEY_SECRET = "keysecret-77aa"
SERVICE = "MG" + "00112233445566778899aabbccddeeff"
MESSAGE_SID = "SM" + "aa" * 16
OK_NUMBER = "+33612345678"

#: Numbers the fake answers with a documented error: number -> (HTTP status, Twilio code, headers).
SCRIPTED: dict[str, tuple[int, int, dict[str, str]]] = {
    "+33600000001": (400, 21211, {}),
    "+33600000002": (400, 21610, {}),
    "+33600000003": (400, 21408, {}),
    "+33600000004": (400, 21614, {}),
    "+33600000005": (429, 20429, {"Retry-After": "7"}),
    "+33600000006": (400, 30001, {}),
    "+33600000007": (503, 20500, {}),
    "+33600000008": (400, 21612, {}),
    "+33600000009": (400, 21635, {}),
    "+33600000010": (400, 21606, {}),
    "+33600000011": (400, 21611, {"Retry-After": "60"}),
    "+33600000012": (400, 29999, {}),
}


def twilio_error(status: int, code: int, number: str) -> dict[str, Any]:
    # Twilio's real messages quote the number: the driver must never repeat them.
    return {
        "code": code,
        "message": f"The 'To' number {number} is not a valid phone number.",
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def responder(request: RecordedRequest) -> Reply:
    """What api.twilio.com answers, for the accounts and numbers of these tests."""
    if request.method != "POST" or request.path != f"/2010-04-01/Accounts/{SID}/Messages.json":
        return Reply(
            404, json={"code": 20404, "message": "The requested resource was not found", "status": 404}
        )
    if request.headers.get("Authorization") not in (basic(SID, TOKEN), basic(KEY_SID, KEY_SECRET)):
        return Reply(
            401,
            json={
                "code": 20003,
                "message": "Authenticate",
                "more_info": "https://www.twilio.com/docs/errors/20003",
                "status": 401,
            },
        )
    form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
    to = form.get("To", "")
    if to in SCRIPTED:
        status, code, headers = SCRIPTED[to]
        return Reply(status, json=twilio_error(status, code, to), headers=headers)
    return Reply(
        201,
        json={
            "account_sid": SID,
            "api_version": "2010-04-01",
            "body": form.get("Body"),
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": form.get("From"),
            "messaging_service_sid": form.get("MessagingServiceSid"),
            "num_media": "0",
            "num_segments": "2" if len(form.get("Body", "")) > 160 else "1",
            "price": None,
            "sid": MESSAGE_SID,
            "status": "queued",
            "to": to,
            "uri": f"/2010-04-01/Accounts/{SID}/Messages/{MESSAGE_SID}.json",
        },
    )


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(responder=responder) as fake:
        yield fake


def options(server: FakeProviderServer | None = None, **values: Any) -> TwilioOptions:
    data: dict[str, Any] = {"type": "twilio", "account_sid": SID, "auth_token": TOKEN, "sender": "ASSURANCE"}
    if server is not None:
        data["base_url"] = server.url
    data.update(values)
    return TwilioOptions.model_validate({k: v for k, v in data.items() if v is not None})


def sms(to: str = OK_NUMBER, body: str = "Votre rendez-vous est confirmé.", **values: Any) -> OutboundMessage:
    return OutboundMessage(message_id="m-1", run_id="r-1", channel=Channel.SMS, to=to, body=body, **values)


def send(opts: TwilioOptions, message: OutboundMessage) -> SendResult:
    async def go() -> SendResult:
        provider = TwilioProvider("twilio", opts)
        try:
            return await provider.send(message)
        finally:
            await provider.close()

    return asyncio.run(go())


def refused(opts: TwilioOptions, message: OutboundMessage) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        send(opts, message)
    error = caught.value
    for text in (str(error), error.detail, repr(error.args)):
        assert message.to not in text
        assert message.to.removeprefix("+") not in text
        assert message.body not in text
    return error


# -- the request --------------------------------------------------------------------------------------


def test_registered_by_entry_point() -> None:
    assert registry.driver("twilio") is TwilioProvider
    assert TwilioProvider.channels == frozenset({Channel.SMS})


def test_request_shape(server: FakeProviderServer) -> None:
    result = send(options(server, status_callback="https://hooks.example.org/twilio/status"), sms())
    assert result == SendResult(provider_reference=MESSAGE_SID, parts=1)
    (request,) = server.requests
    assert request.method == "POST"
    assert request.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert request.headers["Authorization"] == basic(SID, TOKEN)
    assert request.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert parse_qs(request.body.decode(), strict_parsing=True) == {
        "To": [OK_NUMBER],
        "From": ["ASSURANCE"],
        "Body": ["Votre rendez-vous est confirmé."],
        "StatusCallback": ["https://hooks.example.org/twilio/status"],
    }


def test_messaging_service_without_sender(server: FakeProviderServer) -> None:
    send(options(server, sender=None, messaging_service_sid=SERVICE), sms())
    form = parse_qs(server.requests[0].body.decode())
    assert form["MessagingServiceSid"] == [SERVICE]
    assert "From" not in form
    assert "StatusCallback" not in form


def test_message_sender_overrides_the_account(server: FakeProviderServer) -> None:
    send(options(server), sms(sender="MAIRIE"))
    assert parse_qs(server.requests[0].body.decode())["From"] == ["MAIRIE"]


def test_api_key_authentication(server: FakeProviderServer) -> None:
    opts = options(server, auth_token=None, api_key_sid=KEY_SID, api_key_secret=KEY_SECRET)
    assert send(opts, sms()).provider_reference == MESSAGE_SID
    (request,) = server.requests
    assert request.headers["Authorization"] == basic(KEY_SID, KEY_SECRET)
    assert request.path == f"/2010-04-01/Accounts/{SID}/Messages.json"


def test_long_body_counts_segments(server: FakeProviderServer) -> None:
    assert send(options(server), sms(body="x" * 200)).parts == 2


def test_the_engine_stop_mention_is_not_appended_again(server: FakeProviderServer) -> None:
    body = "Offre de prévention. STOP 36111"
    send(options(server, stop_mention="STOP 36111"), sms(body=body))
    assert parse_qs(server.requests[0].body.decode())["Body"] == [body]


def test_default_base_url() -> None:
    provider = TwilioProvider("twilio", options())
    assert provider.url == f"https://api.twilio.com/2010-04-01/Accounts/{SID}/Messages.json"


# -- errors -------------------------------------------------------------------------------------------


def test_wrong_credentials_are_technical(server: FakeProviderServer) -> None:
    error = refused(options(server, auth_token="wrong"), sms())
    assert type(error) is TechnicalError
    assert error.code == "20003"
    assert "wrong" not in str(error)


@pytest.mark.parametrize(
    ("number", "kind", "code", "suppress"),
    [
        ("+33600000001", PermanentError, "21211", True),
        ("+33600000002", PermanentError, "21610", True),
        ("+33600000003", TechnicalError, "21408", None),
        ("+33600000004", PermanentError, "21614", True),
        ("+33600000006", ThrottledError, "30001", None),
        ("+33600000007", TransientError, "20500", None),
        ("+33600000008", PermanentError, "21612", False),
        ("+33600000009", PermanentError, "21635", True),
        ("+33600000010", TechnicalError, "21606", None),
        ("+33600000012", TechnicalError, "29999", None),
    ],
)
def test_documented_errors(
    server: FakeProviderServer, number: str, kind: type[ProviderError], code: str, suppress: bool | None
) -> None:
    error = refused(options(server), sms(to=number))
    assert type(error) is kind
    assert error.code == code
    if suppress is not None:
        assert isinstance(error, PermanentError)
        assert error.suppress is suppress


@pytest.mark.parametrize(
    ("number", "code", "wait"), [("+33600000005", "20429", 7.0), ("+33600000011", "21611", 60.0)]
)
def test_throttling_honours_retry_after(
    server: FakeProviderServer, number: str, code: str, wait: float
) -> None:
    error = refused(options(server), sms(to=number))
    assert type(error) is ThrottledError
    assert error.code == code
    assert error.retry_after_s == wait


def test_a_bare_429_throttles(server: FakeProviderServer) -> None:
    server.script([Reply(429, body=b"", headers={"Retry-After": "3"})])
    error = refused(options(server), sms())
    assert type(error) is ThrottledError
    assert error.retry_after_s == 3.0


def test_a_5xx_html_page_is_transient(server: FakeProviderServer) -> None:
    server.script([Reply(502, body=b"<html>Bad gateway</html>")])
    error = refused(options(server), sms())
    assert type(error) is TransientError
    assert error.code == "502"


def test_a_2xx_without_json_is_still_accepted(server: FakeProviderServer) -> None:
    server.script([Reply(201, body=b"not json")])
    assert send(options(server), sms()) == SendResult(provider_reference=None, parts=1)


# -- options ------------------------------------------------------------------------------------------


def write(tmp_path: Path, account: str) -> Path:
    path = tmp_path / "smartpush.yaml"
    path.write_text("providers:\n  sms:\n    type: twilio\n" + account, encoding="utf-8")
    return path


def test_an_account_loads_from_smartpush_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"    account_sid: {SID}\n"
        "    auth_token: ${TWILIO_AUTH_TOKEN}\n"
        "    sender: ASSURANCE\n"
        "    status_callback: https://hooks.example.org/twilio/status\n"
        "    stop_mention: STOP 36111\n"
        "    rate: 10/s\n",
    )
    config = load_config(path, env={"TWILIO_AUTH_TOKEN": TOKEN})
    account = config.account("sms")
    assert isinstance(account, TwilioOptions)
    assert isinstance(account.auth_token, SecretStr)
    assert account.auth_token.get_secret_value() == TOKEN
    assert account.basic_auth() == (SID, TOKEN)
    assert config.warnings == []
    for text in (repr(account), str(account), str(account.model_dump()), repr(config.accounts)):
        assert TOKEN not in text


def test_api_key_secret_is_masked(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"    account_sid: {SID}\n    api_key_sid: {KEY_SID}\n    api_key_secret: ${{KEY}}\n"
        f"    messaging_service_sid: {SERVICE}\n",
    )
    account = load_config(path, env={"KEY": KEY_SECRET}).account("sms")
    assert isinstance(account, TwilioOptions)
    assert account.basic_auth() == (KEY_SID, KEY_SECRET)
    assert KEY_SECRET not in repr(account)
    assert KEY_SECRET not in str(account.model_dump())


def test_a_literal_token_gets_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, f"    account_sid: {SID}\n    auth_token: plain-secret\n    sender: ASSURANCE\n")
    config = load_config(path, env={})
    assert any("auth_token" in w.message for w in config.warnings)
    assert all("plain-secret" not in str(w) for w in config.warnings)


def test_sender_or_service_is_required(tmp_path: Path) -> None:
    path = write(tmp_path, f"    account_sid: {SID}\n    auth_token: ${{T}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"T": TOKEN})
    assert "sender or a messaging_service_sid" in str(caught.value)
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"account_sid": "AC123"}, "32 hexadecimal"),
        ({"auth_token": None}, "exactly one"),
        ({"api_key_sid": KEY_SID, "api_key_secret": KEY_SECRET}, "exactly one"),
        ({"api_key_sid": KEY_SID}, "both api_key_sid and api_key_secret"),
        ({"messaging_service_sid": "MGxyz"}, "'MG'"),
        ({"status_callback": "https://my_host.example/cb"}, "no underscore"),
        ({"status_callback": "ftp://hooks.example.org"}, "http(s)"),
        ({"sender": "Mairie de Paris"}, "3 to 11"),
    ],
)
def test_invalid_options(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        options(**values)
    assert message in str(caught.value)
    assert TOKEN not in str(caught.value)


# -- receipts -----------------------------------------------------------------------------------------


def callback(status: str, code: str | None = None) -> dict[str, list[str]]:
    """A status callback as parse_qs reads Twilio's form body."""
    fields = {
        "AccountSid": SID,
        "From": "ASSURANCE",
        "To": OK_NUMBER,
        "MessageSid": MESSAGE_SID,
        "SmsSid": MESSAGE_SID,
        "MessageStatus": status,
        "SmsStatus": status,
        "ApiVersion": "2010-04-01",
    }
    if code is not None:
        fields["ErrorCode"] = code
    body = "&".join(f"{k}={v}" for k, v in fields.items()).replace("+", "%2B")
    return parse_qs(body)


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        ("sent", None, "sent"),
        ("delivered", None, "delivered"),
        ("read", None, "delivered"),
        ("partially_delivered", None, "sent"),
        ("canceled", None, "permanent-failure"),
        ("failed", None, "permanent-failure"),
        ("undelivered", "30003", "temporary-failure"),
        ("undelivered", "30005", "permanent-failure"),
        ("undelivered", "30006", "permanent-failure"),
        ("undelivered", "30007", "permanent-failure"),
        ("failed", "30001", "temporary-failure"),
        ("undelivered", "30036", "temporary-failure"),
        ("failed", "30034", "permanent-failure"),
    ],
)
def test_receipts(status: str, code: str | None, expected: str) -> None:
    receipt = parse_receipt(callback(status, code))
    assert receipt is not None
    assert receipt.provider_reference == MESSAGE_SID
    assert receipt.status == expected
    assert receipt.error_code == code


@pytest.mark.parametrize(
    "status", ["queued", "accepted", "scheduled", "sending", "receiving", "received", ""]
)
def test_interim_statuses_give_no_receipt(status: str) -> None:
    assert parse_receipt(callback(status)) is None


def test_receipt_from_plain_strings_and_error_text() -> None:
    fields = {"MessageSid": MESSAGE_SID, "MessageStatus": "undelivered", "ErrorCode": "30003", "Extra": "x"}
    assert parse_receipt(fields) == Receipt(
        MESSAGE_SID, "temporary-failure", "30003", "the handset is unreachable (off or out of coverage)"
    )


def test_receipt_without_sid_is_ignored() -> None:
    assert parse_receipt({"MessageStatus": "delivered"}) is None


def test_error_code_zero_is_no_error() -> None:
    receipt = parse_receipt({"MessageSid": MESSAGE_SID, "MessageStatus": "delivered", "ErrorCode": "0"})
    assert receipt == Receipt(MESSAGE_SID, "delivered", None, None)
