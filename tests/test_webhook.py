"""The ``webhook`` driver: its options in smartpush.yaml, the JSON it sends, how it reads answers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from smartpush.providers.webhook import WebhookOptions, WebhookProvider

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
from smartpush.testing import FakeProviderServer, Reply

TOKEN = "Bearer tok-3f9a-very-secret"


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as fake:
        yield fake


def options(**values: Any) -> WebhookOptions:
    values.setdefault("base_url", "http://127.0.0.1:9")
    return WebhookOptions.model_validate({"type": "webhook", **values})


def sms(n: int = 1, **values: Any) -> OutboundMessage:
    return OutboundMessage(
        **{"message_id": f"m-{n}", "run_id": "r-1", "channel": Channel.SMS, "to": "+33612345678"}
        | {"body": "Votre rendez-vous est confirmé.", **values}
    )


def email() -> OutboundMessage:
    return OutboundMessage(
        message_id="m-e",
        run_id="r-1",
        channel=Channel.EMAIL,
        to="jeanne@example.org",
        body="Bonjour",
        subject="Rendez-vous",
        html="<p>Bonjour</p>",
        sender="ameli@example.org",
        headers={"List-Unsubscribe": "<https://x.example/u>"},
    )


def push() -> OutboundMessage:
    return OutboundMessage(
        message_id="m-p",
        run_id="r-1",
        channel=Channel.PUSH,
        to="device-token",
        body="Vaccination",
        title="Grippe",
        data={"screen": "rdv"},
    )


def provider(server: FakeProviderServer, **values: Any) -> WebhookProvider:
    return WebhookProvider("aggregator", options(base_url=server.url, **values))


def send(server: FakeProviderServer, message: OutboundMessage | None = None, **values: Any) -> SendResult:
    driver = provider(server, **values)

    async def main() -> SendResult:
        try:
            result: SendResult = await driver.send(message or sms())
            return result
        finally:
            await driver.close()

    return asyncio.run(main())


def refused(server: FakeProviderServer, reply: Reply, **values: Any) -> ProviderError:
    server.script([reply])
    with pytest.raises(ProviderError) as caught:
        send(server, **values)
    return caught.value


# -- options ------------------------------------------------------------------------------------------


def write(tmp_path: Path, account: str) -> Path:
    path = tmp_path / "smartpush.yaml"
    path.write_text("providers:\n  aggregator:\n    type: webhook\n" + account, encoding="utf-8")
    return path


def test_registered_by_entry_point() -> None:
    assert registry.driver("webhook") is WebhookProvider
    assert WebhookProvider.channels == frozenset(Channel)


def test_an_account_loads_from_smartpush_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "    base_url: https://api.aggregator.example\n"
        "    path: /v2/messages\n"
        "    auth_token: ${AGG_TOKEN}\n"
        "    timeout: 5s\n"
        "    concurrency: 64\n"
        "    fields: {to: msisdn, html: ''}\n",
    )
    config = load_config(path, env={"AGG_TOKEN": TOKEN})
    account = config.account("aggregator")
    assert isinstance(account, WebhookOptions)
    assert isinstance(account.auth_token, SecretStr)
    assert account.auth_token.get_secret_value() == TOKEN
    assert account.timeout.total_seconds() == 5
    assert account.fields == {"to": "msisdn", "html": ""}
    assert config.warnings == []
    for text in (repr(account), str(account), str(account.model_dump()), repr(config.accounts)):
        assert "tok-3f9a" not in text


def test_a_literal_token_gets_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, "    base_url: https://api.aggregator.example\n    auth_token: plain-secret\n")
    config = load_config(path, env={})
    assert any("auth_token" in w.message for w in config.warnings)
    assert all("plain-secret" not in str(w) for w in config.warnings)


def test_unknown_option_is_rejected_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "    base_url: https://api.aggregator.example\n    auth_tokn: ${AGG_TOKEN}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={"AGG_TOKEN": TOKEN})
    (problem,) = caught.value.problems
    assert problem.field == "providers.aggregator.auth_tokn"
    assert problem.line == 5
    assert "did you mean 'auth_token'" in problem.message
    assert "tok-3f9a" not in str(caught.value)


def test_base_url_is_required(tmp_path: Path) -> None:
    path = write(tmp_path, "    path: /v1/sms\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert "the required field 'base_url' is missing" in str(caught.value)


def test_unknown_field_name_is_rejected_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "    base_url: https://api.aggregator.example\n    fields: {boddy: text}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert "unknown field 'boddy' (did you mean 'body'?)" in str(caught.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"base_url": "api.example.org"}, "https://"),
        ({"path": "v1/sms"}, "must start with '/'"),
        ({"method": "GET"}, "POST"),
        ({"auth_header": "X Token"}, "not a header name"),
        ({"headers": {"X-A": "1\r\nX-B: 2"}}, "one line"),
        ({"fields": {"to": "body"}}, "two fields"),
        ({"fields": {"body": "to.text"}}, "two fields"),
        ({"fields": {"to": "a..b"}}, "dotted path"),
        ({"auth_token": "x", "headers": {"authorization": "y"}}, "keep auth_token"),
        ({"concurrency": 0}, "greater than 0"),
    ],
)
def test_invalid_options(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        options(**values)


def test_the_constructor_is_cheap_and_needs_no_loop() -> None:
    driver = WebhookProvider("aggregator", options(auth_token=TOKEN))
    assert driver._transport is None
    assert driver.url == "http://127.0.0.1:9/"
    assert "tok-3f9a" not in repr(driver.options)


# -- the JSON sent ------------------------------------------------------------------------------------


def test_default_payloads_per_channel() -> None:
    driver = WebhookProvider("aggregator", options(sender="AMELI"))
    assert driver.payload(sms()) == {
        "to": "+33612345678",
        "body": "Votre rendez-vous est confirmé.",
        "from": "AMELI",  # the account's sender when the message has none
        "id": "m-1",
        "channel": "sms",
    }
    assert driver.payload(email()) == {
        "to": "jeanne@example.org",
        "body": "Bonjour",
        "subject": "Rendez-vous",
        "html": "<p>Bonjour</p>",
        "from": "ameli@example.org",
        "id": "m-e",
        "channel": "email",
    }
    assert driver.payload(push()) == {
        "to": "device-token",
        "body": "Vaccination",
        "title": "Grippe",
        "data": {"screen": "rdv"},
        "from": "AMELI",
        "id": "m-p",
        "channel": "push",
    }


def test_renamed_nested_and_dropped_fields() -> None:
    driver = WebhookProvider(
        "aggregator",
        options(
            fields={
                "to": "recipient.msisdn",
                "body": "message.text",
                "sender": "message.originator",
                "message_id": "client_ref",
                "channel": "",
                "headers": "headers",
                "run_id": "campaign",
            }
        ),
    )
    assert driver.payload(sms(sender="AMELI")) == {
        "recipient": {"msisdn": "+33612345678"},
        "message": {"text": "Votre rendez-vous est confirmé.", "originator": "AMELI"},
        "client_ref": "m-1",
        "campaign": "r-1",
    }
    assert driver.payload(email())["headers"] == {"List-Unsubscribe": "<https://x.example/u>"}


def test_an_empty_body_is_still_sent() -> None:
    driver = WebhookProvider("aggregator", options())
    assert driver.payload(sms(body=""))["body"] == ""


def test_request_shape_headers_and_idempotency_key(server: FakeProviderServer) -> None:
    result = send(
        server,
        sms(7),
        path="/v1/messages",
        method="PUT",
        auth_token=TOKEN,
        headers={"X-Tenant": "cpam-75"},
    )
    assert result.parts == 1
    (seen,) = server.requests
    assert (seen.method, seen.path) == ("PUT", "/v1/messages")
    assert seen.headers["Idempotency-Key"] == "m-7"
    assert seen.headers["Authorization"] == TOKEN
    assert seen.headers["X-Tenant"] == "cpam-75"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.json == {
        "to": "+33612345678",
        "body": "Votre rendez-vous est confirmé.",
        "id": "m-7",
        "channel": "sms",
    }


def test_custom_auth_header(server: FakeProviderServer) -> None:
    send(server, auth_header="X-Api-Key", auth_token="k-123")
    (seen,) = server.requests
    assert seen.headers["X-Api-Key"] == "k-123"
    assert "Authorization" not in seen.headers


def test_base_url_with_a_trailing_slash(server: FakeProviderServer) -> None:
    driver = WebhookProvider("aggregator", options(base_url=server.url + "/api/", path="/sms"))
    assert driver.url == server.url + "/api/sms"


# -- reading answers ----------------------------------------------------------------------------------


def test_reference_from_the_default_answer(server: FakeProviderServer) -> None:
    result = send(server)
    assert result.provider_reference is not None
    assert len(result.provider_reference) == 36  # the fake's uuid


@pytest.mark.parametrize(
    ("reply", "field", "expected"),
    [
        (Reply(json={"data": {"message_id": "abc-1"}}), "data.message_id", "abc-1"),
        (Reply(json={"messages": [{"id": 42}]}), "messages.0.id", "42"),
        (Reply(json={"data": {}}), "data.message_id", None),
        (Reply(json={"id": {"nested": 1}}), "id", None),
        (Reply(json={"id": True}), "id", None),
        (Reply(json=["x"]), "id", None),
        (Reply(202, body=b"accepted"), "id", None),  # not JSON: accepted all the same
        (Reply(204, body=b""), "id", None),
        (Reply(json={"id": "x"}), "", None),
    ],
)
def test_reference_extraction(
    server: FakeProviderServer, reply: Reply, field: str, expected: str | None
) -> None:
    server.script([reply])
    assert send(server, reference_field=field).provider_reference == expected


def test_429_with_retry_after_throttles(server: FakeProviderServer) -> None:
    error = refused(server, Reply(429, headers={"Retry-After": "7"}))
    assert isinstance(error, ThrottledError)
    assert error.retry_after_s == 7.0


def test_429_without_retry_after_throttles(server: FakeProviderServer) -> None:
    error = refused(server, Reply(429))
    assert isinstance(error, ThrottledError)
    assert error.retry_after_s is None
    assert error.code == "429"


def test_503_honours_retry_after(server: FakeProviderServer) -> None:
    error = refused(server, Reply(503, headers={"Retry-After": "30"}))
    assert isinstance(error, TransientError)
    assert error.retry_after_s == 30.0


def test_500_is_transient(server: FakeProviderServer) -> None:
    error = refused(server, Reply(500))
    assert isinstance(error, TransientError)
    assert error.code == "500"


def test_400_with_an_error_code_is_permanent(server: FakeProviderServer) -> None:
    error = refused(server, Reply(400, json={"error": {"code": "INVALID_NUMBER", "message": "bad"}}))
    assert isinstance(error, PermanentError)
    assert error.code == "INVALID_NUMBER"
    assert error.suppress is False
    assert "+33612345678" not in str(error)


def test_error_field_elsewhere(server: FakeProviderServer) -> None:
    error = refused(server, Reply(422, json={"errors": [{"code": 1021}]}), error_field="errors.0.code")
    assert isinstance(error, PermanentError)
    assert error.code == "1021"


def test_permanent_status_without_a_readable_code(server: FakeProviderServer) -> None:
    error = refused(server, Reply(400, body=b"<html>Bad Request</html>"))
    assert isinstance(error, PermanentError)
    assert error.code == "400"


def test_unregistered_code_suppresses_the_address(server: FakeProviderServer) -> None:
    reply = Reply(404, json={"error": {"code": "UNKNOWN_SUBSCRIBER"}})
    error = refused(server, reply, unregistered_codes=["UNKNOWN_SUBSCRIBER"])
    assert isinstance(error, PermanentError)
    assert error.suppress is True
    assert error.code == "UNKNOWN_SUBSCRIBER"


def test_a_permanent_code_wins_over_a_transient_status(server: FakeProviderServer) -> None:
    reply = Reply(500, json={"error": {"code": "BLACKLISTED"}})
    error = refused(server, reply, permanent_codes=["BLACKLISTED"])
    assert isinstance(error, PermanentError)
    assert error.code == "BLACKLISTED"


def test_permanent_statuses_override_the_default_policy(server: FakeProviderServer) -> None:
    assert isinstance(refused(server, Reply(400), permanent_statuses=[]), TechnicalError)
    assert isinstance(refused(server, Reply(409), permanent_statuses=[409]), PermanentError)


def test_401_is_technical_and_never_shows_the_token(server: FakeProviderServer) -> None:
    error = refused(server, Reply(401, json={"error": {"code": "AUTH"}}), auth_token=TOKEN)
    assert isinstance(error, TechnicalError)
    assert error.code == "AUTH"
    assert "credentials" in error.detail
    assert "tok-3f9a" not in str(error)


def test_timeout_is_transient(server: FakeProviderServer) -> None:
    server.delay_s = 1.0
    with pytest.raises(TransientError) as caught:
        send(server, timeout="100ms")
    assert caught.value.code == "timeout"


def test_reset_is_transient(server: FakeProviderServer) -> None:
    assert isinstance(refused(server, Reply(reset=True)), TransientError)


def test_retries_after_failures_reach_the_provider_with_the_same_key(server: FakeProviderServer) -> None:
    server.script([Reply(500)] * 3)
    driver = provider(server)

    async def main() -> SendResult:
        try:
            for _ in range(3):
                with pytest.raises(TransientError):
                    await driver.send(sms(3))
            return await driver.send(sms(3))
        finally:
            await driver.close()

    assert asyncio.run(main()).provider_reference is not None
    assert server.requests_per_key()["m-3"] == 4
    assert server.accepted_per_key()["m-3"] == 1


# -- concurrency --------------------------------------------------------------------------------------


def test_200_concurrent_sends_arrive_once_each(server: FakeProviderServer) -> None:
    server.delay_s = 0.005
    driver = provider(server, concurrency=16)

    async def main() -> list[SendResult]:
        try:
            return await asyncio.gather(*(driver.send(sms(n)) for n in range(200)))
        finally:
            await driver.close()

    results = asyncio.run(main())
    assert len({r.provider_reference for r in results}) == 200
    per_key = server.requests_per_key()
    assert set(per_key) == {f"m-{n}" for n in range(200)}
    assert set(per_key.values()) == {1}
    assert server.connections <= 16


def test_one_provider_across_successive_loops(server: FakeProviderServer) -> None:
    """The instance lives as long as the worker; a loop may come and go around it."""
    driver = provider(server)
    for n in range(3):
        asyncio.run(driver.send(sms(n)))
    asyncio.run(driver.close())
    assert len(server.requests) == 3
