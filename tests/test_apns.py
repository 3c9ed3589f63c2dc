"""The ``apns`` driver against a real HTTP/2 server over TLS (hypercorn + a trustme certificate)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypercorn.asyncio import serve
from hypercorn.config import Config
from pydantic import SecretStr, ValidationError
from smartpush.providers.apns import (
    TOKEN_REFRESH_AFTER,
    ApnsOptions,
    ApnsProvider,
    apns_id,
    transport_error,
)

from smartpush import registry
from smartpush.errors import (
    ConfigError,
    PermanentError,
    ProviderError,
    TechnicalError,
    ThrottledError,
    TransientError,
)
from smartpush.provider import Channel, OutboundMessage, SendResult

TEAM = "TEAM123456"
KID = "KEY9876543"
TOPIC = "fr.example.app"
OK_TOKEN = "ab" * 32
ACCEPTED_ID = "0a1b2c3d-0000-4000-8000-123456789abc"


def device(n: int) -> str:
    return f"{n:064x}"


#: Device tokens the server answers with a documented error: token -> (status, reason, headers).
SCRIPTED: dict[str, tuple[int, str, dict[str, str]]] = {
    device(1): (400, "BadDeviceToken", {}),
    device(2): (400, "DeviceTokenNotForTopic", {}),
    device(3): (410, "Unregistered", {}),
    device(4): (410, "ExpiredToken", {}),
    device(5): (400, "BadTopic", {}),
    device(6): (400, "BadPriority", {}),
    device(7): (413, "PayloadTooLarge", {}),
    device(8): (400, "MissingTopic", {}),
    device(9): (400, "BadExpirationDate", {}),
    device(10): (400, "BadCollapseId", {}),
    device(11): (403, "InvalidProviderToken", {}),
    device(12): (403, "MissingProviderToken", {}),
    device(13): (403, "BadCertificate", {}),
    device(14): (429, "TooManyRequests", {"retry-after": "7"}),
    device(15): (500, "InternalServerError", {}),
    device(16): (503, "ServiceUnavailable", {"retry-after": "30"}),
    device(17): (503, "Shutdown", {}),
    device(18): (400, "SomethingNew", {}),
    device(19): (400, "TopicDisallowed", {}),
    device(20): (400, "PayloadEmpty", {}),
}

#: token -> (error class, suppress for permanent errors, retry_after_s)
EXPECTED: dict[str, tuple[type[ProviderError], bool, float | None]] = {
    device(1): (PermanentError, True, None),
    device(2): (PermanentError, True, None),
    device(3): (PermanentError, True, None),
    device(4): (PermanentError, True, None),
    device(5): (TechnicalError, False, None),
    device(6): (TechnicalError, False, None),
    device(7): (TechnicalError, False, None),
    device(8): (TechnicalError, False, None),
    device(9): (TechnicalError, False, None),
    device(10): (TechnicalError, False, None),
    device(11): (TechnicalError, False, None),
    device(12): (TechnicalError, False, None),
    device(13): (TechnicalError, False, None),
    device(14): (ThrottledError, False, 7.0),
    device(15): (TransientError, False, None),
    device(16): (TransientError, False, 30.0),
    device(17): (TransientError, False, None),
    device(18): (TechnicalError, False, None),
    device(19): (TechnicalError, False, None),
    device(20): (TechnicalError, False, None),
}


@dataclass
class Seen:
    """One request as the server saw it."""

    http_version: str
    client: tuple[str, int]
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    jwt: str


@dataclass
class ApnsServer:
    """A fake api.push.apple.com: answers per scripted device token, records and checks every request."""

    public_key: ec.EllipticCurvePublicKey
    requests: list[Seen] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: Provider tokens answered with 403 ExpiredProviderToken.
    expired: set[str] = field(default_factory=set)
    expire_all: bool = False
    url: str = ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        token = headers.get("authorization", "").removeprefix("bearer ")
        seen = Seen(
            scope["http_version"], tuple(scope["client"]), scope["path"], headers, json.loads(body), token
        )
        self.requests.append(seen)
        status, document, extra = self.answer(scope, seen)
        out = [(b"apns-id", headers.get("apns-id", ACCEPTED_ID).encode())]
        out += [(k.encode(), v.encode()) for k, v in extra.items()]
        payload = json.dumps(document).encode() if document else b""
        if payload:
            out.append((b"content-type", b"application/json"))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": payload})

    def answer(self, scope: dict[str, Any], seen: Seen) -> tuple[int, dict[str, Any], dict[str, str]]:
        if scope["http_version"] != "2":
            self.problems.append(f"HTTP/{scope['http_version']}")
        if scope["method"] != "POST" or not seen.path.startswith("/3/device/"):
            return 405, {"reason": "MethodNotAllowed"}, {}
        try:
            header = jwt.get_unverified_header(seen.jwt)
            claims = jwt.decode(
                seen.jwt,
                self.public_key,
                algorithms=["ES256"],
                issuer=TEAM,
                options={"require": ["iat", "iss"]},
            )
        except jwt.PyJWTError as exc:
            self.problems.append(f"JWT: {exc}")
            return 403, {"reason": "InvalidProviderToken"}, {}
        if header.get("kid") != KID or header.get("alg") != "ES256":
            self.problems.append(f"JWT header {header}")
            return 403, {"reason": "InvalidProviderToken"}, {}
        if time.time() - claims["iat"] > timedelta(hours=1).total_seconds():
            return 403, {"reason": "ExpiredProviderToken"}, {}
        if self.expire_all or seen.jwt in self.expired:
            return 403, {"reason": "ExpiredProviderToken"}, {}
        if seen.headers.get("apns-topic") != TOPIC:
            return 400, {"reason": "BadTopic"}, {}
        token = seen.path.removeprefix("/3/device/")
        if token in SCRIPTED:
            status, reason, extra = SCRIPTED[token]
            document: dict[str, Any] = {"reason": reason}
            if status == 410:
                document["timestamp"] = 1_700_000_000_000
            return status, document, extra
        return 200, {}, {}


@dataclass
class Keys:
    private_pem: str
    public: ec.EllipticCurvePublicKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return Keys(pem, key.public_key())


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def certs(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the CA (ca.pem) and the server's certificate chain and key."""
    folder = tmp_path_factory.mktemp("certs")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(folder / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(folder / "server.pem"), append=True)
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return folder


@pytest.fixture(scope="module")
def server_thread(keys: Keys, certs: Path) -> Iterator[ApnsServer]:
    """hypercorn serving :class:`ApnsServer` over TLS (ALPN h2) in a thread, on a free port."""
    app = ApnsServer(keys.public)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns and closes the listening socket
    config.certfile = str(certs / "server.pem")
    config.keyfile = str(certs / "server.key")
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()

    async def run() -> None:
        started.set()
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    started.wait(5)
    app.url = f"https://127.0.0.1:{port}"
    _wait_listening(port)
    try:
        yield app
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        assert not thread.is_alive(), "the test server did not stop"
        loop.close()


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the test server did not start")


@pytest.fixture
def server(server_thread: ApnsServer) -> Iterator[ApnsServer]:
    server_thread.requests.clear()
    server_thread.expired.clear()
    server_thread.expire_all = False
    yield server_thread
    assert server_thread.problems == []


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def options(server: ApnsServer, keys: Keys, **extra: Any) -> ApnsOptions:
    values: dict[str, Any] = {
        "type": "apns",
        "team_id": TEAM,
        "key_id": KID,
        "private_key": SecretStr(keys.private_pem),
        "topic": TOPIC,
        "base_url": server.url,
        "ca_file": "ca.pem",
    }
    return ApnsOptions(**{**values, **extra})


def make(
    server: ApnsServer, keys: Keys, certs: Path, clock: Callable[[], float] | None = None, **extra: Any
) -> ApnsProvider:
    context: dict[str, Any] = {"project_dir": certs}
    if clock is not None:
        context["clock"] = clock
    return ApnsProvider("apns", options(server, keys, **extra), **context)


def message(to: str = OK_TOKEN, n: int = 1, **extra: Any) -> OutboundMessage:
    values: dict[str, Any] = {
        "message_id": f"msg-{n}",
        "run_id": "run-1",
        "channel": Channel.PUSH,
        "to": to,
        "title": "Rappel",
        "body": "Votre rendez-vous est demain à 9 h",
        "data": {"url": "https://example.org/rdv"},
    }
    return OutboundMessage(**{**values, **extra})


def send(provider: ApnsProvider, *messages: OutboundMessage) -> list[SendResult | BaseException]:
    async def go() -> list[SendResult | BaseException]:
        try:
            results = await asyncio.gather(*(provider.send(m) for m in messages), return_exceptions=True)
            return list(results)
        finally:
            await provider.close()

    return asyncio.run(go())


def send_one(provider: ApnsProvider, msg: OutboundMessage) -> SendResult:
    (result,) = send(provider, msg)
    if isinstance(result, BaseException):
        raise result
    return result


# -- the request ----------------------------------------------------------------------------------------


def test_exact_headers_and_body(server: ApnsServer, keys: Keys, certs: Path) -> None:
    clock = Clock(time.time())
    provider = make(server, keys, certs, clock=clock, collapse_id="rdv-42")
    result = send_one(provider, message())
    (seen,) = server.requests
    assert seen.path == f"/3/device/{OK_TOKEN}"
    expected_id = str(uuid.uuid5(uuid.UUID("6f0c1a52-4c5e-5b3a-9d1e-7a9b2c3d4e5f"), "msg-1"))
    assert result == SendResult(provider_reference=expected_id)
    assert seen.headers["authorization"] == f"bearer {seen.jwt}"
    assert seen.headers["apns-topic"] == TOPIC
    assert seen.headers["apns-push-type"] == "alert"
    assert seen.headers["apns-priority"] == "10"
    assert seen.headers["apns-expiration"] == str(int(clock.now) + 86400)
    assert seen.headers["apns-id"] == expected_id
    assert seen.headers["apns-collapse-id"] == "rdv-42"
    assert seen.body == {
        "aps": {
            "alert": {"title": "Rappel", "body": "Votre rendez-vous est demain à 9 h"},
            "sound": "default",
        },
        "url": "https://example.org/rdv",
    }
    header = jwt.get_unverified_header(seen.jwt)
    assert header == {"alg": "ES256", "kid": KID, "typ": "JWT"}
    claims = jwt.decode(seen.jwt, keys.public, algorithms=["ES256"])
    assert claims == {"iss": TEAM, "iat": int(clock.now)}


def test_options_priority_expiration_and_no_collapse_id(server: ApnsServer, keys: Keys, certs: Path) -> None:
    clock = Clock(time.time())
    provider = make(server, keys, certs, clock=clock, priority=5, expiration="2h")
    send_one(provider, message(title=None, data={}))
    (seen,) = server.requests
    assert seen.headers["apns-priority"] == "5"
    assert seen.headers["apns-expiration"] == str(int(clock.now) + 7200)
    assert "apns-collapse-id" not in seen.headers
    assert seen.body == {"aps": {"alert": {"body": "Votre rendez-vous est demain à 9 h"}, "sound": "default"}}


def test_data_cannot_replace_aps(server: ApnsServer, keys: Keys, certs: Path) -> None:
    send_one(make(server, keys, certs), message(data={"aps": "x", "k": "v"}))
    assert server.requests[0].body["aps"]["sound"] == "default"
    assert server.requests[0].body["k"] == "v"


def test_apns_id_is_a_uuid_and_stable() -> None:
    assert apns_id("msg-1") == apns_id("msg-1") != apns_id("msg-2")
    assert uuid.UUID(apns_id("msg-1")).version == 5
    given = "5F1B2C3D-0000-4000-8000-123456789ABC"
    assert apns_id(given) == given.lower()


def test_speaks_http2_on_one_multiplexed_connection(server: ApnsServer, keys: Keys, certs: Path) -> None:
    provider = make(server, keys, certs)
    results = send(provider, *(message(n=i) for i in range(20)))
    assert all(isinstance(r, SendResult) for r in results)
    assert {s.http_version for s in server.requests} == {"2"}
    assert len({s.client for s in server.requests}) == 1


# -- the provider token ---------------------------------------------------------------------------------


def test_jwt_reused_across_concurrent_sends_and_connections(
    server: ApnsServer, keys: Keys, certs: Path
) -> None:
    provider = make(server, keys, certs)
    send(provider, *(message(n=i) for i in range(20)))
    send(provider, message(n=99))  # a new loop, so a new client and connection
    assert len(server.requests) == 21
    assert len({s.jwt for s in server.requests}) == 1
    assert len({s.client for s in server.requests}) == 2
    assert provider.tokens.generated == 1


def test_jwt_regenerated_after_20_minutes_never_before(server: ApnsServer, keys: Keys, certs: Path) -> None:
    start = time.time() - timedelta(minutes=30).total_seconds()
    clock = Clock(start)
    provider = make(server, keys, certs, clock=clock)
    send_one(provider, message(n=1))
    clock.now = start + TOKEN_REFRESH_AFTER.total_seconds() - 1
    send_one(provider, message(n=2))
    clock.now = start + TOKEN_REFRESH_AFTER.total_seconds() + 1
    send_one(provider, message(n=3))
    send_one(provider, message(n=4))
    first, second, third, fourth = (s.jwt for s in server.requests)
    assert first == second
    assert third != second
    assert third == fourth
    assert jwt.decode(third, keys.public, algorithms=["ES256"])["iat"] == int(clock.now)
    assert timedelta(minutes=20) <= TOKEN_REFRESH_AFTER
    assert timedelta(minutes=60) > TOKEN_REFRESH_AFTER


def test_expired_provider_token_refreshes_and_retries_once(
    server: ApnsServer, keys: Keys, certs: Path
) -> None:
    provider = make(server, keys, certs)
    send_one(provider, message(n=1))
    stale = server.requests[0].jwt
    server.expired.add(stale)
    result = send_one(provider, message(n=2))
    assert result.provider_reference == apns_id("msg-2")
    retried = server.requests[1:]
    assert [s.jwt == stale for s in retried] == [True, False]
    assert retried[0].headers["apns-id"] == retried[1].headers["apns-id"]
    assert provider.tokens.generated == 2


def test_expired_token_seen_by_20_concurrent_sends_is_refreshed_once(
    server: ApnsServer, keys: Keys, certs: Path
) -> None:
    provider = make(server, keys, certs)
    send_one(provider, message(n=0))
    server.expired.add(server.requests[0].jwt)
    results = send(provider, *(message(n=i) for i in range(1, 21)))
    assert all(isinstance(r, SendResult) for r in results)
    assert provider.tokens.generated == 2
    assert len({s.jwt for s in server.requests}) == 2


def test_expired_provider_token_twice_is_a_technical_error(
    server: ApnsServer, keys: Keys, certs: Path
) -> None:
    server.expire_all = True
    provider = make(server, keys, certs)
    with pytest.raises(TechnicalError) as caught:
        send_one(provider, message())
    assert caught.value.code == "ExpiredProviderToken"
    assert len(server.requests) == 2


# -- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", sorted(SCRIPTED))
def test_each_reason_maps_to_its_error(server: ApnsServer, keys: Keys, certs: Path, token: str) -> None:
    _status, reason, _ = SCRIPTED[token]
    kind, suppress, wait = EXPECTED[token]
    with pytest.raises(ProviderError) as caught:
        send_one(make(server, keys, certs), message(to=token))
    error = caught.value
    assert type(error) is kind
    assert error.code == reason
    assert error.retry_after_s == wait
    if isinstance(error, PermanentError):
        assert error.suppress is suppress
    assert token not in str(error)
    assert "rendez-vous" not in str(error)
    assert len(server.requests) == 1


def test_unregistered_reports_the_timestamp(server: ApnsServer, keys: Keys, certs: Path) -> None:
    with pytest.raises(PermanentError) as caught:
        send_one(make(server, keys, certs), message(to=device(3)))
    assert "2023-11-14" in str(caught.value)


def test_untrusted_certificate_is_a_technical_tls_error(server: ApnsServer, keys: Keys, certs: Path) -> None:
    provider = ApnsProvider("apns", options(server, keys, ca_file=None), project_dir=certs)
    with pytest.raises(TechnicalError) as caught:
        send_one(provider, message())
    assert caught.value.code == "tls"
    assert OK_TOKEN not in str(caught.value)


def test_connection_refused_is_transient(keys: Keys, certs: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    dead = ApnsServer(keys.public, url=f"https://127.0.0.1:{port}")
    with pytest.raises(TransientError) as caught:
        send_one(make(dead, keys, certs), message())
    assert caught.value.code == "connection"


def test_not_a_device_token_is_refused_before_sending(server: ApnsServer, keys: Keys, certs: Path) -> None:
    with pytest.raises(PermanentError) as caught:
        send_one(make(server, keys, certs), message(to="../../etc/passwd"))
    assert caught.value.suppress is False
    assert server.requests == []


def test_payload_too_large_is_refused_before_sending(server: ApnsServer, keys: Keys, certs: Path) -> None:
    with pytest.raises(TechnicalError) as caught:
        send_one(make(server, keys, certs), message(body="x" * 5000))
    assert caught.value.code == "PayloadTooLarge"
    assert server.requests == []


def _all_subclasses(root: type[BaseException]) -> set[type[BaseException]]:
    found = {root}
    for sub in root.__subclasses__():
        found |= _all_subclasses(sub)
    return found


def _httpx_exception_classes() -> list[type[BaseException]]:
    classes: set[type[BaseException]] = set()
    for name in dir(httpx):
        value = getattr(httpx, name)
        if isinstance(value, type) and issubclass(value, Exception) and value.__module__.startswith("httpx"):
            classes |= _all_subclasses(value)
    return sorted(classes, key=lambda c: c.__name__)


def _instance(cls: type[BaseException]) -> BaseException:
    request = httpx.Request("POST", f"https://api.push.apple.com/3/device/{OK_TOKEN}")
    if issubclass(cls, httpx.HTTPStatusError):
        return cls("boom", request=request, response=httpx.Response(502, request=request))
    if issubclass(cls, httpx.RequestError):
        return cls(f"failed for /3/device/{OK_TOKEN}", request=request)
    if issubclass(cls, httpx.StreamError):
        # StreamConsumed and its siblings take no argument; StreamError itself takes a message.
        return cls("stream") if cls is httpx.StreamError else cls()  # type: ignore[call-arg]
    return cls(f"failed for /3/device/{OK_TOKEN}")


@pytest.mark.parametrize("cls", _httpx_exception_classes(), ids=lambda c: c.__name__)
def test_every_httpx_exception_maps_to_a_provider_error(cls: type[BaseException]) -> None:
    error = transport_error(_instance(cls))
    assert isinstance(error, ProviderError)
    assert type(error) in (TransientError, TechnicalError, ThrottledError, PermanentError)
    assert OK_TOKEN not in str(error)


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        (httpx.ConnectTimeout("t"), TransientError, "timeout"),
        (httpx.ReadTimeout("t"), TransientError, "timeout"),
        (httpx.PoolTimeout("t"), TransientError, "timeout"),
        (httpx.ConnectError("c"), TransientError, "connection"),
        (httpx.ReadError("c"), TransientError, "connection"),
        (httpx.RemoteProtocolError("goaway"), TransientError, "connection"),
        (httpx.LocalProtocolError("bad header"), TechnicalError, "client"),
        (httpx.UnsupportedProtocol("ftp"), TechnicalError, "invalid-url"),
    ],
)
def test_transport_failures_through_send(
    keys: Keys, certs: Path, exc: Exception, kind: type[ProviderError], code: str
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise exc

    opts = options(ApnsServer(keys.public, url="https://api.push.apple.com"), keys, ca_file=None)
    provider = ApnsProvider("apns", opts, project_dir=certs, transport=httpx.MockTransport(fail))
    with pytest.raises(kind) as caught:
        send_one(provider, message())
    assert caught.value.code == code


def test_tls_cause_is_technical() -> None:
    try:
        try:
            raise ssl.SSLCertVerificationError("certificate verify failed")
        except ssl.SSLError as inner:
            raise httpx.ConnectError("boom") from inner
    except httpx.ConnectError as outer:
        error = transport_error(outer)
    assert isinstance(error, TechnicalError)
    assert error.code == "tls"


def test_other_exceptions_are_not_translated() -> None:
    assert transport_error(KeyError("x")) is None


# -- options --------------------------------------------------------------------------------------------


def test_options_validation(keys: Keys) -> None:
    base: dict[str, Any] = {"type": "apns", "team_id": TEAM, "key_id": KID, "topic": TOPIC}
    with pytest.raises(ValidationError, match="exactly one"):
        ApnsOptions(**base)
    with pytest.raises(ValidationError, match="exactly one"):
        ApnsOptions(**base, private_key_file="k.p8", private_key=SecretStr(keys.private_pem))
    with pytest.raises(ValidationError, match="10 capital"):
        ApnsOptions(**{**base, "team_id": "short"}, private_key_file="k.p8")
    with pytest.raises(ValidationError):
        ApnsOptions(**base, private_key_file="k.p8", priority=7)
    with pytest.raises(ValidationError, match="priority 5"):
        ApnsOptions(**base, private_key_file="k.p8", push_type="background")
    with pytest.raises(ValidationError, match="64 bytes"):
        ApnsOptions(**base, private_key_file="k.p8", collapse_id="x" * 65)
    production = ApnsOptions(**base, private_key_file="k.p8")
    assert production.url == "https://api.push.apple.com"
    assert production.expiration == timedelta(days=1)
    sandbox = ApnsOptions(**base, private_key_file="k.p8", environment="sandbox")
    assert sandbox.url == "https://api.sandbox.push.apple.com"


def test_private_key_file_is_read_from_the_project(keys: Keys, tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "AuthKey.p8").write_text(keys.private_pem)
    base: dict[str, Any] = {"type": "apns", "team_id": TEAM, "key_id": KID, "topic": TOPIC}
    provider = ApnsProvider(
        "apns", ApnsOptions(**base, private_key_file="keys/AuthKey.p8"), project_dir=tmp_path
    )
    token = provider.tokens.current()
    assert jwt.decode(token, keys.public, algorithms=["ES256"])["iss"] == TEAM
    with pytest.raises(ConfigError, match="cannot read"):
        ApnsProvider("apns", ApnsOptions(**base, private_key_file="missing.p8"), project_dir=tmp_path)


def test_a_bad_key_is_a_config_error_that_does_not_quote_it(tmp_path: Path) -> None:
    rsa_like = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    base: dict[str, Any] = {"type": "apns", "team_id": TEAM, "key_id": KID, "topic": TOPIC}
    with pytest.raises(ConfigError) as caught:
        ApnsProvider("apns", ApnsOptions(**base, private_key=SecretStr(rsa_like)), project_dir=tmp_path)
    assert "bm90IGEga2V5" not in str(caught.value)


def test_registered_as_entry_point() -> None:
    assert registry.driver("apns") is ApnsProvider
    assert ApnsProvider.channels == frozenset({Channel.PUSH})
