"""``fcm``: push notifications through Firebase Cloud Messaging, HTTP v1 API.

One JSON request per message::

    POST {base_url or https://fcm.googleapis.com}/v1/projects/{project_id}/messages:send
    Authorization: Bearer <OAuth2 access token>
    {"message": {"token": ..., "notification": {"title", "body"}, "data": {...}, "android": {...},
                 "apns": {"headers": {...}}, "webpush": {"headers": {...}}}}

authenticated with a Google service account::

    providers:
      push:
        type: fcm
        service_account_file: secrets/firebase-sa.json   # relative to the project folder
        # or: service_account_json: ${FCM_SERVICE_ACCOUNT_JSON}
        project_id: my-project                           # default: the JSON's project_id
        android_priority: high                           # normal | high
        ttl: 1d                                          # how long FCM keeps an undelivered message
        collapse_key: rdv                                # optional

The access token comes from the service-account JWT grant (RFC 7523): a JWT signed RS256 with the
account's private key (``iss`` its ``client_email``, ``scope`` firebase.messaging, ``aud`` the JSON's
``token_uri``, one hour at most) is POSTed form-encoded to ``token_uri``. The token is cached until five
minutes before it expires and shared by every send of the provider instance (one instance per account
per process); one refresh runs at a time. A 401 from FCM drops the cached token and retries that send
once with a fresh one.

A 200 answer's ``name`` (``projects/x/messages/ID``) is the provider reference. An error answer is a
``google.rpc.Status`` whose ``details[].errorCode`` decides (:data:`ERRORS`); ``INVALID_ARGUMENT``
suppresses the token only when the error is about the token, otherwise it is a bug in our payload.
FCM's ``message`` text is never repeated (it can quote the payload), and neither is a token, a title,
a body or a key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import SecretStr, field_validator, model_validator

from smartpush.errors import (
    ConfigError,
    Outcome,
    PermanentError,
    ProviderError,
    TechnicalError,
    ThrottledError,
    TransientError,
    outcome_error,
)
from smartpush.http import HttpProvider, HttpResponse, HttpTransport, classify_status, retry_after
from smartpush.provider import (
    Channel,
    HttpProviderOptions,
    OutboundMessage,
    ProviderOptions,
    SendResult,
)
from smartpush.units import Duration

__all__ = [
    "DEFAULT_BASE_URL",
    "ERRORS",
    "FcmOptions",
    "FcmProvider",
    "ServiceAccount",
    "load_service_account",
]

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://fcm.googleapis.com"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Google accepts assertions valid for one hour at most.
ASSERTION_LIFETIME_S = 3600
#: The cached access token is replaced this long before it expires.
REFRESH_MARGIN_S = 300
#: ``expires_in`` when the token endpoint does not say.
DEFAULT_EXPIRES_IN_S = 3600
#: FCM: "exponential backoff with a minimum initial delay of 1 minute" after QUOTA_EXCEEDED.
QUOTA_MIN_BACKOFF_S = 60.0
#: FCM keeps a message at most four weeks.
MAX_TTL = timedelta(weeks=4)
_FIELD_PATH = re.compile(r"^[A-Za-z0-9_.\[\]]{1,100}$")
_OAUTH_ERROR = re.compile(r"^[a-z_]{1,40}$")


#: FCM ``errorCode`` -> (what it means for us, a text without any token). INVALID_ARGUMENT is decided
#: by :func:`_invalid_argument`: only an error about the token suppresses it.
ERRORS: Mapping[str, tuple[Outcome, str]] = {
    "UNREGISTERED": ("suppress", "the app instance was unregistered from FCM: the token is no longer valid"),
    "SENDER_ID_MISMATCH": ("suppress", "the token belongs to another Firebase project (sender ID mismatch)"),
    "QUOTA_EXCEEDED": ("throttled", "FCM's sending limit was exceeded for this target or project"),
    "UNAVAILABLE": ("transient", "FCM is overloaded"),
    "INTERNAL": ("transient", "FCM had an internal error"),
    "UNSPECIFIED_ERROR": ("transient", "FCM gave no information about the failure"),
    "THIRD_PARTY_AUTH_ERROR": (
        "technical",
        (
            "the APNs certificate or web push key of the Firebase project is invalid or missing: fix it "
            "in the Firebase console (the token is kept)"
        ),
    ),
}


# -- the service account ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, repr=False)
class ServiceAccount:
    """What the JWT grant needs from a service-account JSON; the key never appears in a repr."""

    client_email: str
    private_key: Any  # a cryptography RSAPrivateKey
    token_uri: str
    project_id: str | None

    def __repr__(self) -> str:
        return f"ServiceAccount(client_email={self.client_email!r}, token_uri={self.token_uri!r})"


def load_service_account(text: str | bytes) -> ServiceAccount:
    """Read a service-account JSON; a :class:`ValueError` says what is wrong, never quoting the key."""
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("is not JSON: download the key file from the Google Cloud console") from None
    if not isinstance(document, dict):
        raise ValueError("is not a JSON object")
    kind = document.get("type")
    if kind is not None and kind != "service_account":
        raise ValueError(f"is a '{kind}' credential, not a service account key")
    missing = [name for name in ("client_email", "private_key") if not isinstance(document.get(name), str)]
    if missing:
        raise ValueError(f"has no {' or '.join(missing)}")
    try:
        key = load_pem_private_key(document["private_key"].encode(), password=None)
    except (ValueError, TypeError):
        raise ValueError("has a private_key that is not an unencrypted PEM private key") from None
    if not isinstance(key, RSAPrivateKey):
        raise ValueError("has a private_key that is not an RSA key")
    token_uri = document.get("token_uri") or DEFAULT_TOKEN_URI
    if not isinstance(token_uri, str) or not re.match(r"^https?://[^\s/]+", token_uri):
        raise ValueError("has a token_uri that is not an http(s) URL")
    project = document.get("project_id")
    return ServiceAccount(
        client_email=document["client_email"],
        private_key=key,
        token_uri=token_uri,
        project_id=project if isinstance(project, str) and project else None,
    )


# -- options ------------------------------------------------------------------------------------------


class FcmOptions(HttpProviderOptions):
    """An ``fcm`` account: the service account, the project and how messages are delivered."""

    #: Path to the service-account JSON, relative to the project folder.
    service_account_file: str | None = None
    #: The service-account JSON itself, e.g. ``${FCM_SERVICE_ACCOUNT_JSON}``.
    service_account_json: SecretStr | None = None
    #: The Firebase project; default: the JSON's ``project_id``.
    project_id: str | None = None
    android_priority: Literal["normal", "high"] = "high"
    #: How long FCM keeps a message for an offline device (0 to 4 weeks).
    ttl: Duration = timedelta(days=1)
    #: Messages with the same key replace each other on a device that has not received them yet.
    collapse_key: str | None = None

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, value: timedelta) -> timedelta:
        if value < timedelta(0) or value > MAX_TTL:
            raise ValueError("ttl must be between 0 and 4 weeks (28d)")
        return value

    @field_validator("project_id")
    @classmethod
    def _project(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[a-z][a-z0-9-]{4,61}[a-z0-9]$", value):
            raise ValueError("project_id is the Firebase project ID (lower-case letters, digits and '-')")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> FcmOptions:
        if (self.service_account_file is None) == (self.service_account_json is None):
            raise ValueError("give either service_account_file or service_account_json (exactly one of them)")
        return self


# -- the access token ---------------------------------------------------------------------------------


class _AccessTokens:
    """The OAuth2 access token of one service account, cached and refreshed one fetch at a time."""

    def __init__(
        self,
        account: ServiceAccount,
        transport: Callable[[], HttpTransport],
        clock: Callable[[], float],
    ) -> None:
        self._account = account
        self._transport = transport
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        #: Fetches finished, and the error of the last one if it failed.
        self._done = 0
        self._failure: ProviderError | None = None
        #: Tokens fetched so far (for logs and tests).
        self.fetched = 0

    def _valid(self) -> str | None:
        if self._token is not None and self._clock() < self._expires_at:
            return self._token
        return None

    def _the_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def get(self) -> str:
        token = self._valid()
        if token is not None:
            return token
        seen = self._done
        async with self._the_lock():
            token = self._valid()
            if token is not None:
                return token
            if self._done != seen and self._failure is not None:
                # the fetch this task waited for failed: don't queue another one behind it
                raise _again(self._failure)
            try:
                token, expires_in = await self._fetch()
            except ProviderError as exc:
                self._failure = exc
                raise
            finally:
                self._done += 1
            self._failure = None
            margin = REFRESH_MARGIN_S if expires_in > 2 * REFRESH_MARGIN_S else expires_in / 2
            self._token, self._expires_at = token, self._clock() + expires_in - margin
            self.fetched += 1
            return token

    def invalidate(self, token: str) -> None:
        """Forget ``token`` if it is still the cached one (FCM refused it)."""
        if self._token == token:
            self._token = None

    def assertion(self) -> str:
        import jwt

        now = int(time.time())
        claims = {
            "iss": self._account.client_email,
            "scope": SCOPE,
            "aud": self._account.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
        }
        return jwt.encode(claims, self._account.private_key, algorithm="RS256")

    async def _fetch(self) -> tuple[str, float]:
        response = await self._transport().request(
            "POST",
            self._account.token_uri,
            data={"grant_type": GRANT_TYPE, "assertion": self.assertion()},
            headers={"Accept": "application/json"},
        )
        if response.status == HTTPStatus.OK:
            return _token_answer(response)
        raise _token_error(response)


def _token_answer(response: HttpResponse) -> tuple[str, float]:
    try:
        document = response.json()
    except TechnicalError:
        raise TechnicalError("the OAuth token endpoint answered 200 without JSON", code="oauth") from None
    token = document.get("access_token") if isinstance(document, dict) else None
    if not isinstance(token, str) or not token:
        raise TechnicalError("the OAuth token endpoint gave no access_token", code="oauth")
    expires_in = document.get("expires_in", DEFAULT_EXPIRES_IN_S)
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN_S
    return token, float(expires_in)


def _token_error(response: HttpResponse) -> ProviderError:
    status = response.status
    wait = retry_after(response.headers)
    code = f"oauth-{status}"
    if status == HTTPStatus.TOO_MANY_REQUESTS or status >= HTTPStatus.INTERNAL_SERVER_ERROR:
        return TransientError(
            f"the OAuth token endpoint answered HTTP {status}", code=code, retry_after_s=wait
        )
    reason = ""
    try:
        document = response.json() if response.body else None
    except TechnicalError:
        document = None
    found = document.get("error") if isinstance(document, dict) else None
    if isinstance(found, str) and _OAUTH_ERROR.match(found):
        reason = f" ({found})"
    return TechnicalError(
        f"the OAuth token endpoint refused the service account{reason}: check the key file, that the key "
        "is not revoked and that the account may send with Firebase Cloud Messaging",
        code=code,
    )


def _again(error: ProviderError) -> ProviderError:
    """A fresh copy of a token-fetch error, for another task that waited on the same fetch."""
    if isinstance(error, PermanentError):  # never raised for a fetch; kept for completeness
        return PermanentError(error.detail, code=error.code, suppress=error.suppress)
    return type(error)(error.detail, code=error.code, retry_after_s=error.retry_after_s)


# -- the driver ---------------------------------------------------------------------------------------


class FcmProvider(HttpProvider):
    """Sends push notifications through FCM HTTP v1; see the module docstring.

    Context: ``project_dir`` (where ``service_account_file`` is read from) and, for tests, ``clock``
    (a monotonic clock in seconds that decides when the access token is refreshed).
    """

    channels: ClassVar[frozenset[Channel]] = frozenset({Channel.PUSH})
    Options: ClassVar[type[ProviderOptions]] = FcmOptions

    def __init__(self, account: str, options: ProviderOptions, **context: Any) -> None:
        super().__init__(account, options, **context)
        if not isinstance(options, FcmOptions):
            raise TypeError("FcmProvider needs FcmOptions")
        self.settings = options
        self.service_account = self._load(options, Path(context.get("project_dir", ".")))
        project = options.project_id or self.service_account.project_id
        if project is None:
            raise ConfigError(
                f"account {account}: give project_id: the service account JSON does not name a project"
            )
        self.project_id = project
        base = (options.base_url or DEFAULT_BASE_URL).rstrip("/")
        self.url = f"{base}/v1/projects/{project}/messages:send"
        clock = context.get("clock", time.monotonic)
        self.tokens = _AccessTokens(self.service_account, self._client, clock)

    def _load(self, options: FcmOptions, base: Path) -> ServiceAccount:
        if options.service_account_json is not None:
            option, text = "service_account_json", options.service_account_json.get_secret_value()
            where = option
        else:
            assert options.service_account_file is not None  # noqa: S101 - the validator guarantees it
            option, path = "service_account_file", base / options.service_account_file
            where = f"{option} {path}"
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError(f"account {self.account}: cannot read {where}: {reason}") from None
        try:
            return load_service_account(text)
        except ValueError as exc:
            raise ConfigError(f"account {self.account}: {where} {exc}") from None

    def payload(self, message: OutboundMessage) -> dict[str, Any]:
        """The JSON object sent for ``message``."""
        opts = self.settings
        ttl_s = int(opts.ttl.total_seconds())
        high = opts.android_priority == "high"
        fcm: dict[str, Any] = {"token": message.to}
        notification = {k: v for k, v in (("title", message.title), ("body", message.body)) if v}
        if notification:
            fcm["notification"] = notification
        if message.data:
            fcm["data"] = {str(k): str(v) for k, v in message.data.items()}
        android: dict[str, Any] = {"priority": opts.android_priority, "ttl": f"{ttl_s}s"}
        apns_headers = {"apns-priority": "10" if high else "5"}
        if opts.collapse_key is not None:
            android["collapse_key"] = opts.collapse_key
            apns_headers["apns-collapse-id"] = opts.collapse_key
        fcm["android"] = android
        fcm["apns"] = {"headers": apns_headers}
        fcm["webpush"] = {"headers": {"TTL": str(ttl_s), "Urgency": "high" if high else "normal"}}
        return {"message": fcm}

    async def send(self, message: OutboundMessage) -> SendResult:
        body = self.payload(message)
        token = await self.tokens.get()
        response = await self._post(body, token)
        if response.status == HTTPStatus.UNAUTHORIZED and _details(response)[0] is None:
            # the access token was refused (revoked, clock skew): one fresh token, one more try
            log.info(
                "account %s: FCM refused the OAuth credential; fetching a new one",
                self.account,
                extra={"provider": self.account, "outcome": "credential-refused"},
            )
            self.tokens.invalidate(token)
            response = await self._post(body, await self.tokens.get())
        if 200 <= response.status < 300:  # noqa: PLR2004 - the 2xx range
            return _accepted(response)
        raise _error(response)

    async def _post(self, body: dict[str, Any], token: str) -> HttpResponse:
        return await self._client().request(
            "POST",
            self.url,
            json=body,
            headers={"Accept": "application/json", "Authorization": f"Bearer {token}"},
        )


def _accepted(response: HttpResponse) -> SendResult:
    try:
        document = response.json()
    except TechnicalError:  # accepted all the same: only the reference is lost
        return SendResult()
    name = document.get("name") if isinstance(document, dict) else None
    return SendResult(provider_reference=name if isinstance(name, str) else None)


@dataclass(frozen=True, slots=True)
class _Violations:
    fields: tuple[str, ...] = ()
    about_token: bool = False


def _details(response: HttpResponse) -> tuple[str | None, _Violations]:
    """The FCM errorCode of an error answer and what its field violations say, without any text."""
    if not response.body:
        return None, _Violations()
    try:
        document = response.json()
    except TechnicalError:  # an HTML page from a proxy: the status alone decides
        return None, _Violations()
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return None, _Violations()
    code: str | None = None
    fields: list[str] = []
    about_token = False
    details = error.get("details")
    for item in details if isinstance(details, list) else []:
        if not isinstance(item, dict):
            continue
        found = item.get("errorCode")
        if isinstance(found, str) and code is None:
            code = found
        violations = item.get("fieldViolations")
        for violation in violations if isinstance(violations, list) else []:
            field = violation.get("field") if isinstance(violation, dict) else None
            if isinstance(field, str) and _FIELD_PATH.match(field):
                fields.append(field)
                about_token = about_token or field == "message.token"
            text = violation.get("description") if isinstance(violation, dict) else None
            about_token = about_token or _says_invalid_token(text)
    about_token = about_token or _says_invalid_token(error.get("message"))
    return code, _Violations(tuple(fields), about_token)


def _says_invalid_token(text: Any) -> bool:
    return isinstance(text, str) and "registration token is not a valid" in text.lower()


def _error(response: HttpResponse) -> ProviderError:
    status = response.status
    wait = retry_after(response.headers)
    code, violations = _details(response)
    if code == "INVALID_ARGUMENT" or (code is None and status == HTTPStatus.BAD_REQUEST):
        return _invalid_argument(code or str(status), violations)
    if code is not None and code in ERRORS:
        kind, text = ERRORS[code]
        if kind == "throttled" and wait is None:
            wait = QUOTA_MIN_BACKOFF_S  # FCM's documented minimum initial backoff
        return outcome_error(kind, text, code=code, retry_after_s=wait)
    detail = f"FCM answered HTTP {status}" + (f" with error {code}" if code else "")
    if status == HTTPStatus.UNAUTHORIZED:
        return TechnicalError(
            f"{detail}: a fresh access token was refused too; check the service account", code=code or "401"
        )
    if status == HTTPStatus.NOT_FOUND:
        return TechnicalError(f"{detail}: check project_id and base_url", code=code or str(status))
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        return ThrottledError(detail, code=code or str(status), retry_after_s=wait or QUOTA_MIN_BACKOFF_S)
    error = classify_status(status, retry_after_s=wait, code=code, detail=detail)
    return error or TechnicalError(f"{detail} on an error path", code=code or str(status))


def _invalid_argument(code: str, violations: _Violations) -> ProviderError:
    if violations.about_token:
        return PermanentError("FCM says the registration token is not valid", code=code, suppress=True)
    where = f" ({', '.join(violations.fields)})" if violations.fields else ""
    return TechnicalError(
        f"FCM rejected the message as invalid{where}: the payload or the account options are wrong, "
        "not the token",
        code=code,
    )
