"""The ``smtp`` driver against real aiosmtpd servers: plain, STARTTLS + AUTH, implicit TLS."""

from __future__ import annotations

import asyncio
import base64
import email
import inspect
import logging
import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import aiosmtplib.errors
import dkim
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import SMTPProtocol
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from smartpush.providers import smtp as smtp_driver
from smartpush.providers.smtp import SmtpOptions, SmtpProvider, classify_exception, classify_reply, scrub

import smartpush.email
from smartpush import registry
from smartpush.errors import (
    ConfigError,
    PermanentError,
    ProviderError,
    TechnicalError,
    ThrottledError,
    TransientError,
)
from smartpush.provider import Channel, OutboundMessage

USER, PASSWORD = "campaigns", "s3cret-Pa55"
UNSUBSCRIBE = "<https://unsub.mairie.example/u/" + "f00d" * 20 + ">"
#: Recipients whose local part makes the server answer RCPT with an error.
SCRIPT = {
    "bounce": "550 5.1.1 <bounce@example.org>: Recipient address rejected: User unknown",
    "full": "552 5.2.2 Mailbox full",
    "slow": "421 4.7.0 Too many messages, slow down",
    "later": "451 4.3.0 Temporary lookup failure",
    "policy": "550 5.7.1 Message rejected by policy",
}


@dataclass
class Recorder:
    """An aiosmtpd handler that keeps what it receives and counts connections."""

    envelopes: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    #: The latest session of each connection, by client address (STARTTLS starts a new session).
    sessions: dict[Any, Any] = field(default_factory=dict)
    active: int = 0
    max_active: int = 0
    delay: float = 0.0

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        self.sessions[session.peer] = session
        return responses

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        local = address.split("@", 1)[0]
        if local in SCRIPT:
            return SCRIPT[local]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.active -= 1
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Message accepted"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    port: int
    handler: Recorder
    ca_file: Path | None = None


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == USER.encode()
        and auth_data.password == PASSWORD.encode()
    )
    return AuthResult(success=ok, handled=False)


def serve(handler: Recorder | None = None, **kwargs: Any) -> Iterator[Server]:
    handler = Recorder() if handler is None else handler
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    try:
        yield Server(port, handler)
    finally:
        controller.stop()


@pytest.fixture
def plain() -> Iterator[Server]:
    yield from serve()


@pytest.fixture
def secure(ca: trustme.CA) -> Iterator[Server]:
    yield from serve(
        tls_context=server_context(ca),
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=True,
    )


def message(to: str = "alice@example.org", n: int = 1, **values: Any) -> OutboundMessage:
    fields: dict[str, Any] = {
        "message_id": f"m-{n:04d}",
        "run_id": "r-1",
        "channel": Channel.EMAIL,
        "to": to,
        "sender": "Mairie de Fécamp <info@mairie.example>",
        "subject": "Grippe : la vaccination commence à l'école ✓",
        "body": "Bonjour,\nLa campagne commence lundi.\n",
        "html": "<p>Bonjour,</p><p>La campagne commence <b>lundi</b>.</p>",
        "headers": {"List-Unsubscribe": UNSUBSCRIBE, "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
    }
    fields.update(values)
    return OutboundMessage(**fields)


def options(port: int, **values: Any) -> SmtpOptions:
    return SmtpOptions.model_validate({"type": "smtp", "host": "127.0.0.1", "port": port, **values})


def send_all(provider: SmtpProvider, *messages: OutboundMessage, pause: float = 0.0) -> list[Any]:
    """Send sequentially (with ``pause`` seconds between sends), then close; errors are returned."""

    async def go() -> list[Any]:
        out: list[Any] = []
        try:
            for i, msg in enumerate(messages):
                if i and pause:
                    await asyncio.sleep(pause)
                try:
                    out.append(await provider.send(msg))
                except ProviderError as exc:
                    out.append(exc)
        finally:
            await provider.close()
            # a socket whose TLS handshake failed finishes closing a few loop turns later: let it,
            # or asyncio.run ends first and the ResourceWarning fails the test
            await asyncio.sleep(0.05)
        return out

    return asyncio.run(go())


def parse(raw: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


# -- options -------------------------------------------------------------------------------------


def test_registered_and_options() -> None:
    assert registry.driver("smtp") is SmtpProvider
    opts = SmtpOptions.model_validate({"type": "smtp", "host": "relay.example"})
    assert (opts.port, opts.start_tls, opts.connections, opts.verify_tls) == (587, True, 4, True)
    implicit = SmtpOptions.model_validate({"type": "smtp", "host": "relay.example", "tls": True})
    assert (implicit.port, implicit.start_tls) == (465, False)
    port25 = options(25)
    assert port25.start_tls is None  # upgrade when offered
    assert options(25, username=USER, password=PASSWORD).start_tls is True
    secret = options(587, username=USER, password=PASSWORD)
    assert PASSWORD not in repr(secret) and PASSWORD not in str(secret.model_dump())


@pytest.mark.parametrize(
    "values",
    [
        {"hots": "x"},
        {"tls": True, "starttls": True},
        {"username": USER},
        {"username": USER, "password": PASSWORD, "starttls": False},
        {"connections": 0},
        {"dkim": {"domain": "d.example", "selector": "s"}},
        {"dkim": {"domain": "d.example", "selector": "s", "private_key": "k", "private_key_file": "f"}},
        {"dkim": {"domain": "d.example", "selector": "s", "private_key": "k", "algo": "rsa"}},
    ],
)
def test_bad_options_are_rejected(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        options(25, **values)


# -- sending -------------------------------------------------------------------------------------


def test_plain_send(plain: Server) -> None:
    provider = SmtpProvider("relay", options(plain.port))
    [result] = send_all(provider, message())
    assert result.provider_reference == "<m-0001@mairie.example>"
    [(mail_from, rcpts, raw)] = plain.handler.envelopes
    assert (mail_from, rcpts) == ("info@mairie.example", ["alice@example.org"])
    parsed = parse(raw)
    assert parsed["From"] == "Mairie de Fécamp <info@mairie.example>"
    assert parsed["To"] == "alice@example.org"
    assert parsed["Subject"] == "Grippe : la vaccination commence à l'école ✓"
    assert parsed["Message-ID"] == "<m-0001@mairie.example>"
    assert parsed["Date"]
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii").split("\r\n")
    assert f"List-Unsubscribe: {UNSUBSCRIBE}" in head
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in head
    assert parsed.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in parsed.iter_parts()] == ["text/plain", "text/html"]
    text, html = parsed.get_body(("plain",)), parsed.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content().replace("\r\n", "\n") == "Bonjour,\nLa campagne commence lundi.\n"
    assert "<b>lundi</b>" in html.get_content()


def test_text_only_and_refusals_before_sending(plain: Server) -> None:
    provider = SmtpProvider("relay", options(plain.port))
    sms = message(channel=Channel.SMS)
    no_sender = message(sender=None)
    injected = message(headers={"Reply-To": "a@example.org\nBcc: x@example.org"})
    _, e_sms, e_sender, e_inject = send_all(provider, message(html=None), sms, no_sender, injected)
    assert parse(plain.handler.envelopes[0][2]).get_content_type() == "text/plain"
    assert isinstance(e_sms, TechnicalError) and e_sms.code == "channel"
    assert isinstance(e_sender, TechnicalError) and e_sender.code == "sender"
    assert isinstance(e_inject, TechnicalError) and e_inject.code == "format"
    assert len(plain.handler.envelopes) == 1


def test_starttls_and_auth(secure: Server, ca_file: Path) -> None:
    opts = options(secure.port, starttls=True, username=USER, password=PASSWORD, ca_file=str(ca_file))
    provider = SmtpProvider("relay", opts)
    results = send_all(provider, message(n=1), message(n=2))
    assert [r.provider_reference for r in results] == ["<m-0001@mairie.example>", "<m-0002@mairie.example>"]
    assert len(secure.handler.envelopes) == 2
    [session] = secure.handler.sessions.values()
    assert session.authenticated


def test_wrong_password_is_a_technical_error(secure: Server, ca_file: Path) -> None:
    opts = options(secure.port, username=USER, password="wrong-password", ca_file=str(ca_file))
    [error] = send_all(SmtpProvider("relay", opts), message())
    assert isinstance(error, TechnicalError) and error.code == "authentication"
    assert "wrong-password" not in str(error) and "@" not in str(error)
    assert secure.handler.envelopes == []


def test_untrusted_certificate_is_a_technical_error(secure: Server) -> None:
    opts = options(secure.port, username=USER, password=PASSWORD)  # the test CA is not trusted
    [error] = send_all(SmtpProvider("relay", opts), message())
    assert isinstance(error, TechnicalError) and error.code == "tls"


def test_verify_tls_off_accepts_any_certificate(secure: Server) -> None:
    opts = options(secure.port, username=USER, password=PASSWORD, verify_tls=False)
    [result] = send_all(SmtpProvider("relay", opts), message())
    assert result.provider_reference == "<m-0001@mairie.example>"


def test_implicit_tls(ca: trustme.CA, ca_file: Path) -> None:
    for server in serve(ssl_context=server_context(ca)):
        opts = options(server.port, tls=True, ca_file=str(ca_file))
        assert opts.start_tls is False
        [result] = send_all(SmtpProvider("relay", opts), message())
        assert result.provider_reference == "<m-0001@mairie.example>"
        assert len(server.handler.envelopes) == 1


@pytest.mark.parametrize(
    ("local", "kind", "code"),
    [
        ("bounce", PermanentError, "550 5.1.1"),
        ("full", PermanentError, "552 5.2.2"),
        ("slow", ThrottledError, "421 4.7.0"),
        ("later", TransientError, "451 4.3.0"),
        ("policy", TechnicalError, "550 5.7.1"),
    ],
)
def test_scripted_errors(plain: Server, local: str, kind: type[ProviderError], code: str) -> None:
    provider = SmtpProvider("relay", options(plain.port))
    error, after = send_all(provider, message(to=f"{local}@example.org"), message(n=2))
    assert type(error) is kind and error.code == code
    assert "@" not in str(error)
    if isinstance(error, PermanentError):
        assert error.suppress is (local == "bounce")
    assert after.provider_reference == "<m-0002@mairie.example>"  # the connection is still usable
    assert len(plain.handler.envelopes) == 1
    # a 421 makes aiosmtplib close the connection: the next send opened a new one
    assert provider.connects == (2 if local == "slow" else 1)
    assert len(plain.handler.sessions) == provider.connects


def test_pool_reuses_connections_concurrently(plain: Server) -> None:
    plain.handler.delay = 0.01
    provider = SmtpProvider("relay", options(plain.port, connections=4))

    async def go() -> list[Any]:
        try:
            return await asyncio.gather(*(provider.send(message(n=i)) for i in range(50)))
        finally:
            await provider.close()

    results = asyncio.run(go())
    assert len({r.provider_reference for r in results}) == 50
    assert len(plain.handler.envelopes) == 50
    assert 1 < len(plain.handler.sessions) <= 4
    assert provider.connects == len(plain.handler.sessions)
    assert plain.handler.max_active > 1


def test_reconnects_after_the_server_closes_idle_connections() -> None:
    for server in serve(timeout=0.2):
        provider = SmtpProvider("relay", options(server.port))
        first, second = send_all(provider, message(n=1), message(n=2), pause=0.6)
        assert first.provider_reference and second.provider_reference
        assert len(server.handler.envelopes) == 2
        assert provider.connects == 2 and len(server.handler.sessions) == 2


def test_reconnects_when_a_dead_connection_still_looks_open(
    plain: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smartpush.providers.smtp")
    provider = SmtpProvider("relay", options(plain.port, connections=1))

    async def go() -> list[Any]:
        try:
            first = await provider.send(message(n=1))
            [slot] = provider._slots
            assert slot.smtp is not None and slot.smtp.transport is not None
            # the socket dies under the client without it noticing yet (no event loop turn)
            slot.smtp.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
            assert slot.smtp.is_connected
            return [first, await provider.send(message(n=2))]
        finally:
            await provider.close()

    results = asyncio.run(go())
    assert [r.provider_reference for r in results] == ["<m-0001@mairie.example>", "<m-0002@mairie.example>"]
    assert provider.connects == 2
    assert "was closed; reconnecting" in caplog.text  # the send failed once and was retried


def test_timeout_is_transient_and_the_next_send_reconnects(plain: Server) -> None:
    provider = SmtpProvider("relay", options(plain.port, timeout=0.3))

    async def go() -> list[Any]:
        out: list[Any] = []
        try:
            plain.handler.delay = 1.0
            try:
                await provider.send(message(n=1))
            except ProviderError as exc:
                out.append(exc)
            plain.handler.delay = 0.0
            out.append(await provider.send(message(n=2)))
        finally:
            await provider.close()
        return out

    error, result = asyncio.run(go())
    assert isinstance(error, TransientError) and error.code == "timeout"
    assert result.provider_reference == "<m-0002@mairie.example>"
    assert provider.connects == 2


def test_unreachable_server_is_transient() -> None:
    [error] = send_all(SmtpProvider("relay", options(free_port())), message())
    assert isinstance(error, TransientError) and error.code == "connection"


# -- the plain envelope: sendmail's commands without its address parsing ------------------------

#: Senders whose local part makes the server answer MAIL with an error.
SENDER_SCRIPT = {
    "refused": "553 5.1.8 <refused@mairie.example>: Sender address rejected: Domain not found",
    "busy": "450 4.3.2 Sender check unavailable",
}
#: A header that makes the server refuse the message at the end of DATA.
REJECT_MARK = b"X-Test-Verdict: reject"


@dataclass
class Scripted(Recorder):
    """A :class:`Recorder` that also refuses scripted senders and marked messages, and keeps MAIL options."""

    mail_options: list[list[str]] = field(default_factory=list)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, mail_options: list[str]
    ) -> str:
        local = address.split("@", 1)[0]
        if local in SENDER_SCRIPT:
            return SENDER_SCRIPT[local]
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        self.mail_options.append(list(mail_options))
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if REJECT_MARK in envelope.content:
            return "554 5.6.0 Message content rejected"
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def scripted() -> Iterator[Server]:
    yield from serve(Scripted())


@pytest.fixture
def fixed_date(monkeypatch: pytest.MonkeyPatch) -> None:
    """Text-only messages are then the same bytes every time (no Date, no random MIME boundary)."""
    monkeypatch.setattr(
        smartpush.email, "formatdate", lambda localtime=False: "Tue, 04 Mar 2025 09:00:00 -0000"
    )


@dataclass
class Transcript:
    """What one provider did: each send's outcome, every byte the client wrote, sendmail calls."""

    outcomes: list[str]
    writes: list[bytes]
    sendmail_calls: int
    connects: int
    envelopes: list[tuple[str, list[str], bytes]]


def transcript(
    server: Server,
    monkeypatch: pytest.MonkeyPatch,
    *messages: OutboundMessage,
    plain: bool = True,
    **opts: Any,
) -> Transcript:
    """Send ``messages`` through a new provider, the plain envelope allowed or (``plain=False``) not."""
    writes: list[bytes] = []
    calls: list[str] = []
    write, sendmail = SMTPProtocol.write, aiosmtplib.SMTP.sendmail

    def spy_write(self: SMTPProtocol, data: bytes) -> None:
        writes.append(bytes(data))
        write(self, data)

    async def spy_sendmail(self: aiosmtplib.SMTP, *args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return await sendmail(self, *args, **kwargs)

    server.handler.envelopes.clear()
    with monkeypatch.context() as patch:
        patch.setattr(SMTPProtocol, "write", spy_write)
        patch.setattr(aiosmtplib.SMTP, "sendmail", spy_sendmail)
        if not plain:
            patch.setattr(smtp_driver, "_plain_address", lambda address: False)
        provider = SmtpProvider("relay", options(server.port, connections=1, **opts))
        results = send_all(provider, *messages)
    outcomes = [
        f"{type(r).__name__} {r.code} {r}" if isinstance(r, ProviderError) else r.provider_reference
        for r in results
    ]
    return Transcript(outcomes, writes, len(calls), provider.connects, list(server.handler.envelopes))


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=30))
@example("alice@example.org")
@example("o'hara+news/2025=x?y@sub.mairie-fecamp.example")
@example("a..b.@c.")
@example("@@")
@example("alice@[127.0.0.1]")
@example("a[b]@c")
@example('"jean dupont"@example.org')
def test_a_plain_address_is_sent_as_given(address: str) -> None:
    """Whatever the plain envelope accepts, aiosmtplib would have put between angle brackets unchanged."""
    if smtp_driver._plain_address(address):
        assert quote_address(address) == f"<{address}>"


def test_which_addresses_are_plain() -> None:
    plain = ["alice@example.org", "info@mairie.example", "o'hara+x@a-b.example", "x_y.z!#$%&*/=?^`{|}~@d.e"]
    assert all(map(smtp_driver._plain_address, plain))
    odd = [
        "",
        '"jean dupont"@example.org',
        "alice@[127.0.0.1]",
        "élise@example.org",
        "alice@exämple.org",
        "a b@example.org",
        "a<b@example.org",
        "a>b@example.org",
        "a(b)@example.org",
        "a,b@example.org",
        "a;b@example.org",
        "a:b@example.org",
        "a\\b@example.org",
        "a\tb@example.org",
        "alice@example.org\r\nRSET",
        "a\x7fb@example.org",
    ]
    assert not any(map(smtp_driver._plain_address, odd))


@pytest.mark.parametrize(
    ("payload", "size"),
    [
        (b"a\r\nb\r\n", 6),
        (b"a\r\nb", 6),
        (b"", 2),
        (b"a\nb\n", 6),
        (b"a\rb\r\n", 6),
        (b"a\r", 3),
        (b"a\n\r", 5),
    ],
)
def test_the_announced_size_is_aiosmtplibs(payload: bytes, size: int) -> None:
    assert smtp_driver._wire_size(payload) == size
    assert size == len(smtp_driver.normalize_message_line_endings(payload))


def test_plain_envelope_delivers_the_exact_bytes(
    scripted: Server, fixed_date: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    msg = message(html=None, body=".a line that starts with a dot\n..and two\nend\n")
    payload = smartpush.email.email_bytes(msg)[0]
    assert b"\r\n.a line" in payload  # dot-stuffing is exercised
    fast = transcript(scripted, monkeypatch, msg, message(n=2, html=None))
    assert fast.sendmail_calls == 0
    assert fast.outcomes == ["<m-0001@mairie.example>", "<m-0002@mairie.example>"]
    (mail_from, rcpts, raw), _ = fast.envelopes
    assert (mail_from, rcpts) == ("info@mairie.example", ["alice@example.org"])
    assert raw == payload
    assert scripted.handler.mail_options[0] == [f"SIZE={len(payload)}"]
    assert b"MAIL FROM:<info@mairie.example> size=%d\r\n" % len(payload) in fast.writes
    assert b"RCPT TO:<alice@example.org>\r\n" in fast.writes
    assert b"RSET\r\n" not in fast.writes
    assert fast.connects == 1
    # sendmail itself writes exactly the same bytes
    slow = transcript(scripted, monkeypatch, msg, message(n=2, html=None), plain=False)
    assert slow.sendmail_calls == 2
    assert (slow.outcomes, slow.writes, slow.envelopes) == (fast.outcomes, fast.writes, fast.envelopes)


def test_plain_envelope_with_dkim_and_html(
    scripted: Server, dkim_key: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = {"domain": "mairie.example", "selector": "s2026", "private_key": dkim_key[0].decode()}
    fast = transcript(scripted, monkeypatch, message(), dkim=key)
    assert fast.sendmail_calls == 0 and fast.outcomes == ["<m-0001@mairie.example>"]
    [(_, _, raw)] = fast.envelopes
    assert raw.startswith(b"DKIM-Signature:")
    assert dkim.verify(raw, dnsfunc=lambda name, timeout=5: dkim_key[1])
    assert scripted.handler.mail_options == [[f"SIZE={len(raw)}"]]


@pytest.mark.parametrize(
    ("first", "kind", "code", "connects"),
    [
        ({"sender": "Mairie <refused@mairie.example>"}, TechnicalError, "553", 1),
        ({"sender": "Mairie <busy@mairie.example>"}, TransientError, "450 4.3.2", 1),
        ({"to": "bounce@example.org"}, PermanentError, "550 5.1.1", 1),
        ({"to": "later@example.org"}, TransientError, "451 4.3.0", 1),
        ({"headers": {"X-Test-Verdict": "reject"}}, PermanentError, "554 5.6.0", 1),
        ({"to": "slow@example.org"}, ThrottledError, "421 4.7.0", 2),  # 421: aiosmtplib hangs up
    ],
    ids=["sender-5xx", "sender-4xx", "rcpt-5xx", "rcpt-4xx", "data-5xx", "rcpt-421"],
)
def test_plain_envelope_refusals_are_sendmails(
    scripted: Server,
    fixed_date: None,
    monkeypatch: pytest.MonkeyPatch,
    first: dict[str, Any],
    kind: type[ProviderError],
    code: str,
    connects: int,
) -> None:
    """A refused MAIL, RCPT or DATA: the same error, code and RSET as sendmail; the next message goes."""
    messages = (message(n=1, html=None, **first), message(n=2, html=None))
    fast = transcript(scripted, monkeypatch, *messages)
    slow = transcript(scripted, monkeypatch, *messages, plain=False)
    assert fast.sendmail_calls == 0 and slow.sendmail_calls == 2
    assert fast.outcomes == slow.outcomes
    assert fast.outcomes[0].startswith(f"{kind.__name__} {code} ")
    assert "@" not in fast.outcomes[0]
    assert fast.outcomes[1] == "<m-0002@mairie.example>"
    assert [e[:2] for e in fast.envelopes] == [("info@mairie.example", ["alice@example.org"])]
    assert fast.writes == slow.writes  # every command, RSET included, byte for byte
    assert (fast.connects, slow.connects) == (connects, connects)
    # the envelope was reset on the same connection, unless the 421 closed it (then RSET cannot go)
    assert fast.writes.count(b"RSET\r\n") == (1 if connects == 1 else 0)
    mail = [w for w in fast.writes if w.startswith(b"MAIL FROM:")]
    assert len(mail) == 2


def test_an_address_that_needs_quoting_goes_through_sendmail(
    scripted: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    quoted = transcript(scripted, monkeypatch, message(to='"jean dupont"@example.org'), message(n=2))
    assert quoted.sendmail_calls == 1
    assert quoted.outcomes == ["<m-0001@mairie.example>", "<m-0002@mairie.example>"]
    assert b'RCPT TO:<"jean dupont"@example.org>\r\n' in quoted.writes
    assert [rcpts for _, rcpts, _ in quoted.envelopes] == [
        ['"jean dupont"@example.org'],
        ["alice@example.org"],
    ]


def test_a_connection_without_ehlo_yet_goes_through_sendmail_once(
    scripted: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # starttls: false and no credentials: connect() sends no EHLO, sendmail does it for the first message
    sent = transcript(scripted, monkeypatch, message(n=1), message(n=2), message(n=3), starttls=False)
    assert sent.outcomes == [f"<m-{n:04d}@mairie.example>" for n in (1, 2, 3)]
    assert sent.sendmail_calls == 1
    assert sum(w.startswith(b"EHLO ") for w in sent.writes) == 1
    assert sent.connects == 1


# -- DKIM ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dkim_key() -> tuple[bytes, bytes]:
    """(private key PEM, DNS TXT record) of a 2048-bit RSA key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def signed_headers(raw: bytes) -> list[str]:
    signature = parse(raw)["DKIM-Signature"]
    found = re.search(r"\bh=([^;]+)", re.sub(r"\s+", "", str(signature)))
    assert found
    return found.group(1).lower().split(":")


def test_dkim_signature_verifies_and_covers_rfc8058_headers(
    plain: Server, dkim_key: tuple[bytes, bytes], tmp_path: Path
) -> None:
    pem, txt = dkim_key
    (tmp_path / "dkim.pem").write_bytes(pem)
    from_text = {"domain": "mairie.example", "selector": "s2026", "private_key": pem.decode()}
    from_file = {"domain": "mairie.example", "selector": "s2026", "private_key_file": "dkim.pem"}
    for n, key in enumerate([from_text, from_file], start=1):
        provider = SmtpProvider("relay", options(plain.port, dkim=key), project_dir=tmp_path)
        [result] = send_all(provider, message(n=n))
        assert result.provider_reference == f"<m-{n:04d}@mairie.example>"
    queried: list[bytes] = []

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        queried.append(name)
        return txt if name == b"s2026._domainkey.mairie.example." else b""

    for _, _, raw in plain.handler.envelopes:
        assert raw.startswith(b"DKIM-Signature:")
        assert dkim.verify(raw, dnsfunc=dnsfunc)
        headers = signed_headers(raw)
        for name in [
            "from",
            "to",
            "subject",
            "date",
            "message-id",
            "list-unsubscribe",
            "list-unsubscribe-post",
        ]:
            assert name in headers
        tampered = raw.replace(
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", b"List-Unsubscribe-Post: x"
        )
        assert not dkim.verify(tampered, dnsfunc=dnsfunc)
    assert queried


def test_bad_dkim_key_is_a_config_error(tmp_path: Path) -> None:
    bad = {"domain": "mairie.example", "selector": "s", "private_key": "not a key"}
    with pytest.raises(ConfigError, match="PEM"):
        SmtpProvider("relay", options(25, dkim=bad))
    missing = {"domain": "mairie.example", "selector": "s", "private_key_file": "nope.pem"}
    with pytest.raises(ConfigError, match="private_key_file"):
        SmtpProvider("relay", options(25, dkim=missing), project_dir=tmp_path)


# -- classification ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text", "kind", "suppress", "retry_after"),
    [
        (421, "4.7.0 Try again later", ThrottledError, None, None),
        (421, "Service not available", ThrottledError, None, None),
        (451, "4.7.1 Rate limited, retry in 30 seconds", ThrottledError, None, 30.0),
        (450, "4.7.1 Greylisted, try again in 5 minutes", ThrottledError, None, 300.0),
        (454, "Throttling failure: Maximum sending rate exceeded.", ThrottledError, None, None),
        (451, "4.3.0 Temporary lookup failure", TransientError, None, None),
        (452, "4.2.2 Mailbox full, try later", TransientError, None, None),
        (450, "4.2.1 Mailbox busy", TransientError, None, None),
        (530, "5.7.0 Authentication required", TechnicalError, None, None),
        (535, "5.7.8 Authentication credentials invalid", TechnicalError, None, None),
        (550, "5.7.1 Message rejected due to content restrictions", TechnicalError, None, None),
        (554, "5.7.1 <x@y.example>: Relay access denied", TechnicalError, None, None),
        (
            550,
            "5.7.515 Access denied, sending domain does not meet authentication level",
            TechnicalError,
            None,
            None,
        ),
        (550, "5.1.1 The email account that you tried to reach does not exist", PermanentError, True, None),
        (551, "5.1.6 User has moved", PermanentError, True, None),
        (553, "5.1.3 Bad recipient address syntax", PermanentError, True, None),
        (550, "5.1.10 Recipient address rejected: null MX", PermanentError, True, None),
        (553, "5.1.8 Sender address rejected: Domain not found", TechnicalError, None, None),
        (550, "Requested action not taken: mailbox unavailable (user unknown)", PermanentError, True, None),
        (552, "5.2.2 Mailbox full", PermanentError, False, None),
        (552, "Requested mail action aborted: exceeded storage allocation", PermanentError, False, None),
        (550, "5.2.2 The user's mailbox is over quota", PermanentError, False, None),
        (552, "5.3.4 Message size exceeds fixed limit", PermanentError, False, None),
        (554, "5.6.0 Message content rejected", PermanentError, False, None),
        (550, "Rejected", PermanentError, False, None),
        (354, "Start mail input", TechnicalError, None, None),
    ],
)
def test_classify_reply(
    code: int, text: str, kind: type[ProviderError], suppress: bool | None, retry_after: float | None
) -> None:
    error = classify_reply(code, text)
    assert type(error) is kind
    assert error.code is not None and (error.code.startswith(str(code)) or error.code == "authentication")
    if suppress is not None:
        assert isinstance(error, PermanentError) and error.suppress is suppress
    assert error.retry_after_s == retry_after
    assert "@" not in str(error)


def instance_of(cls: type[Exception]) -> Exception:
    text = "5.1.1 <bob@example.org> unknown"
    if issubclass(cls, aiosmtplib.SMTPRecipientsRefused):
        return cls([aiosmtplib.SMTPRecipientRefused(550, text, "bob@example.org")])
    names = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    if names[:2] == ["code", "message"]:
        extra = ["bob@example.org"] * (len(names) - 2)
        return cls(550, text, *extra)
    return cls("connection to <bob@example.org> lost")


ERROR_CLASSES = sorted(
    (
        c
        for _, c in inspect.getmembers(aiosmtplib.errors, inspect.isclass)
        if issubclass(c, aiosmtplib.SMTPException)
    ),
    key=lambda c: c.__name__,
)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_aiosmtplib_exception_maps_to_a_provider_error(cls: type[Exception]) -> None:
    error = classify_exception(instance_of(cls))
    assert isinstance(error, ThrottledError | TransientError | PermanentError | TechnicalError)
    assert error.code
    assert "@" not in str(error)


def test_exception_mapping_details() -> None:
    assert len(ERROR_CLASSES) >= 14
    auth = classify_exception(aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad credentials"))
    assert isinstance(auth, TechnicalError) and auth.code == "authentication"
    disconnected = classify_exception(aiosmtplib.SMTPServerDisconnected("gone"))
    assert isinstance(disconnected, TransientError) and disconnected.code == "connection"
    connect = classify_exception(aiosmtplib.SMTPConnectError("refused"))
    assert isinstance(connect, TransientError) and connect.code == "connection"
    for timeout in (
        aiosmtplib.SMTPTimeoutError,
        aiosmtplib.SMTPReadTimeoutError,
        aiosmtplib.SMTPConnectTimeoutError,
    ):
        error = classify_exception(timeout("slow"))
        assert isinstance(error, TransientError) and error.code == "timeout"
    sender = classify_exception(
        aiosmtplib.SMTPSenderRefused(553, "5.1.8 <me@x.example> refused", "me@x.example")
    )
    assert isinstance(sender, TechnicalError)
    busy = classify_exception(aiosmtplib.SMTPSenderRefused(421, "4.7.0 slow down", "me@x.example"))
    assert isinstance(busy, ThrottledError)
    rcpt = aiosmtplib.SMTPRecipientRefused(550, "5.1.1 unknown", "bob@example.org")
    refused = classify_exception(aiosmtplib.SMTPRecipientsRefused([rcpt]))
    assert isinstance(refused, PermanentError) and refused.suppress
    data = classify_exception(aiosmtplib.SMTPDataError(554, "5.6.0 content rejected"))
    assert isinstance(data, PermanentError) and not data.suppress
    greeting = classify_exception(aiosmtplib.SMTPConnectResponseError(421, "too many connections"))
    assert isinstance(greeting, ThrottledError)
    assert isinstance(classify_exception(ConnectionRefusedError()), TransientError)
    assert isinstance(classify_exception(TimeoutError()), TransientError)
    assert isinstance(classify_exception(RuntimeError("bug")), TechnicalError)


def test_scrub_removes_addresses() -> None:
    text = "550 5.1.1 <bob.smith+tag@mail.example.org>: Recipient rejected for alice@example.org;\r\n next"
    cleaned = scrub(text)
    assert "@" not in cleaned and "\n" not in cleaned
    assert "<address>" in cleaned
    assert len(scrub("x" * 1000)) <= 200


def test_send_rate_is_measurable(plain: Server) -> None:
    """Not a benchmark gate: the pool sends a few hundred messages quickly against a local server."""
    provider = SmtpProvider("relay", options(plain.port, connections=4))
    count = 200

    async def go() -> float:
        start = time.perf_counter()
        try:
            await asyncio.gather(*(provider.send(message(n=i)) for i in range(count)))
        finally:
            await provider.close()
        return time.perf_counter() - start

    elapsed = asyncio.run(go())
    assert len(plain.handler.envelopes) == count
    assert elapsed < 60
