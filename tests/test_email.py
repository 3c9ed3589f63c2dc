"""smartpush.email: the RFC 5322 message shared by the outbox and smtp drivers."""

from __future__ import annotations

import asyncio
import email
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from smartpush.providers.outbox import OutboxOptions, OutboxProvider

from smartpush.email import as_bytes, build_email, message_id_header, sender_domain
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
