"""The ``webpush`` driver against a loopback push service that decrypts what it receives like a browser."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import http_ece
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr, ValidationError
from smartpush.providers import webpush
from smartpush.providers.webpush import JWT_LIFETIME, WebPushOptions, WebPushProvider

from smartpush import registry
from smartpush.addresses import normalise_push_token
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

SUBJECT = "mailto:webmestre@mairie.example"
LOCATION = "https://push.example/m/0:1234"
STAND_IN = "push.stand-in.example"

#: Endpoint paths the fake push service answers with an error: path -> (status, headers).
SCRIPTED: dict[str, tuple[int, dict[str, str]]] = {
    "gone-404": (404, {}),
    "gone-410": (410, {}),
    "too-large": (413, {}),
    "throttled": (429, {"Retry-After": "30"}),
    "bad-request": (400, {}),
    "bad-jwt": (401, {}),
    "wrong-key": (403, {}),
    "down": (503, {"Retry-After": "5"}),
    "broken": (500, {}),
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


@dataclass
class Browser:
    """One browser's subscription: its own ECDH key pair and auth secret, as PushManager makes them."""

    endpoint: str
    key: ec.EllipticCurvePrivateKey
    auth: bytes

    @classmethod
    def at(cls, endpoint: str) -> Browser:
        return cls(endpoint, ec.generate_private_key(ec.SECP256R1()), os.urandom(16))

    @property
    def subscription(self) -> str:
        # normalise_push_token accepts only https: normalise under a stand-in origin, then put the
        # loopback test server's http:// origin back, keeping the compact sorted form it returns
        scheme, _, rest = self.endpoint.partition("://")
        origin, _, path = rest.partition("/")
        raw = json.dumps(
            {
                "endpoint": f"https://{STAND_IN}/{path}",
                "expirationTime": None,
                "keys": {"p256dh": b64url(public_point(self.key)), "auth": b64url(self.auth)},
            }
        )
        return normalise_push_token(raw).replace(f"https://{STAND_IN}/", f"{scheme}://{origin}/")

    def decrypt(self, request: RecordedRequest) -> Any:
        plain = http_ece.decrypt(
            request.body, private_key=self.key, auth_secret=self.auth, version="aes128gcm"
        )
        return json.loads(plain)


def vapid_claims(request: RecordedRequest) -> tuple[dict[str, Any], str, str]:
    """(verified claims, token, k) of the request's ``Authorization: vapid t=..., k=...``."""
    scheme, _, params = request.headers["Authorization"].partition(" ")
    assert scheme == "vapid"
    parts = dict(p.strip().split("=", 1) for p in params.split(","))
    token, k = parts["t"], parts["k"]
    point = b64url_decode(k)
    assert len(point) == 65 and point[0] == 4
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    origin = "http://" + request.headers["Host"]
    claims = jwt.decode(
        token, public, algorithms=["ES256"], audience=origin, options={"require": ["aud", "exp", "sub"]}
    )
    assert jwt.get_unverified_header(token)["typ"] == "JWT"
    return claims, token, k


def responder(request: RecordedRequest) -> Reply:
    name = request.path.rsplit("/", 1)[-1]
    if name in SCRIPTED:
        status, headers = SCRIPTED[name]
        return Reply(status, body=b"", headers=headers)
    return Reply(201, body=b"", headers={"Location": LOCATION})


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer(responder=responder) as fake:
        yield fake


@pytest.fixture(scope="module")
def vapid() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def raw_key(key: ec.EllipticCurvePrivateKey) -> str:
    return b64url(key.private_numbers().private_value.to_bytes(32, "big"))


def options(vapid: ec.EllipticCurvePrivateKey, **values: Any) -> WebPushOptions:
    data: dict[str, Any] = {"type": "webpush", "vapid_private_key": raw_key(vapid), "subject": SUBJECT}
    data.update(values)
    return WebPushOptions.model_validate(data)


def push(to: str, **values: Any) -> OutboundMessage:
    fields: dict[str, Any] = {
        "title": "Mairie de Lyon",
        "body": "Votre rendez-vous du 12 mars est confirmé.",
        "data": {"url": "https://mairie.example/rdv/42", "rdv": "42"},
    }
    fields.update(values)
    return OutboundMessage(message_id="m-1", run_id="r-1", channel=Channel.PUSH, to=to, **fields)


def send_all(opts: WebPushOptions, *messages: OutboundMessage) -> list[SendResult]:
    async def go() -> list[SendResult]:
        provider = WebPushProvider("navigateurs", opts)
        try:
            return [await provider.send(m) for m in messages]
        finally:
            await provider.close()

    return asyncio.run(go())


def refused(opts: WebPushOptions, message: OutboundMessage) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        send_all(opts, message)
    error = caught.value
    secrets = [message.to, message.body]
    if message.to.startswith("{"):
        sub = json.loads(message.to)
        secrets += [sub["endpoint"], sub["keys"]["p256dh"], sub["keys"]["auth"]]
    for text in (str(error), error.detail, repr(error.args)):
        for secret in secrets:
            assert secret not in text
    return error


# -- the request --------------------------------------------------------------------------------------


def test_registered_by_entry_point() -> None:
    assert registry.driver("webpush") is WebPushProvider
    assert WebPushProvider.channels == frozenset({Channel.PUSH})


def test_round_trip_decrypts_to_the_message(
    server: FakeProviderServer, vapid: ec.EllipticCurvePrivateKey
) -> None:
    browser = Browser.at(f"{server.url}/push/abc")
    before = time.time()
    (result,) = send_all(options(vapid), push(browser.subscription))
    assert result == SendResult(provider_reference=LOCATION, parts=1)
    (request,) = server.requests
    assert request.method == "POST"
    assert request.path == "/push/abc"
    assert browser.decrypt(request) == {
        "title": "Mairie de Lyon",
        "body": "Votre rendez-vous du 12 mars est confirmé.",
        "data": {"url": "https://mairie.example/rdv/42", "rdv": "42"},
        "url": "https://mairie.example/rdv/42",
        "id": "m-1",
    }
    assert request.headers["TTL"] == "86400"
    assert request.headers["Urgency"] == "normal"
    assert request.headers["Content-Encoding"] == "aes128gcm"
    assert request.headers["Content-Type"] == "application/octet-stream"
    assert "Topic" not in request.headers
    claims, _, k = vapid_claims(request)
    assert k == b64url(public_point(vapid))
    assert claims["aud"] == server.url
    assert claims["sub"] == SUBJECT
    assert before < claims["exp"] <= time.time() + JWT_LIFETIME.total_seconds()


def test_no_url_and_no_title(server: FakeProviderServer, vapid: ec.EllipticCurvePrivateKey) -> None:
    browser = Browser.at(f"{server.url}/push/abc")
    send_all(options(vapid), push(browser.subscription, title=None, data={}, body="Bonjour"))
    assert browser.decrypt(server.requests[0]) == {"title": "", "body": "Bonjour", "data": {}, "id": "m-1"}


def test_options_reach_the_headers(server: FakeProviderServer, vapid: ec.EllipticCurvePrivateKey) -> None:
    browser = Browser.at(f"{server.url}/push/abc")
    send_all(options(vapid, ttl="2h", urgency="high", topic="rappel-rdv"), push(browser.subscription))
    headers = server.requests[0].headers
    assert (headers["TTL"], headers["Urgency"], headers["Topic"]) == ("7200", "high", "rappel-rdv")


def test_a_fresh_ephemeral_key_per_message(
    server: FakeProviderServer, vapid: ec.EllipticCurvePrivateKey
) -> None:
    browser = Browser.at(f"{server.url}/push/abc")
    send_all(options(vapid), push(browser.subscription), push(browser.subscription, body="Deux"))
    first, second = server.requests
    assert [browser.decrypt(r)["body"] for r in (first, second)] == [
        "Votre rendez-vous du 12 mars est confirmé.",
        "Deux",
    ]
    # aes128gcm header: salt(16) rs(4) idlen(1) keyid(65): the sender's ephemeral public key
    assert first.body[:16] != second.body[:16]
    assert first.body[21:86] != second.body[21:86]


def test_jwt_reused_per_origin_and_renewed(
    vapid: ec.EllipticCurvePrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (
        FakeProviderServer(responder=responder) as one,
        FakeProviderServer(responder=responder) as two,
    ):
        a, b = Browser.at(f"{one.url}/push/a"), Browser.at(f"{one.url}/push/b")
        c = Browser.at(f"{two.url}/push/c")
        send_all(options(vapid), push(a.subscription), push(b.subscription), push(c.subscription))
        (_, token_a, _), (_, token_b, _) = (vapid_claims(r) for r in one.requests)
        claims_c, token_c, _ = vapid_claims(two.requests[0])
        assert token_a == token_b
        assert token_c != token_a
        assert claims_c["aud"] == two.url

    provider = WebPushProvider("navigateurs", options(vapid))
    origin = "https://fcm.googleapis.com"
    start = time.time()
    first = provider.vapid_token(origin)
    monkeypatch.setattr(webpush.time, "time", lambda: start + 10.5 * 3600)
    assert provider.vapid_token(origin) == first
    monkeypatch.setattr(webpush.time, "time", lambda: start + 11 * 3600 + 1)
    renewed = provider.vapid_token(origin)
    assert renewed != first
    assert jwt.decode(renewed, options={"verify_signature": False})["exp"] == int(start + 23 * 3600 + 1)


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "code", "suppress"),
    [
        ("gone-404", PermanentError, "gone", True),
        ("gone-410", PermanentError, "gone", True),
        ("too-large", TechnicalError, "413", None),
        ("throttled", ThrottledError, "429", None),
        ("bad-request", TechnicalError, "400", None),
        ("bad-jwt", TechnicalError, "401", None),
        ("wrong-key", TechnicalError, "403", None),
        ("down", TransientError, "503", None),
        ("broken", TransientError, "500", None),
    ],
)
def test_statuses(
    server: FakeProviderServer,
    vapid: ec.EllipticCurvePrivateKey,
    name: str,
    kind: type[ProviderError],
    code: str,
    suppress: bool | None,
) -> None:
    error = refused(options(vapid), push(Browser.at(f"{server.url}/push/{name}").subscription))
    assert type(error) is kind
    assert error.code == code
    if suppress is not None:
        assert isinstance(error, PermanentError)
        assert error.suppress is suppress


def test_throttling_honours_retry_after(
    server: FakeProviderServer, vapid: ec.EllipticCurvePrivateKey
) -> None:
    error = refused(options(vapid), push(Browser.at(f"{server.url}/push/throttled").subscription))
    assert type(error) is ThrottledError
    assert error.retry_after_s == 30.0
    down = refused(options(vapid), push(Browser.at(f"{server.url}/push/down").subscription))
    assert down.retry_after_s == 5.0


def test_clear_http_endpoint_is_refused_before_sending(vapid: ec.EllipticCurvePrivateKey) -> None:
    browser = Browser.at("https://push.example.org/send/abcdef")
    message = push(browser.subscription.replace("https://push.example.org", "http://push.example.org"))
    error = refused(options(vapid), message)
    assert type(error) is PermanentError
    assert error.suppress is True
    assert "push.example.org" not in str(error)


def test_payload_too_large_is_refused_before_sending(
    server: FakeProviderServer, vapid: ec.EllipticCurvePrivateKey
) -> None:
    browser = Browser.at(f"{server.url}/push/abc")
    error = refused(options(vapid), push(browser.subscription, body="é" * 2500))
    assert type(error) is TechnicalError
    assert error.code == "payload-too-large"
    assert server.requests == []


def test_the_largest_payload_still_fits(
    server: FakeProviderServer, vapid: ec.EllipticCurvePrivateKey
) -> None:
    browser = Browser.at(f"{server.url}/push/abc")
    base = len(webpush.WebPushProvider("x", options(vapid)).payload(push(browser.subscription, body="")))
    body = "x" * (webpush.MAX_PLAINTEXT - base)
    send_all(options(vapid), push(browser.subscription, body=body))
    (request,) = server.requests
    assert len(request.body) == 4096
    assert browser.decrypt(request)["body"] == body


def test_unusable_subscriptions(vapid: ec.EllipticCurvePrivateKey) -> None:
    error = refused(options(vapid), push("fcm-registration-token-abc"))
    assert isinstance(error, PermanentError)
    assert error.suppress is False
    bad_keys = json.dumps({"endpoint": "https://push.example/x", "keys": {"p256dh": "AAAA", "auth": "BBBB"}})
    error = refused(options(vapid), push(bad_keys))
    assert isinstance(error, PermanentError)
    assert (error.code, error.suppress) == ("invalid-subscription", True)


# -- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", ["0s", "0min", "500ms"])
def test_ttl_zero_is_refused(vapid: ec.EllipticCurvePrivateKey, ttl: str) -> None:
    with pytest.raises(ValidationError, match="ttl must be at least 1s"):
        options(vapid, ttl=ttl)


def test_ttl_zero_is_refused_in_smartpush_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "    vapid_private_key: ${VAPID}\n    ttl: 0s\n")
    with pytest.raises(ConfigError, match="ttl must be at least 1s"):
        load_config(path, env={"VAPID": raw_key(ec.generate_private_key(ec.SECP256R1()))})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"subject": "webmestre@mairie.example"}, "subject must be"),
        ({"subject": "http://mairie.example"}, "subject must be"),
        ({"urgency": "urgent"}, "very-low"),
        ({"topic": "a topic with spaces"}, "topic must be"),
        ({"topic": "x" * 33}, "topic must be"),
        ({"vapid_private_key": "bm90LWEta2V5"}, "not a P-256 private key"),
        ({"vapid_private_key_file": "keys/vapid.pem"}, "one of the two"),
    ],
)
def test_bad_options(vapid: ec.EllipticCurvePrivateKey, values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        options(vapid, **values)
    assert "bm90LWEta2V5" not in str(caught.value)


def test_no_key_at_all() -> None:
    with pytest.raises(ValidationError, match="one of the two"):
        WebPushOptions.model_validate({"type": "webpush", "subject": SUBJECT})


def write(tmp_path: Path, account: str) -> Path:
    path = tmp_path / "smartpush.yaml"
    path.write_text(
        f"providers:\n  navigateurs:\n    type: webpush\n    subject: {SUBJECT}\n" + account, encoding="utf-8"
    )
    return path


def test_secret_key_from_env_is_masked(
    tmp_path: Path, server: FakeProviderServer, vapid: ec.EllipticCurvePrivateKey
) -> None:
    secret = raw_key(vapid)
    config = load_config(write(tmp_path, "    vapid_private_key: ${VAPID}\n"), env={"VAPID": secret})
    account = config.account("navigateurs")
    assert isinstance(account, WebPushOptions)
    assert isinstance(account.vapid_private_key, SecretStr)
    assert config.warnings == []
    provider = WebPushProvider("navigateurs", account, project_dir=tmp_path)
    for text in (
        repr(account),
        str(account),
        str(account.model_dump()),
        repr(config.accounts),
        repr(provider),
    ):
        assert secret not in text
    assert provider.public_key == b64url(public_point(vapid))
    browser = Browser.at(f"{server.url}/push/abc")
    send_all(account, push(browser.subscription))
    assert vapid_claims(server.requests[0])[2] == provider.public_key


def test_a_literal_key_gets_a_warning(tmp_path: Path, vapid: ec.EllipticCurvePrivateKey) -> None:
    secret = raw_key(vapid)
    config = load_config(write(tmp_path, f"    vapid_private_key: {secret}\n"), env={})
    assert any("vapid_private_key" in w.message for w in config.warnings)
    assert all(secret not in str(w) for w in config.warnings)


@pytest.mark.parametrize("form", ["pkcs8", "sec1", "raw"])
def test_key_file_relative_to_the_project(
    tmp_path: Path, server: FakeProviderServer, vapid: ec.EllipticCurvePrivateKey, form: str
) -> None:
    (tmp_path / "keys").mkdir()
    if form == "raw":
        content = (raw_key(vapid) + "\n").encode()
    else:
        fmt = (
            serialization.PrivateFormat.PKCS8
            if form == "pkcs8"
            else serialization.PrivateFormat.TraditionalOpenSSL
        )
        content = vapid.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    (tmp_path / "keys" / "vapid.pem").write_bytes(content)
    config = load_config(write(tmp_path, "    vapid_private_key_file: keys/vapid.pem\n"), env={})
    account = config.account("navigateurs")
    provider = WebPushProvider("navigateurs", account, project_dir=config.project_dir)
    assert provider.public_key == b64url(public_point(vapid))


def test_missing_or_wrong_key_file(tmp_path: Path) -> None:
    opts = WebPushOptions.model_validate(
        {"type": "webpush", "subject": SUBJECT, "vapid_private_key_file": "keys/vapid.pem"}
    )
    with pytest.raises(ConfigError, match="vapid_private_key_file"):
        WebPushProvider("navigateurs", opts, project_dir=tmp_path)
    (tmp_path / "keys").mkdir()
    rsa_like = b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    (tmp_path / "keys" / "vapid.pem").write_bytes(rsa_like)
    with pytest.raises(ConfigError, match="not a P-256 private key"):
        WebPushProvider("navigateurs", opts, project_dir=tmp_path)
    other_curve = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "keys" / "vapid.pem").write_bytes(other_curve)
    with pytest.raises(ConfigError, match="P-256"):
        WebPushProvider("navigateurs", opts, project_dir=tmp_path)


def test_an_unreachable_push_service_is_transient(vapid: ec.EllipticCurvePrivateKey) -> None:
    with FakeProviderServer() as gone:
        url = gone.url
    error = refused(options(vapid), push(Browser.at(f"{url}/push/secret-browser-id").subscription))
    assert type(error) is TransientError
    assert error.code == "connection"
