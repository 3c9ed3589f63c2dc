"""Hostile requests to every ``smartpush serve`` endpoint (SPEC.md "Personal data and security").

Forged and missing signatures for each provider, replayed receipts, 10 MB bodies (declared and
chunked), bodies that are not what their Content-Type says, and path tricks on ``/unsubscribe/``:
``..``, ``%2e%2e``, NUL, very long, tampered and unicode tokens. Whatever arrives, the answer is never
a 500 nor a Python traceback, no answer and no log record holds the test audience's phones, emails
or tokens (nor a secret), and forged requests change nothing in the ledger.

tests/test_serve*.py check each behaviour once; this file throws many requests at all of them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve_webhooks import ENV, Served, make_config, sent_messages

from smartpush.config import Config
from smartpush.ledger import Ledger, Status
from smartpush.serve.limits import MAX_BODY_BYTES
from smartpush.unsubscribe import make_token, recipient_hash

ADDRESS = "zephyrine.kx81@courriel-prive.example"
#: sent_messages() gives its messages the numbers +33612340000, +33612340001...
PHONES = ["+33612340000", "+33612340001", "33612340000", "0612340000", "06 12 34 00 00"]
ACCOUNTS = ["twilio-sms", "vonage-sms", "ovh-sms", "brevo-sms", "agg"]
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))


class Site:
    def __init__(self, config: Config, ledger: Ledger, client: httpx.Client) -> None:
        self.config, self.ledger, self.client = config, ledger, client
        key = config.secret_key()
        self.token = make_token(
            key, campaign="rappel", channel="email", address_hash=recipient_hash(key, "email", ADDRESS)
        )
        self.address_hash = recipient_hash(key, "email", ADDRESS)
        self.forbidden = [*PHONES, ADDRESS, ADDRESS.split("@")[0], self.token, *ENV.values()]

    def status(self, message_id: str) -> Status:
        for run in self.ledger.list_runs(limit=100):
            for message in self.ledger.messages(run.id):
                if message.id == message_id:
                    return message.status
        raise AssertionError(message_id)

    def check(self, answer: object, *, allowed: tuple[int, ...] = ()) -> int:
        """The answer is no 5xx (except ``allowed``), no traceback, no personal data or secret."""
        assert isinstance(answer, httpx.Response)
        code = answer.status_code
        assert code < 500 or code in allowed, (code, answer.text[:300])
        text = answer.content.decode("utf-8", "replace")
        assert "Traceback" not in text and 'File "' not in text and "Error:" not in text, text[:300]
        leaked = [s for s in self.forbidden if s in text]
        assert not leaked, f"{leaked} in an answer"
        return code


@pytest.fixture
def uvicorn_logging() -> Iterator[None]:
    """Puts uvicorn's loggers back as they were: uvicorn.Config sets their levels, handlers and
    propagation for the whole process, which later tests (tests/test_logs.py) would inherit."""
    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
    loggers = {name: logging.getLogger(name) for name in names}
    saved = {n: (lg.level, list(lg.handlers), lg.propagate, lg.disabled) for n, lg in loggers.items()}
    yield
    for name, (level, handlers, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate, logger.disabled = propagate, disabled


@pytest.fixture
def site(tmp_path: Path, caplog: pytest.LogCaptureFixture, uvicorn_logging: None) -> Iterator[Site]:
    caplog.set_level(logging.DEBUG)
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    config = make_config(tmp_path, db)
    ledger = Ledger(db)
    ledger.migrate()
    served = Served(config, ledger)  # uvicorn on a loopback port, as `smartpush serve` runs it
    made = Site(config, ledger, served.http)
    try:
        yield made
    finally:
        served.close()
        ledger.close()
    for record in caplog.records:
        if record.name.startswith(("httpx", "httpcore", "hypothesis")):
            continue
        text = record.getMessage()
        leaked = [s for s in made.forbidden if s in text]
        assert not leaked, f"{leaked} logged by {record.name}: {text!r}"
        assert record.exc_info is None, f"a traceback logged by {record.name}: {text!r}"


# -- authentication ------------------------------------------------------------------------------------


@pytest.mark.parametrize("account", ACCOUNTS)
@pytest.mark.parametrize("route", ["webhooks", "inbound"])
def test_missing_and_forged_signatures_are_403_and_change_nothing(
    site: Site, account: str, route: str
) -> None:
    (mid,) = sent_messages(site.ledger, account, ["REF-1"])
    receipt = {
        "MessageSid": "REF-1", "MessageStatus": "delivered", "messageId": "REF-1", "status": "delivered",
        "reference": "REF-1", "id": "REF-1", "From": PHONES[0], "Body": "STOP", "msisdn": "33612340000",
        "text": "STOP", "from": PHONES[0], "scts": "2401011200", "err-code": "0", "message-timestamp": "x",
    }  # fmt: skip
    path = f"/{route}/{account}"
    attempts = [
        site.client.post(path, data=receipt),
        site.client.post(path, json=receipt),
        site.client.get(path, params=receipt),
        site.client.post(path, data=receipt, headers={"X-Twilio-Signature": "AAAA" * 7}),
        site.client.post(path + "?token=wrong", json=receipt),
        site.client.post(path, json=receipt, headers={"Authorization": "Bearer wrong"}),
        site.client.post(path, json=receipt, headers={"Authorization": f"Bearer {ENV['HOOK_SECRET']}x"}),
        site.client.get(path, params={**receipt, "sig": "0" * 64, "timestamp": "1700000000"}),
        site.client.post(path + "?token=", json=receipt),
        site.client.post(path + f"?token={ENV['HOOK_SECRET'][:-1]}", json=receipt),
    ]
    for answer in attempts:
        assert site.check(answer) in (403, 404), answer.status_code
        assert answer.content == b""
    assert site.status(mid) == Status.SENT
    assert site.ledger.message_receipts(mid) == []
    assert not site.ledger.suppressed("sms", {recipient_hash(site.config.secret_key(), "sms", PHONES[0])})


def test_a_replayed_receipt_is_applied_once(site: Site) -> None:
    (mid,) = sent_messages(site.ledger, "agg", ["R-1"])
    auth = {"Authorization": f"Bearer {ENV['HOOK_SECRET']}"}
    body = {"reference": "R-1", "status": "delivered"}
    first = site.client.post("/webhooks/agg", json=body, headers=auth)
    replays = [site.client.post("/webhooks/agg", json=body, headers=auth) for _ in range(5)]
    assert site.check(first) == 200 and first.json()["applied"] == 1
    for again in replays:
        assert site.check(again) == 200 and again.json()["applied"] == 0
    assert site.status(mid) == Status.DELIVERED
    # a late, replayed failure never undoes the delivery
    failed = site.client.post("/webhooks/agg", json={**body, "status": "failed"}, headers=auth)
    assert site.check(failed) == 200 and failed.json()["applied"] == 0
    assert site.status(mid) == Status.DELIVERED


# -- bodies --------------------------------------------------------------------------------------------

ROUTES = ["/webhooks/agg", "/inbound/agg", "/webhooks/twilio-sms", "/webhooks/nobody", "/healthz", "/metrics"]


@pytest.mark.parametrize("path", [*ROUTES, "/unsubscribe/{token}"])
def test_ten_megabyte_bodies_are_413(site: Site, path: str) -> None:
    path = path.replace("{token}", site.token) + f"?token={ENV['HOOK_SECRET']}"
    body = b'{"reference": "' + b"x" * (10 << 20) + b'"}'

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 1 << 16):
            yield body[i : i + (1 << 16)]

    def post(content: bytes | Iterator[bytes]) -> int:
        try:
            answer = site.client.post(path, content=content, headers={"Content-Type": "application/json"})
        except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):
            return 413  # answered and closed before the body was all sent: refused too
        return site.check(answer)

    declared, chunked = post(body), post(chunks())
    # 405: a GET-only route; 404: an unknown account is answered before its body is read
    assert declared in (405, 413), declared
    assert chunked in (400, 404, 405, 413), chunked  # 400: not a one-click form, left unread
    assert len(body) > MAX_BODY_BYTES


CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "multipart/form-data; boundary=xyz",
        "text/plain",
        "application/xml",
        "",
        "application/json; charset=utf-16",
        "application/vnd.api+json",
        "application/json;;;charset==;boundary",
        "multipart/form-data; boundary=" + "b" * 300,
    ]
)
BODIES = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=500).map(str.encode),
    st.sampled_from(
        [
            b"{not json",
            b"[" * 60_000,
            b'{"reference": "R-1", "status": ' + b"9" * 5000 + b"}",
            b"reference=R-1&status=delivered&" * 300,
            b'--xyz\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\nx\r\n--xyz--\r\n',
            b'--xyz\r\nContent-Disposition: form-data; name="reference"\r\n\r\n' + b"x" * 5000,
            b"List-Unsubscribe=One-Click",
            b'{"reference": null, "status": {"a": [1]}}',
            b'{"from": "+33612340000", "text": "STOP"}',
        ]
    ),
)
AUTH = st.sampled_from(["", f"?token={ENV['HOOK_SECRET']}", "?token=nope"])


@SETTINGS
@given(
    path=st.sampled_from([*ROUTES, "/unsubscribe/{token}"]),
    body=BODIES,
    media=CONTENT_TYPES,
    auth=AUTH,
    method=st.sampled_from(["POST", "GET", "PUT"]),
)
def test_any_body_is_answered_without_a_500(
    site: Site, path: str, body: bytes, media: str, auth: str, method: str
) -> None:
    url = path.replace("{token}", site.token) + auth
    answer = site.client.request(method, url, content=body, headers={"Content-Type": media})
    site.check(answer, allowed=(503,) if path == "/healthz" else ())


def test_malformed_bodies_from_an_authenticated_sender_are_400_and_change_nothing(site: Site) -> None:
    (mid,) = sent_messages(site.ledger, "agg", ["M-1"])
    auth = {"Authorization": f"Bearer {ENV['HOOK_SECRET']}"}
    for body, media in [
        (b"{not json", "application/json"),
        (b"[" * 60_000, "application/json"),
        (b"\xff\xfe\x00", "application/x-www-form-urlencoded"),
        (b"reference=M-1&status=delivered", "application/xml"),
        (b"--nope", "multipart/form-data"),
    ]:
        answer = site.client.post("/webhooks/agg", content=body, headers={**auth, "Content-Type": media})
        assert site.check(answer) == 400, (body[:20], answer.status_code)
    assert site.status(mid) == Status.SENT


# -- /unsubscribe/{token} ------------------------------------------------------------------------------

TRICKS = [
    "..",
    "%2e%2e",
    "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "..%2F..%2Fsmartpush.yaml",
    "%00",
    "x%00y",
    "%ff%fe",
    "%ED%A0%80",  # a lone surrogate in UTF-8
    "%C0%AE%C0%AE",  # overlong dots
    "a" * 10_000,
    "." * 600,
    "%F0%9F%98%80" * 50,
    "é",
    "%E2%80%AE",
    "....",
    "a.b",
    "a.b.c",
    "eyJjIjoiIiwiY2giOiJlbWFpbCIsImgiOiIifQ.AAAAAAAAAAAAAAAAAAAAAA",  # well formed, unsigned
]


def test_unsubscribe_path_tricks_are_not_found(site: Site) -> None:
    for trick in TRICKS:
        for method in ("GET", "POST", "HEAD"):
            answer = site.client.request(
                method,
                f"/unsubscribe/{trick}",
                content=b"List-Unsubscribe=One-Click",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            assert site.check(answer) in (404, 405), (trick[:30], method, answer.status_code)
    assert not site.ledger.suppressed("email", {site.address_hash})


@SETTINGS
@given(position=st.integers(min_value=0), replacement=st.characters(blacklist_categories=("Cs",)))
def test_a_tampered_token_is_not_found(site: Site, position: int, replacement: str) -> None:
    token = site.token
    i = position % len(token)
    if token[i] == replacement:
        return
    tampered = token[:i] + replacement + token[i + 1 :]
    answer = site.client.post(
        "/unsubscribe/" + quote(tampered, safe=""),
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert site.check(answer) == 404
    assert (
        site.ledger.suppressed("email", {recipient_hash(site.config.secret_key(), "email", ADDRESS)}) == set()
    )


@SETTINGS
@given(token=st.text(max_size=700))
def test_any_token_is_answered_without_a_500(site: Site, token: str) -> None:
    for method in ("GET", "POST"):
        answer = site.client.request(method, "/unsubscribe/" + quote(token, safe=""))
        assert site.check(answer) in (404, 405, 307, 400) or (
            token == site.token and answer.status_code == 200
        )


def test_the_genuine_token_still_works_after_the_barrage(site: Site) -> None:
    page = site.client.get(f"/unsubscribe/{site.token}")
    assert site.check(page) == 200
    done = site.client.post(
        f"/unsubscribe/{site.token}",
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    again = site.client.post(
        f"/unsubscribe/{site.token}",
        content=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert site.check(done) == 200 and site.check(again) == 200
    hashed = recipient_hash(site.config.secret_key(), "email", ADDRESS)
    assert site.ledger.suppressed("email", {hashed}) == {hashed}
    assert not re.search(r"[0-9a-f]{32}", done.text)  # the page does not show the address hash either
