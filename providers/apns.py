"""``apns``: push notifications through the Apple Push Notification service (HTTP/2, token auth).

One HTTP/2 stream per notification, all multiplexed on one long-lived connection::

    POST {base_url or https://api.push.apple.com}/3/device/{device token}
    authorization: bearer <ES256 JWT>
    apns-topic: fr.example.app          apns-push-type: alert          apns-priority: 10
    apns-expiration: <now + expiration>  apns-id: <UUID from the message id>  [apns-collapse-id]

    {"aps": {"alert": {"title": ..., "body": ...}, "sound": "default"}, ...data}

The account::

    providers:
      apns:
        type: apns
        team_id: ABCDE12345
        key_id: KEY1234567
        private_key_file: keys/AuthKey_KEY1234567.p8   # relative to the project folder
        topic: fr.example.app                          # the app's bundle id
        environment: production                        # or sandbox
        expiration: 1d

APNs speaks HTTP/2 only, so this driver uses httpx with HTTP/2 (HTTP/1.1 is switched off, the driver
never falls back to it) instead of the aiohttp transport of the other HTTP drivers.

The provider token is a JWT signed with the team's .p8 key: header ``{alg: ES256, kid: key_id}``,
claims ``{iss: team_id, iat}``. Apple rejects tokens older than an hour and answers
``TooManyProviderTokenUpdates`` to a provider that makes new ones more than once every 20 minutes, so
one token is made, reused by every request and connection, and replaced once it is
:data:`TOKEN_REFRESH_AFTER` old. A ``403 ExpiredProviderToken`` replaces it at once (only once, however
many requests saw it) and the notification is sent again, once.

Answers: 200 is accepted, the ``apns-id`` header is the provider reference. An error answer is
``{"reason": ...}`` and the reason decides (:data:`REASONS`); an unknown reason falls back to
:func:`smartpush.http.classify_status` on the status. httpx failures are translated by
:func:`transport_error`. No error text ever contains the device token, the payload or the key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import SecretStr, field_validator, model_validator

from smartpush.errors import (
    ConfigError,
    Outcome,
    PermanentError,
    ProviderError,
    TechnicalError,
    TransientError,
    outcome_error,
)
from smartpush.http import classify_status, retry_after
from smartpush.provider import (
    Channel,
    HttpProviderOptions,
    OutboundMessage,
    Provider,
    ProviderOptions,
    SendResult,
)
from smartpush.units import Duration

__all__ = [
    "PRODUCTION_URL",
    "REASONS",
    "SANDBOX_URL",
    "TOKEN_REFRESH_AFTER",
    "ApnsOptions",
    "ApnsProvider",
    "ProviderToken",
    "apns_id",
    "error_for",
    "transport_error",
]

log = logging.getLogger(__name__)

PRODUCTION_URL = "https://api.push.apple.com"
SANDBOX_URL = "https://api.sandbox.push.apple.com"
#: A provider token is replaced once this old: Apple refuses new tokens more often than every 20 minutes
#: and tokens older than 60 minutes.
TOKEN_REFRESH_AFTER = timedelta(minutes=20)
#: Apple's payload limits in bytes: every push type but VoIP, and VoIP.
PAYLOAD_LIMIT = 4096
VOIP_PAYLOAD_LIMIT = 5120
#: ``apns-collapse-id`` may not exceed 64 bytes.
COLLAPSE_ID_LIMIT = 64
#: The namespace apns-id UUIDs are derived in from message ids that are not UUIDs already.
APNS_ID_NAMESPACE = uuid.UUID("6f0c1a52-4c5e-5b3a-9d1e-7a9b2c3d4e5f")

_TEN_CHARS = re.compile(r"^[A-Z0-9]{10}$")
_BUNDLE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]*$")
_DEVICE_TOKEN = re.compile(r"^[0-9A-Fa-f]{64,200}$")

PushType = Literal[
    "alert",
    "background",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "location",
    "liveactivity",
    "pushtotalk",
]

# -- errors -------------------------------------------------------------------------------------------


#: Apple's ``reason`` -> (what it means for us, a text without any token).
REASONS: Mapping[str, tuple[Outcome, str]] = {
    # the device token is dead: permanent, and the token goes on the suppression list
    "BadDeviceToken": (
        "suppress",
        "the device token is invalid, or belongs to the other environment (sandbox vs production)",
    ),
    "DeviceTokenNotForTopic": ("suppress", "the device token does not belong to this topic (bundle id)"),
    "Unregistered": ("suppress", "the device token is no longer active for this topic"),
    "ExpiredToken": ("suppress", "the device token has expired"),
    # our request is wrong: fix the account or the template
    "BadCollapseId": ("technical", "apns-collapse-id is longer than 64 bytes"),
    "BadExpirationDate": ("technical", "apns-expiration is not a valid date"),
    "BadMessageId": ("technical", "apns-id is not a valid UUID"),
    "BadPriority": ("technical", "apns-priority is not allowed (use 10, or 5 for background pushes)"),
    "BadTopic": ("technical", "apns-topic is invalid: check topic"),
    "DuplicateHeaders": ("technical", "a header was sent twice"),
    "InvalidPushType": ("technical", "apns-push-type is not valid: check push_type"),
    "MissingDeviceToken": ("technical", "the request has no device token"),
    "MissingTopic": ("technical", "apns-topic is missing: set topic"),
    "PayloadEmpty": ("technical", "the payload is empty"),
    "TopicDisallowed": ("technical", "pushes to this topic are not allowed: check topic"),
    "BadPath": ("technical", "the request path is wrong: check base_url"),
    "MethodNotAllowed": ("technical", "APNs only accepts POST"),
    "PayloadTooLarge": ("technical", "the payload is larger than APNs accepts: shorten the template or data"),
    # our credentials are refused
    "BadCertificate": ("technical", "the certificate is invalid"),
    "BadCertificateEnvironment": ("technical", "the certificate is for the other environment"),
    "ExpiredProviderToken": (
        "technical",
        "the provider token is stale even after a refresh: check the clock",
    ),
    "Forbidden": ("technical", "APNs refused the request: check team_id, key_id and the key's rights"),
    "InvalidProviderToken": (
        "technical",
        "the provider token is invalid: check team_id, key_id, private_key and topic",
    ),
    "MissingProviderToken": ("technical", "no provider token was sent"),
    "UnrelatedKeyIdInToken": ("technical", "key_id does not belong to this team"),
    # slow down
    "TooManyRequests": ("throttled", "too many notifications to this device token: slow down"),
    "TooManyProviderTokenUpdates": (
        "throttled",
        "the provider token was replaced too often (is the key shared with another sender?)",
    ),
    # may pass
    "IdleTimeout": ("transient", "the connection was idle too long"),
    "InternalServerError": ("transient", "APNs had an internal error"),
    "ServiceUnavailable": ("transient", "APNs is unavailable"),
    "Shutdown": ("transient", "the APNs server is shutting down"),
}


def error_for(
    reason: str | None, status: int, retry_after_s: float | None, timestamp: int | None = None
) -> ProviderError:
    """The provider error an APNs answer with ``reason`` and HTTP ``status`` stands for."""
    if reason is None or reason not in REASONS:
        detail = f"APNs answered HTTP {status}" + (f" with reason {reason}" if reason else "")
        error = classify_status(status, retry_after_s=retry_after_s, code=reason, detail=detail)
        return error or TechnicalError(f"{detail} on an error path", code=reason or str(status))
    kind, text = REASONS[reason]
    if kind == "suppress" and timestamp is not None:
        since = datetime.fromtimestamp(timestamp / 1000, UTC).isoformat(timespec="seconds")
        text = f"{text} (since {since})"
    return outcome_error(kind, text, code=reason, retry_after_s=retry_after_s)


def _is_tls(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError | ssl.CertificateError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def transport_error(
    exc: BaseException, host: str = "APNs", timeout_s: float | None = None
) -> ProviderError | None:
    """The provider error an httpx (or socket) failure stands for; ``None`` for anything else.

    Timeouts and broken connections may pass (:class:`TransientError`); TLS failures, malformed requests
    and anything httpx adds later are ours (:class:`TechnicalError`). Texts name the exception class
    only: httpx messages may quote the URL, and the URL holds the device token.
    """
    name = type(exc).__name__
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        within = f" within {timeout_s:g}s" if timeout_s is not None else " in time"
        return TransientError(f"{host} did not answer{within} ({name})", code="timeout")
    if _is_tls(exc):
        return TechnicalError(
            f"TLS with {host} failed ({name}): check base_url, ca_file and the server's certificate",
            code="tls",
        )
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError | OSError):
        return TransientError(f"the connection to {host} failed ({name})", code="connection")
    if isinstance(exc, httpx.ProxyError):
        return TechnicalError(f"the proxy refused the connection to {host} ({name})", code="proxy")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return TechnicalError("the URL is not a valid https address: check base_url", code="invalid-url")
    if isinstance(exc, httpx.TooManyRedirects):
        return TechnicalError(f"{host} redirected the request: check base_url", code="redirect")
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return classify_status(status, retry_after_s=None) or TechnicalError(
            f"unexpected answer from {host} (HTTP {status})", code=str(status)
        )
    if isinstance(exc, httpx.HTTPError | httpx.StreamError | httpx.CookieConflict):
        # LocalProtocolError, DecodingError, a subclass added by a later httpx
        return TechnicalError(f"unexpected HTTP client error ({name})", code="client")
    if isinstance(exc, ValueError | TypeError):
        return TechnicalError(f"the request could not be built ({name})", code="request")
    return None


# -- options ------------------------------------------------------------------------------------------


class ApnsOptions(HttpProviderOptions):
    """An ``apns`` account: the team's signing key, the app, the environment and the push defaults."""

    #: The 10-character Team ID of the Apple developer account (the JWT's ``iss``).
    team_id: str
    #: The 10-character Key ID of the .p8 key (the JWT's ``kid``).
    key_id: str
    #: The .p8 key file, relative to the project folder; or give ``private_key`` (PEM text) instead.
    private_key_file: str | None = None
    private_key: SecretStr | None = None
    #: The app's bundle id (``apns-topic``).
    topic: str
    environment: Literal["production", "sandbox"] = "production"
    push_type: PushType = "alert"
    #: 10: deliver now; 5: power-considerate (required for background pushes).
    priority: Literal[5, 10] = 10
    #: How long APNs keeps trying to deliver (``apns-expiration`` = now + expiration; 0 = once, now).
    expiration: Duration = timedelta(days=1)
    #: Sent as ``apns-collapse-id``: newer notifications replace older ones with the same id.
    collapse_id: str | None = None
    #: A CA bundle (relative to the project folder) to trust instead of the system's; for tests.
    ca_file: str | None = None
    verify_tls: bool = True

    @field_validator("team_id", "key_id")
    @classmethod
    def _ten_chars(cls, value: str) -> str:
        if not _TEN_CHARS.match(value):
            raise ValueError(
                "team_id and key_id are 10 capital letters and digits (see the developer account)"
            )
        return value

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if not _BUNDLE_ID.match(value):
            raise ValueError("topic is the app's bundle id, e.g. fr.example.app")
        return value

    @field_validator("collapse_id")
    @classmethod
    def _collapse_id(cls, value: str | None) -> str | None:
        if value is not None and (not value or len(value.encode()) > COLLAPSE_ID_LIMIT or "\n" in value):
            raise ValueError("collapse_id is one line of 1 to 64 bytes")
        return value

    @field_validator("expiration")
    @classmethod
    def _expiration(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("expiration cannot be negative")
        return value

    @model_validator(mode="after")
    def _key_and_priority(self) -> ApnsOptions:
        if (self.private_key_file is None) == (self.private_key is None):
            raise ValueError("give either private_key_file or private_key (exactly one of them)")
        if self.push_type == "background" and self.priority != 5:  # noqa: PLR2004 - Apple's rule
            raise ValueError("background pushes must use priority 5")
        return self

    @property
    def url(self) -> str:
        """The APNs host (or ``base_url``), without a trailing slash."""
        default = PRODUCTION_URL if self.environment == "production" else SANDBOX_URL
        return (self.base_url or default).rstrip("/")


# -- the provider token -------------------------------------------------------------------------------


class ProviderToken:
    """The JWT every request carries: made once, shared, replaced every :data:`TOKEN_REFRESH_AFTER`."""

    def __init__(
        self, key: ec.EllipticCurvePrivateKey, *, key_id: str, team_id: str, clock: Callable[[], float]
    ) -> None:
        self._key = key
        self._key_id = key_id
        self._team_id = team_id
        self._clock = clock
        self._token: str | None = None
        self._issued_at = 0.0
        #: Tokens made so far (for logs and tests).
        self.generated = 0

    def current(self) -> str:
        """The token to send now; a new one only when the current one is old enough to be replaced."""
        if self._token is None or self._clock() - self._issued_at >= TOKEN_REFRESH_AFTER.total_seconds():
            return self._make()
        return self._token

    def refresh(self, stale: str) -> str:
        """Replace ``stale`` after APNs called it expired, unless another request already did."""
        if self._token == stale:
            return self._make()
        return self.current()

    def _make(self) -> str:
        now = self._clock()
        self._token = jwt.encode(
            {"iss": self._team_id, "iat": int(now)},
            self._key,
            algorithm="ES256",
            headers={"kid": self._key_id},
        )
        self._issued_at = now
        self.generated += 1
        log.info(
            "new APNs provider JWT for key id %s",
            self._key_id,
            extra={"outcome": "new-credential"},
        )
        return self._token


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """The P-256 key of a .p8 file; a :class:`ValueError` that never quotes the key otherwise."""
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ValueError("it is not an unencrypted PEM private key (a .p8 file from Apple)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("it is not an EC P-256 key: APNs keys are ES256 keys")
    return key


def apns_id(message_id: str) -> str:
    """The canonical UUID sent as ``apns-id``: the message id itself if it is one, else a UUID5 of it."""
    try:
        return str(uuid.UUID(message_id))
    except ValueError:
        return str(uuid.uuid5(APNS_ID_NAMESPACE, message_id))


# -- the driver ---------------------------------------------------------------------------------------


class ApnsProvider(Provider):
    """Sends push notifications to Apple devices over HTTP/2; see the module docstring.

    Context: ``project_dir`` (where ``private_key_file`` and ``ca_file`` are read from), ``clock``
    (seconds since the epoch, for tests) and ``transport`` (an ``httpx.AsyncBaseTransport``, for tests).
    """

    channels: ClassVar[frozenset[Channel]] = frozenset({Channel.PUSH})
    Options: ClassVar[type[ProviderOptions]] = ApnsOptions

    def __init__(self, account: str, options: ProviderOptions, **context: Any) -> None:
        super().__init__(account, options, **context)
        if not isinstance(options, ApnsOptions):
            raise TypeError("ApnsProvider needs ApnsOptions")
        self.settings = options
        self._base = Path(context.get("project_dir", "."))
        self._clock: Callable[[], float] = context.get("clock", time.time)
        self._transport: httpx.AsyncBaseTransport | None = context.get("transport")
        self.url = options.url
        self._host = httpx.URL(self.url).host or "APNs"
        self.tokens = ProviderToken(
            self._read_key(), key_id=options.key_id, team_id=options.team_id, clock=self._clock
        )
        # Made on the first send, on the running loop: the instance is built before any loop runs.
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _read_key(self) -> ec.EllipticCurvePrivateKey:
        opts = self.settings
        if opts.private_key is not None:
            where, pem = "private_key", opts.private_key.get_secret_value().encode()
        else:
            assert opts.private_key_file is not None  # noqa: S101 - the model validator guarantees it
            path = self._base / opts.private_key_file
            where = f"private_key_file {path}"
            try:
                pem = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"account {self.account}: cannot read {where}: {exc.strerror}") from None
        try:
            return load_key(pem)
        except ValueError as exc:
            raise ConfigError(f"account {self.account}: {where}: {exc}") from None

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # A client belongs to the loop it was made on; a new loop (a new asyncio.run) gets its own.
            opts = self.settings
            self._loop = loop
            self._client = httpx.AsyncClient(
                http1=False,
                http2=True,
                verify=self._tls_context(),
                limits=httpx.Limits(
                    max_connections=opts.concurrency, max_keepalive_connections=opts.concurrency
                ),
                timeout=httpx.Timeout(opts.timeout.total_seconds(), pool=None),
                transport=self._transport,
                follow_redirects=False,
                trust_env=False,
            )
        return self._client

    def _tls_context(self) -> ssl.SSLContext | bool:
        opts = self.settings
        if not opts.verify_tls:
            return False
        cafile = str(self._base / opts.ca_file) if opts.ca_file else None
        return ssl.create_default_context(cafile=cafile)

    def headers(self, message: OutboundMessage, token: str) -> dict[str, str]:
        """The request headers for ``message``, signed with provider ``token``."""
        opts = self.settings
        expiration = opts.expiration.total_seconds()
        headers = {
            "authorization": f"bearer {token}",
            "apns-topic": opts.topic,
            "apns-push-type": opts.push_type,
            "apns-priority": str(opts.priority),
            "apns-expiration": str(int(self._clock() + expiration)) if expiration else "0",
            "apns-id": apns_id(message.message_id),
        }
        if opts.collapse_id is not None:
            headers["apns-collapse-id"] = opts.collapse_id
        return headers

    def payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The JSON payload: ``aps`` built from the message, the message's data beside it."""
        aps: dict[str, Any]
        if self.settings.push_type == "background":
            aps = {"content-available": 1}
        else:
            alert: dict[str, str] = {"body": message.body}
            if message.title:
                alert = {"title": message.title, **alert}
            aps = {"alert": alert, "sound": "default"}
        return {**message.data, "aps": aps}

    async def send(self, message: OutboundMessage) -> SendResult:
        if not _DEVICE_TOKEN.match(message.to):
            raise PermanentError("the device token is not a hexadecimal APNs token", code="invalid-token")
        body = json.dumps(self.payload(message), ensure_ascii=False, separators=(",", ":")).encode()
        limit = VOIP_PAYLOAD_LIMIT if self.settings.push_type == "voip" else PAYLOAD_LIMIT
        if len(body) > limit:
            raise TechnicalError(
                f"the payload is {len(body)} bytes, APNs accepts {limit}: shorten the template or data",
                code="PayloadTooLarge",
            )
        token = self.tokens.current()
        response = await self._post(message, token, body)
        if response.status_code == httpx.codes.FORBIDDEN and _reason(response) == "ExpiredProviderToken":
            token = self.tokens.refresh(token)
            response = await self._post(message, token, body)
        if response.status_code == httpx.codes.OK:
            return SendResult(provider_reference=response.headers.get("apns-id"))
        raise _error(response)

    async def _post(self, message: OutboundMessage, token: str, body: bytes) -> httpx.Response:
        url = f"{self.url}/3/device/{message.to}"
        try:
            return await self._http().post(url, content=body, headers=self.headers(message, token))
        except Exception as exc:  # every transport failure becomes a provider error here
            error = transport_error(exc, self._host, self.settings.timeout.total_seconds())
            if error is None:
                raise
            raise error from None

    async def close(self) -> None:
        client, self._client, self._loop = self._client, None, None
        if client is not None:
            await client.aclose()


def _document(response: httpx.Response) -> dict[str, Any]:
    try:
        document = json.loads(response.content) if response.content else None
    except ValueError:  # an HTML page from a proxy: the status alone decides
        return {}
    return document if isinstance(document, dict) else {}


def _reason(response: httpx.Response) -> str | None:
    reason = _document(response).get("reason")
    return reason if isinstance(reason, str) else None


def _error(response: httpx.Response) -> ProviderError:
    timestamp = _document(response).get("timestamp")
    stamp = timestamp if isinstance(timestamp, int) and not isinstance(timestamp, bool) else None
    return error_for(_reason(response), response.status_code, retry_after(response.headers), stamp)
