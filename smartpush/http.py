"""One small HTTP transport for the drivers that speak HTTP, and the default HTTP error policy.

:class:`HttpTransport` keeps one aiohttp ``ClientSession`` per event loop (keep-alive, a connection
limit, a timeout per request) and translates every aiohttp and asyncio failure into the provider error
tree at this edge, so drivers only ever see :class:`~smartpush.errors.ProviderError` subclasses.
:func:`classify_status` is the status policy drivers share; :func:`retry_after` reads ``Retry-After``.

aiohttp, not httpx: httpx's pool collapses under concurrency on our machines (258 req/s at 64 in
flight against aiohttp's ~8,900, see research/http-clients.md). aiohttp is imported on the first
request, so loading a configuration that names an HTTP driver stays cheap.
"""

from __future__ import annotations

import asyncio
import base64
import json as _json
import logging
import math
import re
import ssl
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import cache, lru_cache
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import PermanentError, ProviderError, TechnicalError, ThrottledError, TransientError
from .provider import Provider

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

__all__ = [
    "HttpProvider",
    "HttpResponse",
    "HttpTransport",
    "classify_status",
    "provider_error",
    "retry_after",
]

log = logging.getLogger(__name__)

#: Connections kept open per transport (one transport per provider account and worker process).
DEFAULT_LIMIT = 100
#: Seconds one request may take once it holds a connection slot; waiting for a slot is not counted.
DEFAULT_TIMEOUT_S = 30.0
#: Idle keep-alive connections are closed after this; providers' load balancers usually allow 60 s.
KEEPALIVE_S = 30.0
#: HTTP statuses that say "try again later" (RFC 9110 and RFC 8470 for 425 Too Early).
_TRANSIENT = frozenset({408, 425, 500, 502, 503, 504})
_CHARSET = re.compile(r"charset=\"?([\w.:-]+)", re.IGNORECASE)
_DELTA_SECONDS = re.compile(r"^\d+(?:\.\d+)?$")


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A provider's complete answer; ``headers`` looks names up case-insensitively."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON; a :class:`TechnicalError` when it is not JSON."""
        try:
            return _json.loads(self.body)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            raise TechnicalError("the provider answered with invalid JSON", code="invalid-json") from None

    def text(self) -> str:
        """The body as text, in the charset the provider declared (UTF-8 otherwise)."""
        match = _CHARSET.search(self.headers.get("Content-Type", ""))
        charset = match.group(1) if match else "utf-8"
        try:
            return self.body.decode(charset, errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")


@dataclass(slots=True)
class _LoopSession:
    session: aiohttp.ClientSession
    #: Holds requests beyond ``limit`` before they start, so their timeout runs only while they send.
    slots: asyncio.Semaphore
    #: Closes the session when the loop shuts its async generators down (what ``asyncio.run`` does).
    keeper: AsyncGenerator[None, None]


class HttpTransport:
    """Long-lived aiohttp ``ClientSession`` per event loop: keep-alive, a connection limit, timeouts.

    Create it anywhere (it does nothing until the first request) and share it between the coroutines of
    one loop. At most ``limit`` requests are in flight; the rest wait their turn, and ``timeout_s``
    counts from when a request gets its turn, never while it waits. Redirects are not followed (an API
    that redirects has moved: fix ``base_url``), cookies are not kept, and proxies are used only when
    given as ``proxy`` (reading the environment would cost two thread hops per request in aiohttp).

    Call :meth:`close` before the loop ends; if you forget, ``asyncio.run`` closes the session on its
    way out. Errors raised by :meth:`request` are always :class:`~smartpush.errors.ProviderError`
    subclasses (see :func:`provider_error`); an HTTP error status is not an error here: the caller
    reads :attr:`HttpResponse.status` and applies :func:`classify_status` or its own policy.
    """

    def __init__(
        self,
        *,
        limit: int = DEFAULT_LIMIT,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        user_agent: str = f"smartpush/{__version__}",
        proxy: str | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        self.limit = limit
        self.timeout_s = timeout_s
        self.user_agent = user_agent
        self.proxy = proxy
        self._loops: dict[asyncio.AbstractEventLoop, _LoopSession] = {}

    async def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        data: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
    ) -> HttpResponse:
        """Send one request and read the whole answer.

        ``json`` is sent as compact UTF-8 JSON, ``data`` as a form, ``content`` as raw bytes (set its
        Content-Type in ``headers``); ``auth`` is HTTP Basic (UTF-8). Raises
        :class:`TransientError` (``timeout``, ``connection``, ``dns``), :class:`TechnicalError`
        (``tls``, ``invalid-url``, ``request``...) and never includes the request body in a message.
        """
        import aiohttp

        target = _parse_url(url)
        if target is None:
            raise TechnicalError("the URL is not a valid http(s) address; check base_url", code="invalid-url")
        send_headers = dict(headers) if headers else {}
        body: bytes | aiohttp.FormData | None = None
        if json is not None:
            try:
                body = _json.dumps(json, ensure_ascii=False, separators=(",", ":")).encode()
            except (TypeError, ValueError):
                raise TechnicalError("the request could not be encoded as JSON", code="request") from None
            send_headers.setdefault("Content-Type", "application/json")
        elif data is not None:
            body = aiohttp.FormData(dict(data))
        elif content is not None:
            body = content
        if auth is not None:
            if any(name.lower() == "authorization" for name in send_headers):
                raise TechnicalError("give either auth or an Authorization header, not both", code="request")
            send_headers["Authorization"] = _basic_auth(*auth)

        state = await self._loop_session()
        async with state.slots:
            try:
                async with state.session.request(
                    method,
                    target,
                    data=body,
                    headers=send_headers,
                    allow_redirects=False,
                    proxy=self.proxy,
                ) as response:
                    payload = await response.read()
                    return HttpResponse(response.status, response.headers, payload)
            except Exception as exc:
                error = provider_error(exc, host=target.host, timeout_s=self.timeout_s)
                if error is None:
                    raise
                raise error from exc

    async def close(self) -> None:
        """Close the session of the running loop (idempotent; the transport can be used again after)."""
        state = self._loops.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.keeper.aclose()

    async def _loop_session(self) -> _LoopSession:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is not None:
            return state
        for old in [other for other in self._loops if other.is_closed()]:
            log.warning("an HTTP session outlived its event loop; call close() before the loop ends")
            del self._loops[old]
        state = self._open(loop)
        self._loops[loop] = state
        await anext(state.keeper)  # runs to its first yield at once: registers it with this loop
        return state

    def _open(self, loop: asyncio.AbstractEventLoop) -> _LoopSession:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.limit, keepalive_timeout=KEEPALIVE_S, ttl_dns_cache=300)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            headers={"User-Agent": self.user_agent},
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )
        return _LoopSession(session, asyncio.Semaphore(self.limit), self._keep(loop, session))

    async def _keep(
        self, loop: asyncio.AbstractEventLoop, session: aiohttp.ClientSession
    ) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            state = self._loops.get(loop)
            if state is not None and state.session is session:
                del self._loops[loop]
            await session.close()


def _basic_auth(user: str, password: str) -> str:
    # aiohttp.BasicAuth is deprecated from 3.14 and encode_basic_auth is missing before it; UTF-8 as
    # RFC 7617 recommends (aiohttp used Latin-1, which cannot carry every password).
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


@lru_cache(maxsize=256)
def _parse_url(url: str) -> URL | None:
    from yarl import URL

    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        return None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return None
    return parsed


def retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).

    A date in the past gives ``0.0``; a missing, negative or unreadable value gives ``None``. Decimal
    seconds (``1.5``) are accepted although the RFC only allows digits: some providers send them.
    """
    value = headers.get("Retry-After")
    if value is None:
        value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.match(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC with an unknown origin (RFC 5322)
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def classify_status(
    status: int, *, retry_after_s: float | None, code: str | None = None, detail: str = ""
) -> ProviderError | None:
    """The default HTTP policy shared by drivers: the error an answer's status means, or ``None``.

    ============================  ====================  ==============================================
    status                        error                 why
    ============================  ====================  ==============================================
    2xx                           ``None``              accepted
    429                           ThrottledError        slow down; ``retry_after_s`` passed on
    408, 425, 500, 502, 503, 504  TransientError        may pass; ``retry_after_s`` passed on (503)
    other 5xx                     TransientError        the provider's fault, may pass
    401, 403                      TechnicalError        our credentials: stop, don't blame the recipient
    404, 410                      PermanentError        the provider says this target does not exist
    other 4xx                     TechnicalError        our request was malformed
    1xx, 3xx, anything else       TechnicalError        redirects are not followed: fix ``base_url``
    ============================  ====================  ==============================================

    Drivers that know their provider better (a 400 meaning "invalid number") decide before calling
    this. ``code`` defaults to the status; ``detail`` to a sentence naming it.
    """
    if 200 <= status < 300:  # noqa: PLR2004 - the 2xx range
        return None
    code = code or str(status)
    detail = detail or _status_text(status)
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        return ThrottledError(detail, code=code, retry_after_s=retry_after_s)
    if status in _TRANSIENT or 500 <= status < 600:  # noqa: PLR2004 - the 5xx range
        return TransientError(detail, code=code, retry_after_s=retry_after_s)
    if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
        return TechnicalError(f"{detail}: check the account's credentials", code=code)
    if status in (HTTPStatus.NOT_FOUND, HTTPStatus.GONE):
        return PermanentError(detail, code=code)
    return TechnicalError(detail, code=code)


def _status_text(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "unexpected status"
    return f"the provider answered HTTP {status} {phrase}"


# -- aiohttp and asyncio exceptions -> provider errors ------------------------------------------------

_Translate = Callable[[BaseException, str, float | None], ProviderError]


def _already(exc: BaseException, host: str, timeout_s: float | None) -> ProviderError:
    assert isinstance(exc, ProviderError)  # noqa: S101 - the table row guarantees it
    return exc


def _timeout(exc: BaseException, host: str, timeout_s: float | None) -> ProviderError:
    within = f" within {timeout_s:g}s" if timeout_s is not None else " in time"
    return TransientError(f"{host} did not answer{within}", code="timeout")


def _connection(exc: BaseException, host: str, timeout_s: float | None) -> ProviderError:
    return TransientError(f"the connection to {host} failed ({type(exc).__name__})", code="connection")


def _dns(exc: BaseException, host: str, timeout_s: float | None) -> ProviderError:
    return TransientError(f"the name {host} could not be resolved", code="dns")


def _tls(exc: BaseException, host: str, timeout_s: float | None) -> ProviderError:
    return TechnicalError(
        f"TLS with {host} failed ({type(exc).__name__}): check base_url and the server's certificate",
        code="tls",
    )


def _invalid_url(exc: BaseException, host: str, timeout_s: float | None) -> ProviderError:
    return TechnicalError("the URL is not a valid http(s) address; check base_url", code="invalid-url")


def _redirect(exc: BaseException, host: str, timeout_s: float | None) -> ProviderError:
    return TechnicalError(
        f"{host} redirected the request; point base_url at the new address", code="redirect"
    )


def _proxy(exc: BaseException, host: str, timeout_s: float | None) -> ProviderError:
    status = getattr(exc, "status", 0)
    if status >= 500:  # noqa: PLR2004 - the proxy's own 5xx may pass
        return TransientError(f"the proxy answered HTTP {status}", code="proxy")
    return TechnicalError(f"the proxy refused the connection (HTTP {status})", code="proxy")


def _response(exc: BaseException, host: str, timeout_s: float | None) -> ProviderError:
    status = getattr(exc, "status", 0)
    return classify_status(status, retry_after_s=None) or TechnicalError(
        f"unexpected answer from {host} ({type(exc).__name__})", code="response"
    )


def _request(exc: BaseException, host: str, timeout_s: float | None) -> ProviderError:
    # ValueError and TypeError come from building the request (a header with a newline, Basic auth
    # combined with an Authorization header): a bug on our side. The text may quote a header: left out.
    return TechnicalError(f"the request could not be built ({type(exc).__name__})", code="request")


def _unknown(exc: BaseException, host: str, timeout_s: float | None) -> ProviderError:
    return TechnicalError(f"unexpected HTTP client error ({type(exc).__name__})", code="client")


@cache
def _exception_table() -> tuple[tuple[type[BaseException], _Translate], ...]:
    """First match wins, so subclasses come before the classes they refine.

    aiohttp classes are named, not imported: a few (the DNS error, the URL errors, UploadAbortedError)
    appeared after 3.9, and on an older aiohttp their row is skipped and a broader row catches them.
    """
    import aiohttp

    rows: tuple[tuple[type[BaseException] | str, _Translate], ...] = (
        (ProviderError, _already),
        ("ClientSSLError", _tls),  # ClientConnectorSSLError, ClientConnectorCertificateError
        ("ServerFingerprintMismatch", _tls),
        (ssl.SSLError, _tls),
        # asyncio.TimeoutError is TimeoutError; so are ServerTimeoutError, ConnectionTimeoutError and
        # SocketTimeoutError, which are also connection errors: this row must come before those.
        (TimeoutError, _timeout),
        ("ClientConnectorDNSError", _dns),
        ("InvalidURL", _invalid_url),  # InvalidUrlClientError, InvalidUrlRedirectClientError
        ("NonHttpUrlClientError", _invalid_url),
        ("RedirectClientError", _redirect),
        ("TooManyRedirects", _redirect),
        ("ClientHttpProxyError", _proxy),
        ("ClientResponseError", _response),  # ContentTypeError, WSServerHandshakeError
        ("ClientPayloadError", _connection),  # the body was cut short
        ("UploadAbortedError", _connection),
        # refused, reset, ServerDisconnectedError, ClientProxyConnectionError, ClientOSError
        ("ClientConnectionError", _connection),
        (OSError, _connection),
        ("ClientError", _unknown),  # a subclass added by a later aiohttp
        (ValueError, _request),
        (TypeError, _request),
    )
    table: list[tuple[type[BaseException], _Translate]] = []
    for kind, translate in rows:
        cls = getattr(aiohttp, kind, None) if isinstance(kind, str) else kind
        if cls is not None:
            table.append((cls, translate))
    return tuple(table)


def provider_error(
    exc: BaseException, *, host: str | None = None, timeout_s: float | None = None
) -> ProviderError | None:
    """The provider error an aiohttp or asyncio failure stands for; ``None`` for anything else.

    ``None`` means "not a transport failure" (a bug, a cancellation): the caller re-raises it as is.
    """
    for kind, translate in _exception_table():
        if isinstance(exc, kind):
            return translate(exc, host or "the provider", timeout_s)
    return None


class HttpProvider(Provider):
    """A driver that speaks HTTP through one :class:`HttpTransport`, made on its first send.

    The driver instance is built once per worker process, before any event loop runs; the transport
    (and its connection pool) is made on the loop that first sends, and closed with the driver.
    """

    _transport: HttpTransport | None = None

    def _client(self) -> HttpTransport:
        if self._transport is None:
            options = self.options
            self._transport = HttpTransport(
                limit=options.concurrency, timeout_s=options.timeout.total_seconds()
            )
        return self._transport

    async def close(self) -> None:
        if self._transport is not None:
            await self._transport.close()
