"""``webpush``: browser notifications through Web Push (RFC 8030), encrypted (RFC 8291), signed (RFC 8292).

Every recipient's address is a push subscription, as the browser's ``PushManager.subscribe()`` gives it
and :func:`smartpush.addresses.normalise_push_token` keeps it::

    {"endpoint": "https://fcm.googleapis.com/fcm/send/...", "keys": {"p256dh": "...", "auth": "..."}}

One request per message, straight to the subscription's push service::

    providers:
      navigateurs:
        type: webpush
        vapid_private_key_file: keys/vapid.pem   # relative to the project folder; or vapid_private_key
        subject: mailto:webmestre@mairie.example # a contact for the push services (RFC 8292 §2.1)
        ttl: 1d                                   # how long the push service keeps an undelivered message
        urgency: normal                           # very-low | low | normal | high
        topic: rappel-rdv                         # optional: a newer message with it replaces an older one

The VAPID key is a P-256 private key: a PEM file (``openssl ecparam -name prime256v1 -genkey``) or the
raw base64url private value most Web Push tools print. Its public half is what the web page gives
``PushManager.subscribe()`` as ``applicationServerKey``.

The body is the JSON ``{"title", "body", "data", "url"?, "id"}`` (``url`` comes from the message's
``data["url"]`` when there is one), encrypted with ``aes128gcm`` for the subscription's ``p256dh`` and
``auth`` keys with a fresh ECDH key per message; the service worker reads it with ``event.data.json()``.
Headers: ``TTL`` (never 0: pywebpush's default of 0 drops every message to a sleeping device),
``Urgency``, ``Topic``, ``Content-Encoding: aes128gcm`` and ``Authorization: vapid t=<JWT>, k=<key>``;
the ES256 JWT names the endpoint's origin as ``aud``, expires 12 h after it is made and is reused for
that origin until one hour before it expires.

Answers: 201/202 (any 2xx) is accepted, the ``Location`` header is the provider reference. 404 and 410
mean the subscription is gone: a permanent failure that suppresses it. 413 (payload too large),
400, 401 and 403 (our VAPID key or request) are technical failures; 429 throttles with ``Retry-After``;
5xx is retried. An endpoint that is not ``https://`` is refused before anything is sent (loopback
``http://`` is allowed for tests). Errors and logs never name the endpoint, the keys or the payload.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_private_key,
    load_pem_private_key,
)
from pydantic import ConfigDict, SecretStr, field_validator, model_validator

from smartpush.errors import (
    ConfigError,
    PermanentError,
    ProviderError,
    TechnicalError,
    ThrottledError,
    TransientError,
)
from smartpush.http import HttpResponse, HttpTransport, classify_status, retry_after
from smartpush.provider import Channel, OutboundMessage, Provider, ProviderOptions, SendResult
from smartpush.units import Duration

__all__ = [
    "JWT_LIFETIME",
    "JWT_RENEW_BEFORE",
    "MAX_PLAINTEXT",
    "WebPushOptions",
    "WebPushProvider",
    "load_vapid_key",
]

#: A VAPID JWT expires this long after it is made (RFC 8292 allows at most 24 h).
JWT_LIFETIME = timedelta(hours=12)
#: A cached JWT is replaced this long before it expires.
JWT_RENEW_BEFORE = timedelta(hours=1)
#: The largest payload that fits one 4096-octet aes128gcm record with its header (RFC 8291 §4):
#: 4096 - 86 (salt, rs, key id length, 65-octet key id) - 16 (tag) - 1 (delimiter).
MAX_PLAINTEXT = 3993
_RECORD_SIZE = 4096
#: The P-256 private value is 32 octets; the uncompressed public point 65.
_PRIVATE_VALUE_SIZE = 32
_PUBLIC_POINT_SIZE = 65
_AUTH_SECRET_SIZE = 16
#: RFC 8030 §5.4: a topic is at most 32 characters of the URL-safe base64 alphabet.
_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_DEFAULT_PORTS = {"https": 443, "http": 80}
_GONE = frozenset({404, 410})
_TOO_LARGE = 413
_OUR_REQUEST = frozenset({400, 401, 403})
_TOO_MANY = 429
_SERVER_ERRORS = range(500, 600)
_ACCEPTED = range(200, 300)


def _b64url_decode(text: str) -> bytes:
    text = text.strip()
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def load_vapid_key(text: str | bytes) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from PEM, base64url DER or the base64url raw 32-octet private value.

    Raises :class:`ValueError` saying which forms are accepted; the message never quotes the key.
    """
    raw = text.encode("ascii", errors="replace") if isinstance(text, str) else text
    key: object
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            key = load_pem_private_key(raw, password=None)
        else:
            decoded = _b64url_decode(raw.decode("ascii", errors="replace"))
            if len(decoded) == _PRIVATE_VALUE_SIZE:
                key = ec.derive_private_key(int.from_bytes(decoded, "big"), ec.SECP256R1())
            else:
                key = load_der_private_key(decoded, password=None)
    except (ValueError, TypeError, binascii.Error):
        raise ValueError(
            "the VAPID key is not a P-256 private key: give an unencrypted PEM file or the base64url "
            "private value"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the VAPID key must be an elliptic-curve key on P-256 (prime256v1)")
    return key


class WebPushOptions(ProviderOptions):
    """A ``webpush`` account: the VAPID key and contact, and how push services keep the messages."""

    # a refused key must not be echoed back by a ValidationError's text
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    #: A PEM file or a file holding the base64url private value, relative to the project folder.
    vapid_private_key_file: Path | None = None
    #: The key itself (PEM or base64url), read from ``${VAR}``.
    vapid_private_key: SecretStr | None = None
    #: How push services can reach us: ``mailto:someone@example.org`` or an ``https://`` page.
    subject: str
    #: How long a push service keeps a message for a device that is offline; never 0.
    ttl: Duration = timedelta(days=1)
    urgency: Literal["very-low", "low", "normal", "high"] = "normal"
    #: A newer message with the same topic replaces an undelivered older one.
    topic: str | None = None

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("mailto:") and "@" in value[len("mailto:") :]:
            return value
        if value.startswith("https://") and len(value) > len("https://"):
            return value
        raise ValueError(
            "subject must be a contact push services can use: mailto:someone@example.org or an https:// URL"
        )

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=1):
            raise ValueError(
                "ttl must be at least 1s: with a TTL of 0 a push service drops the message unless the "
                "browser is connected at that very moment; write e.g. 1d"
            )
        return value

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str | None) -> str | None:
        if value is not None and not _TOPIC.match(value):
            raise ValueError("topic must be 1 to 32 letters, digits, '-' or '_'")
        return value

    @model_validator(mode="after")
    def _one_key(self) -> WebPushOptions:
        if (self.vapid_private_key is None) == (self.vapid_private_key_file is None):
            raise ValueError("give either vapid_private_key_file or vapid_private_key (one of the two)")
        if self.vapid_private_key is not None:
            load_vapid_key(self.vapid_private_key.get_secret_value())
        return self

    @property
    def ttl_seconds(self) -> int:
        return int(self.ttl.total_seconds())


@dataclass(frozen=True, slots=True)
class _Subscription:
    endpoint: str
    origin: str
    p256dh: bytes
    auth: bytes


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    expires_at: float


class WebPushProvider(Provider):
    """Sends push messages to browsers' push services; see the module docstring."""

    channels: ClassVar[frozenset[Channel]] = frozenset({Channel.PUSH})
    Options: ClassVar[type[ProviderOptions]] = WebPushOptions

    def __init__(self, account: str, options: ProviderOptions, **context: Any) -> None:
        super().__init__(account, options, **context)
        if not isinstance(options, WebPushOptions):
            raise TypeError("WebPushProvider needs WebPushOptions")
        self.settings = options
        self._key = self._load_key(options, context.get("project_dir"))
        public = self._key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        #: The base64url public key: the ``applicationServerKey`` the web page subscribes with.
        self.public_key = _b64url(public)
        self._tokens: dict[str, _Token] = {}
        # Made on the first send: the instance is built per worker process before any loop runs.
        self._transport: HttpTransport | None = None

    def _load_key(self, options: WebPushOptions, project_dir: Any) -> ec.EllipticCurvePrivateKey:
        if options.vapid_private_key is not None:
            return load_vapid_key(options.vapid_private_key.get_secret_value())
        assert options.vapid_private_key_file is not None  # noqa: S101 - the options validator ensures it
        path = options.vapid_private_key_file
        if not path.is_absolute():
            path = Path(project_dir or ".") / path
        where = f"providers.{self.account}.vapid_private_key_file"
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path} ({exc.strerror or type(exc).__name__})") from None
        try:
            return load_vapid_key(content)
        except ValueError as exc:
            raise ConfigError(f"{where}: {path}: {exc}") from None

    # -- the request ---------------------------------------------------------------------------------

    def payload(self, message: OutboundMessage) -> bytes:
        """The JSON the service worker receives, before encryption."""
        document: dict[str, Any] = {
            "title": message.title or "",
            "body": message.body,
            "data": dict(message.data),
        }
        if message.data.get("url"):
            document["url"] = message.data["url"]
        document["id"] = message.message_id
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def vapid_token(self, origin: str) -> str:
        """The ES256 JWT for ``origin``, made again one hour before the cached one expires."""
        import jwt

        now = time.time()
        cached = self._tokens.get(origin)
        if cached is not None and now < cached.expires_at - JWT_RENEW_BEFORE.total_seconds():
            return cached.value
        expires_at = int(now + JWT_LIFETIME.total_seconds())
        claims = {"aud": origin, "exp": expires_at, "sub": self.settings.subject}
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"typ": "JWT"})
        self._tokens[origin] = _Token(token, float(expires_at))
        return token

    def headers(self, origin: str) -> dict[str, str]:
        opts = self.settings
        headers = {
            "TTL": str(opts.ttl_seconds),
            "Urgency": opts.urgency,
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": f"vapid t={self.vapid_token(origin)}, k={self.public_key}",
        }
        if opts.topic is not None:
            headers["Topic"] = opts.topic
        return headers

    async def send(self, message: OutboundMessage) -> SendResult:
        import http_ece

        subscription = _parse_subscription(message.to)
        plaintext = self.payload(message)
        if len(plaintext) > MAX_PLAINTEXT:
            raise TechnicalError(
                f"the push message is {len(plaintext)} bytes once encoded; Web Push carries at most "
                f"{MAX_PLAINTEXT}: shorten the title, body or data",
                code="payload-too-large",
            )
        try:
            body: bytes = http_ece.encrypt(
                plaintext,
                private_key=ec.generate_private_key(ec.SECP256R1()),
                dh=subscription.p256dh,
                auth_secret=subscription.auth,
                rs=_RECORD_SIZE,
                version="aes128gcm",
            )
        except Exception:  # http_ece.ECEException or a ValueError from a key that is not on the curve
            raise PermanentError(
                "the Web Push subscription's keys cannot be used for encryption",
                code="invalid-subscription",
                suppress=True,
            ) from None
        if self._transport is None:
            opts = self.settings
            self._transport = HttpTransport(limit=opts.concurrency, timeout_s=opts.timeout.total_seconds())
        response = await self._transport.request(
            "POST", subscription.endpoint, content=body, headers=self.headers(subscription.origin)
        )
        if response.status in _ACCEPTED:
            return SendResult(provider_reference=response.headers.get("Location") or None, parts=1)
        raise _error(response)

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()


def _parse_subscription(to: str) -> _Subscription:
    """The subscription in ``to``; a :class:`PermanentError` that never quotes it when it is unusable."""

    def bad(why: str, *, suppress: bool = True) -> PermanentError:
        return PermanentError(
            f"the Web Push subscription {why}", code="invalid-subscription", suppress=suppress
        )

    try:
        document = json.loads(to)
    except ValueError:
        raise bad(
            "is not JSON: a webpush account sends only to browser subscriptions", suppress=False
        ) from None
    if not isinstance(document, dict):
        raise bad("is not a JSON object", suppress=False)
    endpoint = document.get("endpoint")
    keys = document.get("keys")
    if not isinstance(endpoint, str) or not isinstance(keys, dict):
        raise bad('has no "endpoint" or no "keys"')
    try:
        url = urlsplit(endpoint)
        host = url.hostname
        port = url.port
    except ValueError:
        raise bad('has an "endpoint" that is not a URL') from None
    if not host:
        raise bad('has an "endpoint" that is not a URL')
    if url.scheme != "https" and not (url.scheme == "http" and host in _LOOPBACK):
        raise bad('has an "endpoint" that is not https://: nothing is sent to it in clear')
    origin_host = f"[{host}]" if ":" in host else host
    origin = f"{url.scheme}://{origin_host}"
    if port is not None and port != _DEFAULT_PORTS[url.scheme]:
        origin += f":{port}"
    try:
        p256dh = _b64url_decode(str(keys.get("p256dh", "")))
        auth = _b64url_decode(str(keys.get("auth", "")))
    except (ValueError, binascii.Error):
        raise bad("has keys that are not base64url") from None
    if len(p256dh) != _PUBLIC_POINT_SIZE or p256dh[0] != 4:  # noqa: PLR2004 - 0x04: an uncompressed point
        raise bad('has a "p256dh" key that is not a P-256 public key')
    if len(auth) != _AUTH_SECRET_SIZE:
        raise bad('has an "auth" secret that is not 16 bytes')
    return _Subscription(endpoint, origin, p256dh, auth)


def _error(response: HttpResponse) -> ProviderError:
    status = response.status
    wait = retry_after(response.headers)
    if status in _GONE:
        return PermanentError(
            f"the push service answered HTTP {status}: the subscription has expired or was withdrawn",
            code="gone",
            suppress=True,
        )
    if status == _TOO_LARGE:
        return TechnicalError("the push service answered HTTP 413: the payload is too large", code="413")
    if status == _TOO_MANY:
        return ThrottledError("the push service answered HTTP 429: slow down", code="429", retry_after_s=wait)
    if status in _OUR_REQUEST:
        return TechnicalError(
            f"the push service answered HTTP {status}: it refused our request or VAPID signature; check "
            "vapid_private_key and subject, and that the page subscribed with this account's public key",
            code=str(status),
        )
    if status in _SERVER_ERRORS:
        return TransientError(
            f"the push service answered HTTP {status}", code=str(status), retry_after_s=wait
        )
    return classify_status(status, retry_after_s=wait) or TechnicalError(
        f"the push service answered HTTP {status}", code=str(status)
    )
