"""smartpush.http: Retry-After, the status policy, the exception map and real requests on loopback."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey, RequestInfo
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from smartpush.errors import (
    PermanentError,
    ProviderError,
    TechnicalError,
    ThrottledError,
    TransientError,
)
from smartpush.http import (
    HttpResponse,
    HttpTransport,
    _exception_table,
    classify_status,
    provider_error,
    retry_after,
)
from smartpush.testing import FakeProviderServer, Reply

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as fake:
        yield fake


def closed_port() -> int:
    """A port on loopback that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- Retry-After --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),  # not RFC, but sent by some providers
        ("Thu, 26 Nov 2026 12:00:30 GMT", 30.0),  # IMF-fixdate
        ("Thursday, 26-Nov-26 12:01:00 GMT", 60.0),  # obsolete RFC 850 form
        ("Thu Nov 26 12:00:10 2026", 10.0),  # obsolete asctime form, which is GMT
        ("Thu, 26 Nov 2026 11:00:00 GMT", 0.0),  # in the past: go now
        ("garbage", None),
        ("", None),
        ("-5", None),
        ("-1.5", None),
        ("5s", None),
        ("1e3", None),
        ("Mon, 99 Foo 2015 07:28:00 GMT", None),
    ],
)
def test_retry_after(value: str, expected: float | None) -> None:
    assert retry_after({"Retry-After": value}, now=NOW) == expected


def test_retry_after_absent_and_case_insensitive() -> None:
    assert retry_after({}, now=NOW) is None
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after(CIMultiDictProxy(CIMultiDict({"RETRY-AFTER": "4"}))) == 4.0


def test_retry_after_naive_now_is_utc() -> None:
    naive = NOW.replace(tzinfo=None)
    assert retry_after({"Retry-After": "Thu, 26 Nov 2026 12:00:30 GMT"}, now=naive) == 30.0


def test_retry_after_defaults_to_the_clock() -> None:
    soon = (datetime.now(UTC) + timedelta(seconds=100)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    seconds = retry_after({"Retry-After": soon})
    assert seconds is not None
    assert 90 <= seconds <= 100


@given(st.text(max_size=60))
def test_retry_after_never_raises(value: str) -> None:
    seconds = retry_after({"Retry-After": value}, now=NOW)
    assert seconds is None or seconds >= 0


# -- the status policy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, None),
        (201, None),
        (202, None),
        (204, None),
        (429, ThrottledError),
        (408, TransientError),
        (425, TransientError),
        (500, TransientError),
        (502, TransientError),
        (503, TransientError),
        (504, TransientError),
        (501, TransientError),  # other 5xx
        (507, TransientError),
        (599, TransientError),
        (401, TechnicalError),
        (403, TechnicalError),
        (404, PermanentError),
        (410, PermanentError),
        (400, TechnicalError),  # other 4xx: our request was malformed
        (405, TechnicalError),
        (413, TechnicalError),
        (422, TechnicalError),
        (301, TechnicalError),  # redirects are not followed
        (302, TechnicalError),
        (100, TechnicalError),
        (600, TechnicalError),
    ],
)
def test_classify_status(status: int, expected: type[ProviderError] | None) -> None:
    error = classify_status(status, retry_after_s=None)
    if expected is None:
        assert error is None
        return
    assert type(error) is expected
    assert error is not None
    assert error.code == str(status)
    assert str(status) in error.detail


@pytest.mark.parametrize("status", [429, 503, 500])
def test_classify_status_passes_retry_after_on(status: int) -> None:
    error = classify_status(status, retry_after_s=12.0)
    assert error is not None
    assert error.retry_after_s == 12.0


def test_classify_status_takes_the_drivers_code_and_detail() -> None:
    error = classify_status(400, retry_after_s=None, code="BAD_FORMAT", detail="the body was refused")
    assert isinstance(error, TechnicalError)
    assert (error.code, error.detail) == ("BAD_FORMAT", "the body was refused")


def test_credentials_errors_say_what_to_fix() -> None:
    error = classify_status(401, retry_after_s=None)
    assert error is not None
    assert "credentials" in error.detail


def test_permanent_statuses_do_not_suppress() -> None:
    error = classify_status(404, retry_after_s=None)
    assert isinstance(error, PermanentError)
    assert error.suppress is False


# -- the exception map --------------------------------------------------------------------------------


def aiohttp_exception_classes() -> list[type[BaseException]]:
    """Every exception aiohttp exports that a client request can raise, and asyncio's timeout."""
    found: list[type[BaseException]] = [asyncio.TimeoutError]
    for name in aiohttp.__all__:
        obj = getattr(aiohttp, name)
        if inspect.isclass(obj) and issubclass(obj, aiohttp.ClientError):
            found.append(obj)
    return found


def make(cls: type[BaseException]) -> BaseException:
    """A real instance of ``cls``, built the way aiohttp builds it."""
    key = ConnectionKey("api.example.org", 443, True, True, None, None, None)
    info = RequestInfo(
        URL("https://api.example.org/"),
        "POST",
        CIMultiDictProxy(CIMultiDict()),
        URL("https://api.example.org/"),
    )
    if issubclass(cls, aiohttp.ClientConnectorCertificateError):
        return cls(key, Exception("certificate verify failed"))
    if issubclass(cls, aiohttp.ClientConnectorError):
        return cls(key, ConnectionRefusedError(111, "Connection refused"))
    if issubclass(cls, aiohttp.ClientResponseError):
        return cls(info, (), status=502, message="Bad Gateway")
    if issubclass(cls, aiohttp.ServerFingerprintMismatch):
        return cls(b"a", b"b", "api.example.org", 443)
    if issubclass(cls, aiohttp.InvalidURL):
        return cls("api.example.org")
    return cls()


CLASSES = aiohttp_exception_classes()


def test_the_list_of_aiohttp_exceptions_is_not_empty() -> None:
    # a broken introspection must not make the completeness test below pass on nothing
    assert len(CLASSES) >= 25
    for expected in (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientSSLError):
        assert expected in CLASSES


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_aiohttp_exception_is_mapped(cls: type[BaseException]) -> None:
    error = provider_error(make(cls), host="api.example.org", timeout_s=5)
    assert isinstance(error, ProviderError)
    assert type(error) in (ThrottledError, TransientError, PermanentError, TechnicalError)
    # mapped by a row written for it, not by the catch-all kept for classes a later aiohttp adds
    row = next(kind for kind, _ in _exception_table() if issubclass(cls, kind))
    assert row is not aiohttp.ClientError or cls is aiohttp.ClientError, (
        f"{cls.__name__} has no row of its own in the exception map"
    )


@pytest.mark.parametrize(
    ("exc", "expected", "code"),
    [
        (TimeoutError(), TransientError, "timeout"),  # what asyncio.TimeoutError is since 3.11
        (aiohttp.ServerTimeoutError(), TransientError, "timeout"),
        (aiohttp.ConnectionTimeoutError(), TransientError, "timeout"),
        (aiohttp.SocketTimeoutError(), TransientError, "timeout"),
        (make(aiohttp.ClientConnectorError), TransientError, "connection"),
        (aiohttp.ClientConnectionResetError(), TransientError, "connection"),
        (aiohttp.ServerDisconnectedError(), TransientError, "connection"),
        (aiohttp.ClientPayloadError(), TransientError, "connection"),
        (aiohttp.ClientOSError(), TransientError, "connection"),
        (ConnectionResetError(), TransientError, "connection"),
        (make(aiohttp.ClientConnectorDNSError), TransientError, "dns"),
        (make(aiohttp.ClientSSLError), TechnicalError, "tls"),
        (make(aiohttp.ClientConnectorSSLError), TechnicalError, "tls"),
        (make(aiohttp.ClientConnectorCertificateError), TechnicalError, "tls"),
        (make(aiohttp.ServerFingerprintMismatch), TechnicalError, "tls"),
        (make(aiohttp.InvalidURL), TechnicalError, "invalid-url"),
        (aiohttp.NonHttpUrlClientError(), TechnicalError, "invalid-url"),
        (make(aiohttp.ClientResponseError), TransientError, "502"),
        (ValueError("Cannot combine AUTHORIZATION header with AUTH argument"), TechnicalError, "request"),
    ],
)
def test_exception_rows(exc: BaseException, expected: type[ProviderError], code: str) -> None:
    error = provider_error(exc, host="api.example.org", timeout_s=5)
    assert type(error) is expected
    assert error is not None
    assert error.code == code


def test_bugs_and_cancellation_are_not_translated() -> None:
    assert provider_error(KeyError("x")) is None
    assert provider_error(asyncio.CancelledError()) is None
    already = ThrottledError("slow down", retry_after_s=3)
    assert provider_error(already) is already


# -- HttpResponse --------------------------------------------------------------------------------------


def test_response_json_and_text() -> None:
    headers = CIMultiDictProxy(CIMultiDict({"content-type": "application/json; charset=latin-1"}))
    response = HttpResponse(200, headers, '{"id": "é"}'.encode("latin-1"))
    assert response.text() == '{"id": "é"}'
    assert response.headers["Content-Type"].startswith("application/json")
    assert HttpResponse(200, {}, b'{"id": 1}').json() == {"id": 1}


@pytest.mark.parametrize("body", [b"<html>502</html>", b"", b"\xff\xfe", b'{"id":'])
def test_response_invalid_json_is_a_technical_error(body: bytes) -> None:
    with pytest.raises(TechnicalError, match="invalid JSON"):
        HttpResponse(200, {}, body).json()


def test_response_text_with_an_unknown_charset() -> None:
    assert HttpResponse(200, {"Content-Type": "text/plain; charset=nope"}, b"ok").text() == "ok"


# -- real requests on loopback -------------------------------------------------------------------------


def test_json_round_trip(server: FakeProviderServer) -> None:
    server.script([Reply(201, json={"data": {"id": "abc"}}, headers={"X-Request-Id": "r1"})])

    async def main() -> HttpResponse:
        transport = HttpTransport()
        try:
            return await transport.request(
                "POST",
                server.url + "/v1/sms?x=1",
                json={"to": "+33612345678", "body": "Bonjour é ✓"},
                headers={"Idempotency-Key": "m-1"},
            )
        finally:
            await transport.close()

    response = asyncio.run(main())
    assert response.status == 201
    assert response.json() == {"data": {"id": "abc"}}
    assert response.headers["x-request-id"] == "r1"
    (seen,) = server.requests
    assert (seen.method, seen.path, seen.query) == ("POST", "/v1/sms", "x=1")
    assert seen.json == {"to": "+33612345678", "body": "Bonjour é ✓"}
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["User-Agent"].startswith("smartpush/")
    assert seen.idempotency_key == "m-1"


def test_form_and_basic_auth(server: FakeProviderServer) -> None:
    async def main() -> None:
        transport = HttpTransport()
        await transport.request("POST", server.url, data={"To": "+33612345678"}, auth=("sid", "secret"))
        await transport.close()

    asyncio.run(main())
    (seen,) = server.requests
    assert seen.body == b"To=%2B33612345678"
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert seen.headers["Authorization"] == "Basic c2lkOnNlY3JldA=="


def test_basic_auth_and_an_authorization_header_conflict(server: FakeProviderServer) -> None:
    async def main() -> None:
        await HttpTransport().request("POST", server.url, auth=("a", "b"), headers={"authorization": "x"})

    with pytest.raises(TechnicalError, match="not both"):
        asyncio.run(main())
    assert server.requests == []


def test_error_statuses_are_answers_not_exceptions(server: FakeProviderServer) -> None:
    server.script([Reply(503, headers={"Retry-After": "9"})])

    async def main() -> HttpResponse:
        transport = HttpTransport()
        try:
            return await transport.request("POST", server.url, json={})
        finally:
            await transport.close()

    response = asyncio.run(main())
    assert response.status == 503
    assert retry_after(response.headers) == 9.0


def test_redirects_are_not_followed(server: FakeProviderServer) -> None:
    server.script([Reply(302, headers={"Location": "/elsewhere"})])

    async def main() -> int:
        transport = HttpTransport()
        try:
            return (await transport.request("POST", server.url, json={})).status
        finally:
            await transport.close()

    assert asyncio.run(main()) == 302
    assert len(server.requests) == 1


def test_keep_alive_many_requests_few_connections(server: FakeProviderServer) -> None:
    async def main() -> None:
        transport = HttpTransport(limit=8)
        try:
            await asyncio.gather(*(transport.request("POST", server.url, json={"n": n}) for n in range(400)))
        finally:
            await transport.close()

    asyncio.run(main())
    assert len(server.requests) == 400
    assert server.connections <= 8


def test_the_limit_caps_requests_in_flight(server: FakeProviderServer) -> None:
    server.delay_s = 0.05
    in_flight: list[int] = []

    async def main() -> None:
        transport = HttpTransport(limit=3)

        async def one() -> None:
            await transport.request("POST", server.url, json={})

        try:
            await asyncio.gather(*(one() for _ in range(12)))
        finally:
            await transport.close()

    asyncio.run(main())
    starts = sorted(r.received_at for r in server.requests)
    for t in starts:
        in_flight.append(sum(1 for s in starts if s <= t < s + 0.05))
    assert max(in_flight) <= 3
    assert server.connections <= 3


def test_waiting_for_a_slot_does_not_count_towards_the_timeout(server: FakeProviderServer) -> None:
    server.delay_s = 0.2

    async def main() -> list[int]:
        transport = HttpTransport(limit=1, timeout_s=0.5)
        try:
            answers = await asyncio.gather(
                *(transport.request("POST", server.url, json={}) for _ in range(4))
            )
        finally:
            await transport.close()
        return [a.status for a in answers]

    started = time.monotonic()
    assert asyncio.run(main()) == [200] * 4  # 0.8 s in all, each request 0.2 s once it holds the slot
    assert time.monotonic() - started >= 0.8


def test_timeout_is_transient(server: FakeProviderServer) -> None:
    server.delay_s = 1.0

    async def main() -> None:
        transport = HttpTransport(timeout_s=0.1)
        try:
            await transport.request("POST", server.url, json={"body": "SECRET-BODY"})
        finally:
            await transport.close()

    with pytest.raises(TransientError) as caught:
        asyncio.run(main())
    assert caught.value.code == "timeout"
    assert "0.1s" in caught.value.detail
    assert "SECRET-BODY" not in str(caught.value)


def test_connection_refused_is_transient() -> None:
    async def main() -> None:
        transport = HttpTransport()
        try:
            await transport.request(
                "POST", f"http://127.0.0.1:{closed_port()}/", json={"body": "SECRET-BODY"}
            )
        finally:
            await transport.close()

    with pytest.raises(TransientError) as caught:
        asyncio.run(main())
    assert caught.value.code == "connection"
    assert "SECRET-BODY" not in str(caught.value)
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)


def test_reset_mid_response_is_transient(server: FakeProviderServer) -> None:
    server.script([Reply(reset=True)])

    async def main() -> int:
        transport = HttpTransport()
        try:
            with pytest.raises(TransientError) as caught:
                await transport.request("POST", server.url, json={"body": "SECRET-BODY"})
            assert caught.value.code == "connection"
            assert "SECRET-BODY" not in str(caught.value)
            # the transport is still usable after a broken connection
            return (await transport.request("POST", server.url, json={})).status
        finally:
            await transport.close()

    assert asyncio.run(main()) == 200


@pytest.mark.parametrize("url", ["not a url", "ftp://example.org/", "http://", "/relative/path", ""])
def test_invalid_url_is_technical(url: str) -> None:
    async def main() -> None:
        await HttpTransport().request("POST", url, json={})

    with pytest.raises(TechnicalError) as caught:
        asyncio.run(main())
    assert caught.value.code == "invalid-url"


def test_unencodable_json_is_technical(server: FakeProviderServer) -> None:
    async def main() -> None:
        await HttpTransport().request("POST", server.url, json={"when": object()})

    with pytest.raises(TechnicalError, match="encoded as JSON"):
        asyncio.run(main())
    assert server.requests == []


def test_one_transport_serves_successive_loops(server: FakeProviderServer) -> None:
    """A worker may run ``asyncio.run`` per segment with the same provider: each loop gets a session."""
    transport = HttpTransport()

    sessions: list[aiohttp.ClientSession] = []

    async def send() -> int:
        status = (await transport.request("POST", server.url, json={})).status
        sessions.append(transport._loops[asyncio.get_running_loop()].session)
        return status

    async def send_and_close() -> int:
        try:
            return await send()
        finally:
            await transport.close()

    assert asyncio.run(send_and_close()) == 200
    assert asyncio.run(send_and_close()) == 200
    # without close(): asyncio.run's shutdown of async generators closes the session cleanly
    # (pytest turns an "Unclosed client session" ResourceWarning into a failure)
    assert asyncio.run(send()) == 200
    assert asyncio.run(send()) == 200
    assert transport._loops == {}
    assert len(sessions) == 4
    assert all(session.closed for session in sessions)


def test_close_is_idempotent_and_the_transport_reopens(server: FakeProviderServer) -> None:
    async def main() -> list[int]:
        transport = HttpTransport()
        await transport.close()
        first = await transport.request("POST", server.url, json={})
        await transport.close()
        await transport.close()
        second = await transport.request("POST", server.url, json={})
        await transport.close()
        return [first.status, second.status]

    assert asyncio.run(main()) == [200, 200]


@pytest.mark.parametrize("kwargs", [{"limit": 0}, {"timeout_s": 0}, {"timeout_s": -1.0}])
def test_transport_arguments_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        HttpTransport(**kwargs)
