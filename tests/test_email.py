"""smartpush.email: the RFC 5322 message shared by the outbox and smtp drivers."""

from __future__ import annotations

import asyncio
import email
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from smartpush.providers.outbox import OutboxOptions, OutboxProvider

import smartpush.email
from smartpush.email import (
    _encoded_header,
    _header,
    as_bytes,
    build_email,
    email_bytes,
    message_id_header,
    sender_domain,
)
from smartpush.provider import Channel, OutboundMessage

UNSUBSCRIBE = "<https://unsubscribe.mairie.example/u/" + "a1b2c3d4" * 12 + ">, <mailto:stop@mairie.example>"


def message(**values: object) -> OutboundMessage:
    fields: dict[str, object] = {
        "message_id": "m-0001",
        "run_id": "r-1",
        "channel": Channel.EMAIL,
        "to": "alice@example.org",
        "sender": "Mairie de Fécamp <info@Mairie.example>",
        "subject": "Vaccination contre la grippe : prenez rendez-vous",
        "body": "Bonjour,\nLa campagne commence lundi.\n",
        "html": "<p>Bonjour,</p><p>La campagne commence <strong>lundi</strong>.</p>",
        "headers": {
            "List-Unsubscribe": UNSUBSCRIBE,
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "Reply-To": "accueil@mairie.example",
        },
    }
    fields.update(values)
    return OutboundMessage(**fields)  # type: ignore[arg-type]


def parse(raw: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def header_lines(raw: bytes) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    return head.split("\r\n")


def test_headers_and_multipart_structure() -> None:
    raw = as_bytes(build_email(message()))
    parsed = parse(raw)
    assert parsed["From"] == "Mairie de Fécamp <info@Mairie.example>"
    assert parsed["To"] == "alice@example.org"
    assert parsed["Message-ID"] == "<m-0001@mairie.example>"
    assert parsed["Date"]
    assert parsed["Reply-To"] == "accueil@mairie.example"
    assert parsed.get_content_type() == "multipart/alternative"
    parts = [p.get_content_type() for p in parsed.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    text = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content().replace("\r\n", "\n") == "Bonjour,\nLa campagne commence lundi.\n"
    assert "<strong>lundi</strong>" in html.get_content()


def test_utf8_subject_is_encoded_and_round_trips() -> None:
    subject = "Rappel : rendez-vous à l'hôpital — élèves & écoles ✓"
    raw = as_bytes(build_email(message(subject=subject)))
    raw.decode("ascii")  # every byte is 7-bit: the subject is in encoded words, bodies in QP or base64
    assert "=?utf-8?" in "\r\n".join(header_lines(raw)).lower()
    assert parse(raw)["Subject"] == subject


def test_list_unsubscribe_is_one_unencoded_line() -> None:
    raw = as_bytes(build_email(message()))
    lines = header_lines(raw)
    assert f"List-Unsubscribe: {UNSUBSCRIBE}" in lines
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in lines
    assert len(f"List-Unsubscribe: {UNSUBSCRIBE}") > 78  # long enough that default folding would apply


def test_crlf_line_ends_and_text_only() -> None:
    raw = as_bytes(build_email(message(html=None, body="Bonjour, c'est l'été\n")))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    parsed = parse(raw)
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content().replace("\r\n", "\n") == "Bonjour, c'est l'été\n"
    assert parsed["Content-Transfer-Encoding"] in {"quoted-printable", "base64"}


def test_long_body_lines_are_encoded_within_limits() -> None:
    raw = as_bytes(build_email(message(html="<p>" + "x" * 3000 + "</p>")))
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    html = parse(raw).get_body(("html",))
    assert html is not None and "x" * 3000 in html.get_content()


def test_header_injection_is_refused() -> None:
    with pytest.raises(ValueError):
        build_email(message(headers={"Reply-To": "a@example.org\r\nBcc: victim@example.org"}))


def test_message_id_domain() -> None:
    assert sender_domain("Mairie <info@Mairie.Example>") == "mairie.example"
    assert sender_domain("info@ville.example") == "ville.example"
    assert sender_domain("nobody") is None
    assert sender_domain(None) is None
    assert message_id_header(message(), "relay.example") == "<m-0001@relay.example>"
    assert message_id_header(message(sender=None)) == "<m-0001@smartpush.invalid>"
    assert build_email(message(), domain="relay.example")["Message-ID"] == "<m-0001@relay.example>"


def test_outbox_writes_the_same_eml(tmp_path: Path) -> None:
    options = OutboxOptions.model_validate({"type": "outbox", "path": "out"})
    provider = OutboxProvider("out", options, project_dir=tmp_path)
    result = asyncio.run(provider.send(message()))
    assert result.provider_reference == "outbox:m-0001"
    written = (tmp_path / "out" / "r-1" / "email" / "m-0001.eml").read_bytes()
    parsed = parse(written)
    assert parsed["Message-ID"] == "<m-0001@mairie.example>"
    assert parsed.get_content_type() == "multipart/alternative"
    assert f"List-Unsubscribe: {UNSUBSCRIBE}" in header_lines(written)


# The fast builder (email_bytes) against the stdlib one -----------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=400)


def same_message(a: bytes, b: bytes) -> None:
    """Parsed, ``a`` and ``b`` have the same headers (Date aside) and the same decoded bodies."""
    pa, pb = parse(a), parse(b)
    for name in (
        "From",
        "To",
        "Subject",
        "Message-ID",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "Reply-To",
    ):
        assert pa[name] == pb[name], name
    assert pa.get_content_type() == pb.get_content_type()
    for kind in ("plain", "html"):
        x, y = pa.get_body((kind,)), pb.get_body((kind,))
        assert (x is None) == (y is None), kind
        if x is not None and y is not None:
            assert x.get_content().replace("\r\n", "\n") == y.get_content().replace("\r\n", "\n"), kind


def wire_rules(raw: bytes) -> None:
    raw.decode("ascii")  # 7-bit clean
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


#: Printable subjects (the ones email_bytes encodes itself) made of what the two builders have differed on:
#: leading, trailing and repeated spaces around non-ASCII text, encoded-word lookalikes, long runs.
_subject_pieces = st.lists(
    st.sampled_from(
        [" ", "  ", "a", "Zoé", "¡", "✓", "日本", "🙂", "=?", "?=", "=?utf-8?q?a?=", "_", "x" * 90]
    ),
    max_size=30,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(
    subject=_subject_pieces
    | _text.filter(lambda s: "\r" not in s and "\n" not in s and len(s.splitlines()) <= 1),
    body=_text,
    html=st.none() | _text.filter(bool),
    # Display names as people write them: letters (any script), digits, spaces, hyphens, apostrophes.
    name=st.text(
        st.characters(whitelist_categories=("L", "N", "Zs"), whitelist_characters="-'"), max_size=40
    ),
)
# Found by hypothesis: a leading space before non-ASCII text read back as ' ¡' from email_bytes (inside
# the encoded word) but as '¡' from the stdlib (before it, where readers drop it, as they do for ' a').
@example(subject=" ¡", body="", html=None, name="")
@example(subject="  ¡  b  ✓ ", body="", html=None, name="")
@example(subject=" " + "x" * 1000, body="", html=None, name="")  # ASCII, folded
@example(subject="¡ =?utf-8?q?a?=", body="", html=None, name="")  # decoded by the stdlib
@example(subject="=?utf-8?b? =(=?us-ascii?q?x?=B ?=w6k=-", body="", html=None, name="")  # ASCII, malformed
@example(subject="Вакцинация против гриппа: запишитесь " * 30, body="", html=None, name="")  # past 998
# A Reply-To with a non-ASCII name kept its address inside one encoded word (no address to reply to).
@example(subject="Grippe ✓", body="", html=None, name="Mairie de Fécamp")
def test_email_bytes_reads_back_as_the_stdlib_message(
    subject: str, body: str, html: str | None, name: str
) -> None:
    m = message(
        subject=subject,
        body=body,
        html=html,
        sender=f"{name} <info@mairie.example>" if name.strip() else "info@mairie.example",
        headers={
            "List-Unsubscribe": UNSUBSCRIBE,
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "Reply-To": f"{name} <accueil@mairie.example>" if name.strip() else "accueil@mairie.example",
        },
    )
    fast, message_id = email_bytes(m)
    wire_rules(fast)
    same_message(fast, as_bytes(build_email(m)))
    assert parse(fast)["Reply-To"].addresses[0].addr_spec == "accueil@mairie.example"
    assert message_id == "<m-0001@mairie.example>"


def stdlib_line(name: str, value: str) -> str:
    """The header as build_email + as_bytes write it: ``Name: value``, folded lines joined by CRLF."""
    msg = EmailMessage()
    msg[name] = value
    return as_bytes(msg).split(b"\r\n\r\n", 1)[0].decode("ascii")


def read_back(line: str, name: str) -> str:
    return str(parse(line.encode("ascii") + b"\r\n\r\n")[name])


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(["Subject", "X-Campaign", "List-Unsubscribe"]),
    value=(_subject_pieces | _text).filter(str.isprintable),  # email_bytes hands the others to the stdlib
)
@example(name="Subject", value=" ¡")
@example(name="X-Campaign", value="   grippe ✓  ")
@example(name="Subject", value="Rappel : rendez-vous à l'hôpital — élèves & écoles ✓ " * 3)
@example(name="Subject", value="=?utf-8?q?=C3=A9?= et =?utf-8?q?=ZZ?= ¡")
@example(name="List-Unsubscribe", value="<https://x.example/u?t==?utf-8?q?a?=>")
@example(name="Reply-To", value="Mairie de Fécamp <accueil@mairie.example>")
@example(name="Reply-To", value='Zoé <zoe@a.example>, "Dupont, Léa" <lea@b.example>')
def test_header_lines_read_back_as_the_stdlib_lines(name: str, value: str) -> None:
    line = _header(name, value)
    wire_rules(line.encode("ascii"))
    assert read_back(line, name) == read_back(stdlib_line(name, value), name)


def test_email_bytes_keeps_the_guarantees_of_the_stdlib_message() -> None:
    raw, _ = email_bytes(message(html="<p>" + "x" * 3000 + "</p>"))
    wire_rules(raw)
    assert f"List-Unsubscribe: {UNSUBSCRIBE}" in header_lines(raw)  # one unencoded line
    with pytest.raises(ValueError):
        email_bytes(message(headers={"Reply-To": "a@example.org\r\nBcc: victim@example.org"}))
    for brk in ("\n", "\r", "\x1e", "\u2028"):
        with pytest.raises(ValueError):
            email_bytes(message(subject=f"Bonjour{brk}Bcc: victim@example.org"))
    # A non-ASCII address (SMTPUTF8) goes through the stdlib builder.
    raw, _ = email_bytes(message(to="zoé@exemple.fr"))
    assert parse(raw)["To"] == "zoé@exemple.fr"
    assert email_bytes(message(), domain="relay.example")[1] == "<m-0001@relay.example>"


# The cache of encoded header lines -----------------------------------------------------------------

#: Unstructured headers: any text is a value (an address header's value is an address: examples below).
_HEADER_NAMES = st.sampled_from(["Subject", "Comments", "X-Campaign"])
#: Values that need encoded words (not ASCII) or folding (longer than a line), without line breaks.
_ENCODED_VALUES = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=300).filter(
        lambda s: not s.isascii() and s.isprintable()
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1000, max_size=1500),
)


@settings(max_examples=200, deadline=None)
@given(name=_HEADER_NAMES, value=_ENCODED_VALUES)
@example(name="Subject", value="Grippe : la vaccination commence à l'école ✓")
@example(name="Subject", value="Вакцинация против гриппа: запишитесь " * 8)
@example(name="Subject", value="予防接種のお知らせ 🙂" * 12)
@example(name="X-Campaign", value="x" * 997)
@example(name="From", value="Mairie de Fécamp <info@mairie.example>")
@example(name="Reply-To", value="Zoé <zoe@a.example>, Léa <lea@b.example>")
def test_the_cached_header_is_the_uncached_encoding(name: str, value: str) -> None:
    _encoded_header.cache_clear()
    expected = stdlib_line(name, value)
    first = _header(name, value)  # computed and kept
    second = _header(name, value)  # from the cache
    assert _encoded_header.cache_info()[:2] == (1, 1)  # (hits, misses): the second call was a hit
    assert first == second == _encoded_header.__wrapped__(name, value) == expected
    assert "=?utf-8?" in first or value.isascii()


def test_plain_header_values_bypass_the_cache_and_the_cache_is_bounded() -> None:
    _encoded_header.cache_clear()
    assert (
        _header("Subject", "Vaccination : prenez rendez-vous") == "Subject: Vaccination : prenez rendez-vous"
    )
    assert _encoded_header.cache_info().currsize == 0
    for n in range(300):
        _header("Subject", f"Bonjour Zoé n°{n}")
    info = _encoded_header.cache_info()
    assert info.maxsize == 256 and info.currsize == 256


def test_email_bytes_is_the_same_from_the_header_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        smartpush.email, "formatdate", lambda localtime=False: "Tue, 04 Mar 2025 09:00:00 -0000"
    )
    subject = "Rappel : rendez-vous à l'hôpital — élèves & écoles ✓ " * 3
    m = message(subject=subject, html=None)
    _encoded_header.cache_clear()
    cold = email_bytes(m)
    warm = email_bytes(m)
    assert _encoded_header.cache_info().hits >= 1
    _encoded_header.cache_clear()
    assert cold == warm == email_bytes(m)
    assert parse(warm[0])["Subject"] == subject
