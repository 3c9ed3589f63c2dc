"""The ``ovh`` driver against a loopback server that speaks the OVHcloud SMS API."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from smartpush.providers.ovh import OvhOptions, OvhProvider, parse_receipt, signature
from smartpush.providers.twilio import Receipt

from smartpush import registry
from smartpush.config import load_config
from smartpush.errors import PermanentError, ProviderError, TechnicalError, ThrottledError, TransientError
from smartpush.provider import Channel, OutboundMessage, SendResult
from smartpush.testing import FakeProviderServer, RecordedRequest, Reply

APP_KEY = "7kbG7Bk7S9Nt7ZSV"
APP_SECRET = "as-4f1e-very-secret"
CONSUMER = "ck-MtSwSrPpNjqfVSmJhLbPyr2i45lSwPU1"
SERVICE = "sms-ab12345-1"
NOW = 1_700_000_000
JOB_ID = 263_425_461
OK_NUMBER = "+33612345678"
INVALID_NUMBER = "+33600000001"

#: Numbers the fake refuses: number -> (HTTP status, OVH error document or None for an empty body).
SCRIPTED: dict[str, tuple[int, dict[str, str] | None, dict[str, str]]] = {
    "+33600000002": (400, {"message": "Invalid receiver: +33600000002"}, {}),
    "+33600000003": (400, {"message": "Invalid parameter 'validityPeriod'"}, {}),
    "+33600000004": (
        403,
        {
            "errorCode": "NOT_GRANTED_CALL",
            "httpCode": "403 Forbidden",
            "message": "This call has not been granted",
        },
        {},
    ),
    "+33600000005": (429, {"message": "Too many requests"}, {"Retry-After": "12"}),
    "+33600000006": (500, {"message": "Internal server error"}, {}),
    "+33600000007": (503, None, {"Retry-After": "30"}),
}


def ovh_error(status: int, code: str, message: str) -> Reply:
    return Reply(status, json={"errorCode": code, "httpCode": f"{status}", "message": message})


def responder(request: RecordedRequest) -> Reply:
    """What eu.api.ovh.com answers, for the credentials and numbers of these tests."""
    if request.method != "POST" or request.path != f"/1.0/sms/{SERVICE}/jobs":
        return ovh_error(404, "", f"The requested object (serviceName = {SERVICE}) does not exist")
    if request.headers.get("X-Ovh-Application") != APP_KEY:
        return ovh_error(403, "INVALID_KEY", "This application key is invalid")
    if request.headers.get("X-Ovh-Consumer") != CONSUMER:
        return ovh_error(403, "INVALID_CREDENTIAL", "This credential is not valid")
    url = f"http://{request.headers['Host']}{request.path}"
    expected = signature(
        APP_SECRET, CONSUMER, "POST", url, request.body.decode(), int(request.headers["X-Ovh-Timestamp"])
    )
    if request.headers.get("X-Ovh-Signature") != expected:
        return ovh_error(400, "INVALID_SIGNATURE", "Invalid signature")
    job = json.loads(request.body)
    (receiver,) = job["receivers"]
    if receiver in SCRIPTED:
        status, document, headers = SCRIPTED[receiver]
        if document is None:
            return Reply(status, body=b"", headers=headers)
        return Reply(status, json=document, headers=headers)
    if receiver == INVALID_NUMBER:
        return Reply(
            200,
            json={"totalCreditsRemoved": 0, "invalidReceivers": [receiver], "ids": [], "validReceivers": []},
        )
    return Reply(
        200,
        json={
            "totalCreditsRemoved": 1,
            "invalidReceivers": [],
            "ids": [JOB_ID],
            "validReceivers": [receiver],
        },
    )


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(responder=responder) as fake:
        yield fake


def options(server: FakeProviderServer | None = None, **values: Any) -> OvhOptions:
    data: dict[str, Any] = {
        "type": "ovh",
        "application_key": APP_KEY,
        "application_secret": APP_SECRET,
        "consumer_key": CONSUMER,
        "service_name": SERVICE,
        "sender": "ASSURANCE",
    }
    if server is not None:
        data["base_url"] = server.url + "/1.0"
    data.update(values)
    return OvhOptions.model_validate({k: v for k, v in data.items() if v is not None})


def sms(to: str = OK_NUMBER, body: str = "Votre rendez-vous est confirme.", **values: Any) -> OutboundMessage:
    return OutboundMessage(message_id="m-1", run_id="r-1", channel=Channel.SMS, to=to, body=body, **values)


def send(opts: OvhOptions, message: OutboundMessage) -> SendResult:
    async def go() -> SendResult:
        provider = OvhProvider("ovh", opts, clock=lambda: NOW + 0.7)
        try:
            return await provider.send(message)
        finally:
            await provider.close()

    return asyncio.run(go())


def refused(opts: OvhOptions, message: OutboundMessage) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        send(opts, message)
    error = caught.value
    for text in (str(error), error.detail, repr(error.args)):
        assert message.to not in text
        assert message.to.removeprefix("+") not in text
        assert message.body not in text
        assert APP_SECRET not in text
        assert CONSUMER not in text
    return error


# -- the signature ------------------------------------------------------------------------------------


def test_signature_matches_a_vector_computed_by_hand() -> None:
    # printf '%s' 'EXEMPLESECRET+EXEMPLECONSUMER+POST+https://eu.api.ovh.com/1.0/sms/sms-ab12345-1/jobs+
    #   {"message":"Bonjour"}+1366560945' | sha1sum
    url = "https://eu.api.ovh.com/1.0/sms/sms-ab12345-1/jobs"
    assert (
        signature("EXEMPLESECRET", "EXEMPLECONSUMER", "post", url, '{"message":"Bonjour"}', 1366560945)
        == "$1$d643c77d068ad5af293531f1c96b11ef17608a9d"
    )
    # A GET has an empty body between its '+' separators.
    assert (
        signature(
            "EXEMPLESECRET", "EXEMPLECONSUMER", "GET", "https://eu.api.ovh.com/1.0/auth/time", "", 1366560945
        )
        == "$1$a6b093115474e372b7c289f0e9538f991769536b"
    )


def test_the_signature_covers_the_bytes_sent(server: FakeProviderServer) -> None:
    send(options(server), sms(body="Rendez-vous confirmé à 9h — merci"))
    (request,) = server.requests
    material = f"{APP_SECRET}+{CONSUMER}+POST+{server.url}/1.0/sms/{SERVICE}/jobs+".encode()
    material += request.body + f"+{NOW}".encode()
    assert request.headers["X-Ovh-Signature"] == "$1$" + hashlib.sha1(material).hexdigest()


# -- the request --------------------------------------------------------------------------------------


def test_registered_by_entry_point() -> None:
    assert registry.driver("ovh") is OvhProvider
    assert OvhProvider.channels == frozenset({Channel.SMS})


def test_request_shape(server: FakeProviderServer) -> None:
    assert send(options(server), sms()) == SendResult(provider_reference=str(JOB_ID), parts=1)
    (request,) = server.requests
    assert request.method == "POST"
    assert request.path == f"/1.0/sms/{SERVICE}/jobs"
    assert request.headers["Content-Type"].startswith("application/json")
    assert request.headers["X-Ovh-Application"] == APP_KEY
    assert request.headers["X-Ovh-Consumer"] == CONSUMER
    assert request.headers["X-Ovh-Timestamp"] == str(NOW)
    assert request.headers["X-Ovh-Signature"].startswith("$1$")
    assert "Authorization" not in request.headers
    assert APP_SECRET.encode() not in request.body
    assert json.loads(request.body) == {
        "receivers": [OK_NUMBER],
        "message": "Votre rendez-vous est confirme.",
        "charset": "UTF-8",
        "coding": "7bits",
        "noStopClause": True,
        "priority": "high",
        "validityPeriod": 2880,
        "sender": "ASSURANCE",
    }


def test_marketing_accounts_keep_the_stop_clause(server: FakeProviderServer) -> None:
    send(options(server, no_stop_clause=False, priority="low", validity_period=60), sms())
    job = json.loads(server.requests[0].body)
    assert job["noStopClause"] is False
    assert job["priority"] == "low"
    assert job["validityPeriod"] == 60


def test_unicode_text_and_long_bodies(server: FakeProviderServer) -> None:
    assert send(options(server), sms(body="Accès 👍")).parts == 1
    assert json.loads(server.requests[0].body)["coding"] == "8bits"
    assert send(options(server), sms(body="x" * 200)).parts == 2


def test_message_sender_overrides_the_account_and_no_sender_asks_for_a_short_number(
    server: FakeProviderServer,
) -> None:
    send(options(server), sms(sender="MAIRIE"))
    send(options(server, sender=None), sms())
    first, second = (json.loads(r.body) for r in server.requests)
    assert first["sender"] == "MAIRIE"
    assert "sender" not in second
    assert second["senderForResponse"] is True


def test_the_engine_stop_mention_is_not_appended_again(server: FakeProviderServer) -> None:
    body = "Offre de prevention. STOP 36111"
    send(options(server, stop_mention="STOP 36111", no_stop_clause=False), sms(body=body))
    assert json.loads(server.requests[0].body)["message"] == body


def test_default_base_url() -> None:
    assert OvhProvider("ovh", options()).url == f"https://eu.api.ovh.com/1.0/sms/{SERVICE}/jobs"


# -- errors -------------------------------------------------------------------------------------------


def test_an_invalid_receiver_is_suppressed(server: FakeProviderServer) -> None:
    error = refused(options(server), sms(to=INVALID_NUMBER))
    assert type(error) is PermanentError
    assert error.suppress is True
    assert error.code == "invalid-receiver"


@pytest.mark.parametrize(
    ("values", "code"),
    [
        ({"application_key": "WRONGKEY"}, "INVALID_KEY"),
        ({"consumer_key": "wrong-consumer"}, "INVALID_CREDENTIAL"),
        ({"application_secret": "wrong-secret"}, "INVALID_SIGNATURE"),
    ],
)
def test_credential_errors_are_technical(
    server: FakeProviderServer, values: dict[str, str], code: str
) -> None:
    error = refused(options(server, **values), sms())
    assert type(error) is TechnicalError
    assert error.code == code
    assert "wrong" not in str(error)


def test_an_unknown_service_is_technical_not_the_recipient(server: FakeProviderServer) -> None:
    error = refused(options(server, service_name="sms-zz99999-1"), sms())
    assert type(error) is TechnicalError
    assert "service_name" in str(error)


@pytest.mark.parametrize(
    ("number", "kind", "code", "wait"),
    [
        ("+33600000002", PermanentError, "invalid-receiver", None),
        ("+33600000003", TechnicalError, "400", None),
        ("+33600000004", TechnicalError, "NOT_GRANTED_CALL", None),
        ("+33600000005", ThrottledError, "429", 12.0),
        ("+33600000006", TransientError, "500", None),
        ("+33600000007", TransientError, "503", 30.0),
    ],
)
def test_http_errors(
    server: FakeProviderServer, number: str, kind: type[ProviderError], code: str, wait: float | None
) -> None:
    error = refused(options(server), sms(to=number))
    assert type(error) is kind
    assert error.code == code
    if isinstance(error, PermanentError):
        assert error.suppress is True
    if isinstance(error, ThrottledError | TransientError):
        assert error.retry_after_s == wait


def test_a_5xx_html_page_is_transient(server: FakeProviderServer) -> None:
    server.script([Reply(502, body=b"<html>Bad gateway</html>")])
    error = refused(options(server), sms())
    assert type(error) is TransientError
    assert error.code == "502"


def test_a_2xx_without_ids_is_technical(server: FakeProviderServer) -> None:
    server.script([Reply(200, json={"ids": [], "invalidReceivers": [], "validReceivers": []})])
    assert type(refused(options(server), sms())) is TechnicalError


# -- options ------------------------------------------------------------------------------------------


def write(tmp_path: Path, account: str) -> Path:
    path = tmp_path / "smartpush.yaml"
    path.write_text("providers:\n  sms:\n    type: ovh\n" + account, encoding="utf-8")
    return path


def test_an_account_loads_from_smartpush_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"    application_key: {APP_KEY}\n"
        "    application_secret: ${OVH_APPLICATION_SECRET}\n"
        "    consumer_key: ${OVH_CONSUMER_KEY}\n"
        f"    service_name: {SERVICE}\n"
        "    sender: ASSURANCE\n"
        "    no_stop_clause: false\n"
        "    rate: 10/s\n",
    )
    config = load_config(path, env={"OVH_APPLICATION_SECRET": APP_SECRET, "OVH_CONSUMER_KEY": CONSUMER})
    account = config.account("sms")
    assert isinstance(account, OvhOptions)
    assert isinstance(account.application_secret, SecretStr)
    assert account.application_secret.get_secret_value() == APP_SECRET
    assert account.consumer_key.get_secret_value() == CONSUMER
    assert account.no_stop_clause is False
    assert config.warnings == []
    for text in (repr(account), str(account), str(account.model_dump()), repr(config.accounts)):
        assert APP_SECRET not in text
        assert CONSUMER not in text


def test_a_literal_secret_gets_a_warning(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"    application_key: {APP_KEY}\n    application_secret: plain-secret\n"
        f"    consumer_key: ${{CK}}\n    service_name: {SERVICE}\n",
    )
    config = load_config(path, env={"CK": CONSUMER})
    assert any("application_secret" in w.message for w in config.warnings)
    assert all("plain-secret" not in str(w) for w in config.warnings)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"service_name": "sms/../me"}, "sms-ab12345-1"),
        ({"application_key": "has space"}, "application_key"),
        ({"priority": "urgent"}, "priority"),
        ({"validity_period": 0}, "greater than 0"),
        ({"sender": "Mairie de Paris"}, "3 to 11"),
        ({"consumer_key": None}, "consumer_key"),
    ],
)
def test_invalid_options(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        options(**values)
    assert message in str(caught.value)
    assert APP_SECRET not in str(caught.value)


# -- receipts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dlr", "ptt", "expected"),
    [
        ("1", "4", Receipt(str(JOB_ID), "delivered")),
        ("8", "3", Receipt(str(JOB_ID), "sent")),
        ("2", "5", Receipt(str(JOB_ID), "permanent-failure", "5", "OVH DLR 2, ptt 5")),
        ("16", None, Receipt(str(JOB_ID), "permanent-failure", None, "OVH DLR 16")),
        ("2", "1", Receipt(str(JOB_ID), "temporary-failure", "1", "OVH DLR 2, ptt 1")),
    ],
)
def test_receipts(dlr: str, ptt: str | None, expected: Receipt) -> None:
    query = {"id": [str(JOB_ID)], "dlr": [dlr], "receiver": [OK_NUMBER], "date": ["2026-11-26 18:00:00"]}
    if ptt is not None:
        query["ptt"] = [ptt]
    receipt = parse_receipt(query)
    assert receipt == expected
    assert OK_NUMBER not in repr(receipt)


@pytest.mark.parametrize("fields", [{"id": "1", "dlr": "4"}, {"id": "1", "dlr": "99"}, {"dlr": "1"}, {}])
def test_no_receipt(fields: dict[str, str]) -> None:
    assert parse_receipt(fields) is None


def test_receipt_from_json_integers() -> None:
    assert parse_receipt({"id": JOB_ID, "dlr": 1}) == Receipt(str(JOB_ID), "delivered")
