"""The ``fcm`` driver against a loopback server that speaks Google's OAuth token endpoint and FCM HTTP v1."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr, ValidationError
from smartpush.providers.fcm import FcmOptions, FcmProvider

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

PROJECT = "mairie-demo"
CLIENT_EMAIL = "smartpush@mairie-demo.iam.gserviceaccount.com"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
SEND_PATH = f"/v1/projects/{PROJECT}/messages:send"
OK_TOKEN = "fcm-token-ok-" + "x" * 140
MESSAGE_NAME = f"projects/{PROJECT}/messages/0:1700000000000000%abcdef"
TITLE = "Rappel de rendez-vous"
BODY = "Votre rendez-vous en mairie est demain à 9 h."

_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PRIVATE_PEM = _KEY.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
).decode()
PUBLIC_KEY = _KEY.public_key()


def fcm_error(status: int, state: str, message: str, *details: dict[str, Any]) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": state, "details": list(details)}}


def fcm_code(code: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}


def bad_request(field: str, description: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.BadRequest",
        "fieldViolations": [{"field": field, "description": description}],
    }


INVALID_TOKEN_TEXT = "The registration token is not a valid FCM registration token"

#: Device tokens the fake answers with a documented error: token -> (status, body, headers).
SCRIPTED: dict[str, tuple[int, dict[str, Any], dict[str, str]]] = {
    "tok-unregistered": (
        404,
        fcm_error(404, "NOT_FOUND", "Requested entity was not found.", fcm_code("UNREGISTERED")),
        {},
    ),
    "tok-invalid": (
        400,
        fcm_error(
            400,
            "INVALID_ARGUMENT",
            INVALID_TOKEN_TEXT,
            fcm_code("INVALID_ARGUMENT"),
            bad_request("message.token", INVALID_TOKEN_TEXT),
        ),
        {},
    ),
    "tok-invalid-text-only": (
        400,
        fcm_error(400, "INVALID_ARGUMENT", INVALID_TOKEN_TEXT, fcm_code("INVALID_ARGUMENT")),
        {},
    ),
    "tok-payload": (
        400,
        fcm_error(
            400,
            "INVALID_ARGUMENT",
            "Request contains an invalid argument.",
            fcm_code("INVALID_ARGUMENT"),
            bad_request("message.android.ttl", "Invalid value at 'message.android.ttl'"),
        ),
        {},
    ),
    "tok-mismatch": (
        403,
        fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", fcm_code("SENDER_ID_MISMATCH")),
        {},
    ),
    "tok-quota": (
        429,
        fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", fcm_code("QUOTA_EXCEEDED")),
        {"Retry-After": "30"},
    ),
    "tok-quota-bare": (
        429,
        fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", fcm_code("QUOTA_EXCEEDED")),
        {},
    ),
    "tok-unavailable": (
        503,
        fcm_error(503, "UNAVAILABLE", "The service is currently unavailable.", fcm_code("UNAVAILABLE")),
        {"Retry-After": "12"},
    ),
    "tok-internal": (
        500,
        fcm_error(500, "INTERNAL", "Internal error encountered.", fcm_code("INTERNAL")),
        {},
    ),
    "tok-third-party": (
        401,
        fcm_error(
            401,
            "UNAUTHENTICATED",
            "Auth error from APNS or Web Push Service",
            fcm_code("THIRD_PARTY_AUTH_ERROR"),
        ),
        {},
    ),
}

_MESSAGE_KEYS = {"token", "notification", "data", "android", "apns", "webpush", "fcm_options"}


class FakeGoogle:
    """oauth2.googleapis.com/token and fcm.googleapis.com on one loopback server."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.valid: set[str] = set()
        self.issued = 0
        self.expires_in = 3599
        self.token_reply: Reply | None = None
        #: Refuse every access token, even fresh ones.
        self.refuse_bearers = False
        self.claims: list[dict[str, Any]] = []
        self.server = FakeProviderServer(responder=self.respond)

    @property
    def url(self) -> str:
        return self.server.url

    def token_requests(self) -> list[RecordedRequest]:
        return [r for r in self.server.requests if r.path == "/token"]

    def send_requests(self) -> list[RecordedRequest]:
        return [r for r in self.server.requests if r.path != "/token"]

    def respond(self, request: RecordedRequest) -> Reply:
        if request.path == "/token":
            return self.token(request)
        return self.send(request)

    def token(self, request: RecordedRequest) -> Reply:
        if self.token_reply is not None:
            return self.token_reply
        form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return Reply(400, json={"error": "unsupported_grant_type"})
        try:
            claims = jwt.decode(
                form.get("assertion", ""),
                PUBLIC_KEY,
                algorithms=["RS256"],
                audience=f"{self.url}/token",
                options={"require": ["iss", "aud", "iat", "exp"]},
            )
        except jwt.InvalidTokenError:
            return Reply(400, json={"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
        if claims["iss"] != CLIENT_EMAIL or claims["scope"] != SCOPE:
            return Reply(400, json={"error": "invalid_scope", "error_description": "Invalid OAuth scope."})
        if not 0 < claims["exp"] - claims["iat"] <= 3600:
            return Reply(400, json={"error": "invalid_grant", "error_description": "Invalid JWT: exp"})
        with self.lock:
            self.issued += 1
            access = f"ya29.fake-access-{self.issued}"
            self.valid.add(access)
            self.claims.append(claims)
        return Reply(
            200, json={"access_token": access, "expires_in": self.expires_in, "token_type": "Bearer"}
        )

    def send(self, request: RecordedRequest) -> Reply:
        if request.method != "POST" or request.path != SEND_PATH:
            return Reply(404, json=fcm_error(404, "NOT_FOUND", "Requested entity was not found."))
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        with self.lock:
            known = bearer in self.valid and not self.refuse_bearers
        if not known:
            return Reply(
                401,
                json=fcm_error(
                    401, "UNAUTHENTICATED", "Request had invalid authentication credentials. Expected OAuth 2"
                ),
            )
        document = request.json
        message = document.get("message") if isinstance(document, dict) else None
        if not isinstance(message, dict) or set(message) - _MESSAGE_KEYS or set(document) != {"message"}:
            return Reply(
                400,
                json=fcm_error(
                    400,
                    "INVALID_ARGUMENT",
                    "Invalid JSON payload received. Unknown name",
                    bad_request("message", "Invalid JSON payload received. Cannot find field."),
                ),
            )
        data = message.get("data", {})
        if not all(isinstance(v, str) for v in data.values()):
            return Reply(
                400, json=fcm_error(400, "INVALID_ARGUMENT", "bad data", bad_request("message.data", ""))
            )
        token = message.get("token", "")
        if token in SCRIPTED:
            status, body, headers = SCRIPTED[token]
            return Reply(status, json=body, headers=headers)
        return Reply(200, json={"name": MESSAGE_NAME})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def google() -> Iterator[FakeGoogle]:
    fake = FakeGoogle()
    with fake.server:
        yield fake


def service_account(url: str, **values: Any) -> dict[str, Any]:
    document = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "0123456789abcdef",
        "private_key": PRIVATE_PEM,
        "client_email": CLIENT_EMAIL,
        "client_id": "123456789012345678901",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": f"{url}/token",
    }
    document.update(values)
    return {k: v for k, v in document.items() if v is not None}


def options(google: FakeGoogle | None = None, **values: Any) -> FcmOptions:
    url = google.url if google is not None else "http://127.0.0.1:9"
    data: dict[str, Any] = {"type": "fcm", "service_account_json": json.dumps(service_account(url))}
    if google is not None:
        data["base_url"] = google.url
    data.update(values)
    return FcmOptions.model_validate({k: v for k, v in data.items() if v is not None})


def push(to: str = OK_TOKEN, **values: Any) -> OutboundMessage:
    fields: dict[str, Any] = {"title": TITLE, "body": BODY, "data": {"rdv": "42"}}
    fields.update(values)
    return OutboundMessage(message_id="m-1", run_id="r-1", channel=Channel.PUSH, to=to, **fields)


def send(opts: FcmOptions, message: OutboundMessage) -> SendResult:
    async def go() -> SendResult:
        provider = FcmProvider("push", opts)
        try:
            return await provider.send(message)
        finally:
            await provider.close()

    return asyncio.run(go())


def refused(opts: FcmOptions, message: OutboundMessage) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        send(opts, message)
    error = caught.value
    for text in (str(error), error.detail, repr(error.args)):
        for secret in (message.to, TITLE, BODY, "ya29.", "PRIVATE KEY", "invalid FCM registration"):
            assert secret not in text
    return error


# -- the request --------------------------------------------------------------------------------------


def test_registered_by_entry_point() -> None:
    assert registry.driver("fcm") is FcmProvider
    assert FcmProvider.channels == frozenset({Channel.PUSH})


def test_request_shape(google: FakeGoogle) -> None:
    result = send(options(google, collapse_key="rdv"), push())
    assert result == SendResult(provider_reference=MESSAGE_NAME, parts=1)
    (token_request,) = google.token_requests()
    assert token_request.method == "POST"
    assert token_request.headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    form = parse_qs(token_request.body.decode(), strict_parsing=True)
    assert set(form) == {"grant_type", "assertion"}
    (claims,) = google.claims
    assert claims["iss"] == CLIENT_EMAIL
    assert claims["aud"] == f"{google.url}/token"
    assert claims["scope"] == SCOPE
    assert claims["exp"] - claims["iat"] <= 3600
    assert abs(claims["iat"] - time.time()) < 60
    assert jwt.get_unverified_header(form["assertion"][0])["alg"] == "RS256"

    (request,) = google.send_requests()
    assert request.method == "POST"
    assert request.path == SEND_PATH
    assert request.headers["Authorization"] == "Bearer ya29.fake-access-1"
    assert request.headers["Content-Type"].startswith("application/json")
    assert request.json == {
        "message": {
            "token": OK_TOKEN,
            "notification": {"title": TITLE, "body": BODY},
            "data": {"rdv": "42"},
            "android": {"priority": "high", "ttl": "86400s", "collapse_key": "rdv"},
            "apns": {"headers": {"apns-priority": "10", "apns-collapse-id": "rdv"}},
            "webpush": {"headers": {"TTL": "86400", "Urgency": "high"}},
        }
    }


def test_normal_priority_short_ttl_and_no_data(google: FakeGoogle) -> None:
    send(options(google, android_priority="normal", ttl="2h"), push(data={}, title=None))
    message = google.send_requests()[0].json["message"]
    assert message["notification"] == {"body": BODY}
    assert "data" not in message
    assert message["android"] == {"priority": "normal", "ttl": "7200s"}
    assert message["apns"] == {"headers": {"apns-priority": "5"}}
    assert message["webpush"] == {"headers": {"TTL": "7200", "Urgency": "normal"}}


def test_project_id_option_overrides_the_json(google: FakeGoogle) -> None:
    provider = FcmProvider("push", options(google, project_id="other-project"))
    assert provider.url == f"{google.url}/v1/projects/other-project/messages:send"


def test_default_base_url() -> None:
    provider = FcmProvider("push", options())
    assert provider.url == f"https://fcm.googleapis.com/v1/projects/{PROJECT}/messages:send"


# -- the access token ---------------------------------------------------------------------------------


def test_one_token_for_fifty_concurrent_sends(google: FakeGoogle) -> None:
    google.server.delay_s = 0.02  # the token answer takes a while: every send waits on the same fetch

    async def go() -> list[SendResult]:
        provider = FcmProvider("push", options(google, concurrency=50))
        try:
            return await asyncio.gather(*(provider.send(push()) for _ in range(50)))
        finally:
            await provider.close()

    results = asyncio.run(go())
    assert all(r.provider_reference == MESSAGE_NAME for r in results)
    assert len(google.token_requests()) == 1
    assert len(google.send_requests()) == 50
    assert {r.headers["Authorization"] for r in google.send_requests()} == {"Bearer ya29.fake-access-1"}


def test_token_refreshed_five_minutes_before_expiry(google: FakeGoogle) -> None:
    google.expires_in = 3600
    clock = Clock()

    async def go() -> None:
        provider = FcmProvider("push", options(google), clock=clock)
        try:
            await provider.send(push())
            clock.now += 3600 - 300 - 1
            await provider.send(push())
            assert len(google.token_requests()) == 1
            clock.now += 2
            await provider.send(push())
            assert len(google.token_requests()) == 2
            await provider.send(push())
        finally:
            await provider.close()

    asyncio.run(go())
    bearers = [r.headers["Authorization"] for r in google.send_requests()]
    assert bearers == ["Bearer ya29.fake-access-1"] * 2 + ["Bearer ya29.fake-access-2"] * 2


def test_a_401_refreshes_the_token_once(google: FakeGoogle) -> None:
    async def go() -> None:
        provider = FcmProvider("push", options(google))
        try:
            await provider.send(push())
            with google.lock:
                google.valid.clear()  # revoked on Google's side
            assert (await provider.send(push())).provider_reference == MESSAGE_NAME
            await provider.send(push())
        finally:
            await provider.close()

    asyncio.run(go())
    assert len(google.token_requests()) == 2
    bearers = [r.headers["Authorization"].removeprefix("Bearer ") for r in google.send_requests()]
    assert bearers == ["ya29.fake-access-1", "ya29.fake-access-1", "ya29.fake-access-2", "ya29.fake-access-2"]


def test_a_second_401_is_technical_and_not_retried_again(google: FakeGoogle) -> None:
    google.refuse_bearers = True
    error = refused(options(google), push())
    assert type(error) is TechnicalError
    assert len(google.send_requests()) == 2
    assert len(google.token_requests()) == 2


def test_the_token_endpoint_refusing_the_key_is_technical(google: FakeGoogle) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    opts = options(google, service_account_json=json.dumps(service_account(google.url, private_key=pem)))
    error = refused(opts, push())
    assert type(error) is TechnicalError
    assert error.code == "oauth-400"
    assert "invalid_grant" in error.detail
    assert google.send_requests() == []


@pytest.mark.parametrize(
    ("status", "kind"), [(500, TransientError), (503, TransientError), (429, TransientError)]
)
def test_token_endpoint_outages_are_transient(
    google: FakeGoogle, status: int, kind: type[ProviderError]
) -> None:
    google.token_reply = Reply(status, json={"error": "backendError"}, headers={"Retry-After": "5"})
    error = refused(options(google), push())
    assert type(error) is kind
    assert error.code == f"oauth-{status}"
    assert error.retry_after_s == 5.0


def test_a_token_endpoint_timeout_is_transient(google: FakeGoogle) -> None:
    google.server.script([Reply(200, delay_s=0.4)])
    error = refused(options(google, timeout="0.1s"), push())
    assert type(error) is TransientError
    assert error.code == "timeout"


def test_waiters_do_not_repeat_a_failed_token_fetch(google: FakeGoogle) -> None:
    google.token_reply = Reply(503, json={"error": "backendError"})

    async def go() -> list[BaseException | SendResult]:
        provider = FcmProvider("push", options(google))
        try:
            return await asyncio.gather(*(provider.send(push()) for _ in range(10)), return_exceptions=True)
        finally:
            await provider.close()

    results = asyncio.run(go())
    assert all(type(r) is TransientError for r in results)
    assert len(google.token_requests()) == 1


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "kind", "code", "suppress", "wait"),
    [
        ("tok-unregistered", PermanentError, "UNREGISTERED", True, None),
        ("tok-invalid", PermanentError, "INVALID_ARGUMENT", True, None),
        ("tok-invalid-text-only", PermanentError, "INVALID_ARGUMENT", True, None),
        ("tok-payload", TechnicalError, "INVALID_ARGUMENT", None, None),
        ("tok-mismatch", PermanentError, "SENDER_ID_MISMATCH", True, None),
        ("tok-quota", ThrottledError, "QUOTA_EXCEEDED", None, 30.0),
        ("tok-quota-bare", ThrottledError, "QUOTA_EXCEEDED", None, 60.0),
        ("tok-unavailable", TransientError, "UNAVAILABLE", None, 12.0),
        ("tok-internal", TransientError, "INTERNAL", None, None),
        ("tok-third-party", TechnicalError, "THIRD_PARTY_AUTH_ERROR", None, None),
    ],
)
def test_documented_errors(
    google: FakeGoogle,
    token: str,
    kind: type[ProviderError],
    code: str,
    suppress: bool | None,
    wait: float | None,
) -> None:
    error = refused(options(google), push(to=token))
    assert type(error) is kind
    assert error.code == code
    assert error.retry_after_s == wait
    if suppress is not None:
        assert isinstance(error, PermanentError)
        assert error.suppress is suppress
    assert len(google.send_requests()) == 1  # none of these is retried by the driver itself


def test_a_payload_error_names_the_field(google: FakeGoogle) -> None:
    error = refused(options(google), push(to="tok-payload"))
    assert "message.android.ttl" in error.detail


def test_an_unknown_project_is_technical(google: FakeGoogle) -> None:
    error = refused(options(google, project_id="unknown-project"), push())
    assert type(error) is TechnicalError
    assert "project_id" in error.detail


def test_a_5xx_html_page_is_transient(google: FakeGoogle) -> None:
    google.server.script([Reply(200, json={"access_token": "ya29.x", "expires_in": 3600})])
    google.server.script([Reply(502, body=b"<html>Bad gateway</html>")])
    error = refused(options(google), push())
    assert type(error) is TransientError
    assert error.code == "502"


def test_a_200_without_json_is_still_accepted(google: FakeGoogle) -> None:
    google.server.script([Reply(200, json={"access_token": "ya29.y", "expires_in": 3600})])
    google.server.script([Reply(200, body=b"not json")])
    assert send(options(google), push()) == SendResult(provider_reference=None, parts=1)


# -- options and the service account ------------------------------------------------------------------


def write_account(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "secrets" / "firebase.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(document if isinstance(document, str) else json.dumps(document), encoding="utf-8")
    return path


def test_service_account_file_relative_to_the_project(google: FakeGoogle, tmp_path: Path) -> None:
    write_account(tmp_path, service_account(google.url))
    opts = options(google, service_account_json=None, service_account_file="secrets/firebase.json")

    async def go() -> SendResult:
        provider = FcmProvider("push", opts, project_dir=tmp_path)
        try:
            return await provider.send(push())
        finally:
            await provider.close()

    assert asyncio.run(go()).provider_reference == MESSAGE_NAME


def _ec_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read service_account_file"),
        ("{not json", "is not JSON"),
        ({"type": "authorized_user", "client_email": CLIENT_EMAIL}, "not a service account key"),
        ({"type": "service_account", "client_email": CLIENT_EMAIL}, "has no private_key"),
        (
            {
                "type": "service_account",
                "client_email": CLIENT_EMAIL,
                "private_key": "-----BEGIN PRIVATE KEY",
            },
            "not an unencrypted PEM private key",
        ),
        (
            {"type": "service_account", "client_email": CLIENT_EMAIL, "private_key": _ec_pem()},
            "not an RSA key",
        ),
        (
            {"type": "service_account", "client_email": CLIENT_EMAIL, "private_key": PRIVATE_PEM},
            "give project_id",
        ),
    ],
)
def test_an_invalid_service_account_file_is_a_config_error(
    tmp_path: Path, content: Any, message: str
) -> None:
    if content is not None:
        write_account(tmp_path, content)
    opts = options(service_account_json=None, service_account_file="secrets/firebase.json")
    with pytest.raises(ConfigError) as caught:
        FcmProvider("push", opts, project_dir=tmp_path)
    text = str(caught.value)
    assert message in text
    assert "account push" in text
    if message != "give project_id":
        assert "service_account_file" in text
    assert "BEGIN" not in text


def test_an_invalid_service_account_json_names_the_option() -> None:
    with pytest.raises(ConfigError) as caught:
        FcmProvider("push", options(service_account_json='{"type": "service_account"}'))
    assert "service_account_json has no client_email or private_key" in str(caught.value)


def test_secrets_are_not_in_repr(google: FakeGoogle) -> None:
    opts = options(google)
    provider = FcmProvider("push", opts)
    for text in (repr(opts), str(opts), str(opts.model_dump()), repr(provider.service_account)):
        assert "PRIVATE KEY" not in text
        assert PRIVATE_PEM[40:80] not in text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"service_account_json": None}, "exactly one"),
        ({"service_account_file": "sa.json"}, "exactly one"),
        ({"android_priority": "urgent"}, "android_priority"),
        ({"ttl": "5w"}, "between 0 and 4 weeks"),
        ({"project_id": "Not A Project"}, "Firebase project ID"),
        ({"base_url": "fcm.googleapis.com"}, "https://"),
    ],
)
def test_invalid_options(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        options(**values)
    assert message in str(caught.value)
    assert "PRIVATE KEY" not in str(caught.value)


def test_accounts_load_from_smartpush_yaml(google: FakeGoogle, tmp_path: Path) -> None:
    write_account(tmp_path, service_account(google.url))
    path = tmp_path / "smartpush.yaml"
    path.write_text(
        "providers:\n"
        "  push:\n"
        "    type: fcm\n"
        "    service_account_file: secrets/firebase.json\n"
        f"    base_url: {google.url}\n"
        "    android_priority: normal\n"
        "    ttl: 4h\n"
        "    collapse_key: rdv\n"
        "    rate: 500/s\n"
        "  push2:\n"
        "    type: fcm\n"
        "    service_account_json: ${FCM_SERVICE_ACCOUNT}\n"
        "    project_id: other-project\n",
        encoding="utf-8",
    )
    secret = json.dumps(service_account(google.url))
    config = load_config(path, env={"FCM_SERVICE_ACCOUNT": secret})
    assert config.warnings == []
    first, second = config.account("push"), config.account("push2")
    assert isinstance(first, FcmOptions)
    assert isinstance(second, FcmOptions)
    assert first.ttl.total_seconds() == 4 * 3600
    assert isinstance(second.service_account_json, SecretStr)
    assert second.service_account_json.get_secret_value() == secret
    for text in (repr(second), str(second.model_dump()), repr(config.accounts)):
        assert "PRIVATE KEY" not in text

    async def go() -> SendResult:
        provider = registry.driver(first.type)("push", first, project_dir=config.project_dir)
        try:
            return await provider.send(push())
        finally:
            await provider.close()

    assert asyncio.run(go()).provider_reference == MESSAGE_NAME
    assert google.send_requests()[0].json["message"]["android"] == {
        "priority": "normal",
        "ttl": "14400s",
        "collapse_key": "rdv",
    }
    provider = registry.driver(second.type)("push2", second, project_dir=config.project_dir)
    assert isinstance(provider, FcmProvider)
    assert provider.project_id == "other-project"
