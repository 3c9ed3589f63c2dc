"""The RFC 5322 form of an email message, shared by every driver that produces one (``outbox``, ``smtp``).

:func:`build_email` makes a stdlib :class:`~email.message.EmailMessage`: ``From``, ``To``, ``Subject``
(RFC 2047 encoded words when it is not ASCII), ``Date``, ``Message-ID`` (``<message id@sender's
domain>``), then the message's own headers (``List-Unsubscribe``, ``List-Unsubscribe-Post``,
``Reply-To``... put there by the engine), and a text body or a ``multipart/alternative`` of text and
HTML. :func:`as_bytes` serialises it the way an SMTP server receives it: CRLF line ends, 7-bit clean
bodies (quoted-printable or base64, so no relay re-encodes them and breaks a DKIM body hash) and headers
folded only past 998 characters, so a ``List-Unsubscribe`` URL always stays one unencoded line.
"""

from __future__ import annotations

import binascii
import functools
import secrets
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr, formatdate, parseaddr

from .provider import OutboundMessage

__all__ = ["as_bytes", "build_email", "email_bytes", "message_id_header", "sender_domain"]

#: Bodies are encoded with the usual 78-character lines and never as raw 8-bit: a relay without
#: 8BITMIME would re-encode them, which breaks the DKIM body hash.
_BODY_POLICY = SMTP.clone(cte_type="7bit")
#: RFC 5322 allows 998-character lines: long enough that List-Unsubscribe's URL is never folded into
#: encoded words, which mail clients would not recognise as a link.
_WIRE_POLICY = SMTP.clone(cte_type="7bit", max_line_length=998)
#: The Message-ID domain when neither the caller nor the sender gives one (RFC 2606 reserved name).
_FALLBACK_DOMAIN = "smartpush.invalid"


def sender_domain(sender: str | None) -> str | None:
    """The domain of ``sender`` (``Name <user@example.org>`` or a bare address), or ``None``."""
    if not sender:
        return None
    _, address = parseaddr(sender)
    local, at, domain = address.rpartition("@")
    return domain.lower() if at and local and domain else None


def message_id_header(message: OutboundMessage, domain: str | None = None) -> str:
    """``<message id@domain>``: the domain given, else the sender's, else a reserved placeholder."""
    return f"<{message.message_id}@{domain or sender_domain(message.sender) or _FALLBACK_DOMAIN}>"


def build_email(message: OutboundMessage, *, domain: str | None = None) -> EmailMessage:
    """The email for ``message``: text, or text + HTML as multipart/alternative.

    ``domain`` is the right-hand side of the Message-ID; it defaults to the sender's domain. A header
    value with a line break raises :class:`ValueError` (header injection).
    """
    msg = EmailMessage(policy=_BODY_POLICY)
    msg["From"] = message.sender or ""
    msg["To"] = message.to
    msg["Subject"] = message.subject or ""
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = message_id_header(message, domain)
    for name, value in message.headers.items():
        msg[name] = value
    msg.set_content(message.body or "")
    if message.html:
        msg.add_alternative(message.html, subtype="html")
    return msg


def as_bytes(msg: EmailMessage) -> bytes:
    """The exact bytes an SMTP server receives for ``msg`` (CRLF line ends, 998-character header lines)."""
    return msg.as_bytes(policy=_WIRE_POLICY)


# The fast builder ------------------------------------------------------------------------------------
# build_email + as_bytes cost about 1.5 ms of CPU per text + HTML message (the stdlib's generic MIME
# machinery), more than sending it: 680 emails/s per core at best. email_bytes writes the same message
# directly (headers as text, bodies quoted-printable by binascii, in C): the same headers and bodies once
# parsed (tests/test_email.py checks it against build_email on random input), about 20 times cheaper.

#: Longest line RFC 5322 allows, CRLF excluded.
_MAX_LINE = 998


def email_bytes(message: OutboundMessage, *, domain: str | None = None) -> tuple[bytes, str]:
    """The wire form of ``message`` (as :func:`as_bytes` of :func:`build_email`) and its Message-ID.

    A header value with a line break raises :class:`ValueError` (header injection). Values with control
    characters and addresses that are not ASCII (SMTPUTF8) go through the stdlib builder.
    """
    sender, to = message.sender or "", message.to
    values = (sender, to, message.subject or "", *message.headers.values())
    if not all(v.isprintable() for v in values) or not (_ascii_address(sender) and _ascii_address(to)):
        # Control characters, tabs, line breaks (refused there), addresses that are not ASCII: rare
        # values that the stdlib's rules decide.
        msg = build_email(message, domain=domain)
        return as_bytes(msg), str(msg["Message-ID"])
    message_id = message_id_header(message, domain)
    lines = [
        _header("From", _address(sender)),
        _header("To", _address(to)),
        _header("Subject", message.subject or ""),
        _header("Date", formatdate(localtime=False)),
        _header("Message-ID", message_id),
    ]
    lines.extend(_header(name, value) for name, value in message.headers.items())
    text = _part("plain", message.body or "")
    if message.html:
        boundary = f"===============smartpush{secrets.token_hex(10)}=="
        lines.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
        lines.append("MIME-Version: 1.0")
        head = "\r\n".join(lines).encode("ascii")
        mark = f"--{boundary}\r\n".encode("ascii")
        html = _part("html", message.html)
        end = f"--{boundary}--\r\n".encode("ascii")
        return head + b"\r\n\r\n" + mark + text + b"\r\n" + mark + html + b"\r\n" + end, message_id
    lines.append("MIME-Version: 1.0")
    return "\r\n".join(lines).encode("ascii") + b"\r\n" + text, message_id


def _ascii_address(value: str) -> bool:
    return value.isascii() or parseaddr(value)[1].isascii()  # parsing only when there is a non-ASCII name


def _address(value: str) -> str:
    """``Name <addr>`` with a non-ASCII name in encoded words; ASCII values as given."""
    if value.isascii():
        return value
    name, address = parseaddr(value)
    return formataddr((name, address), charset="utf-8")


def _header(name: str, value: str) -> str:
    """``Name: value`` (printable) reading back as :func:`as_bytes` of :func:`build_email` writes it."""
    if value.isascii() and "=?" not in value and len(name) + 2 + len(value) <= _MAX_LINE:
        return f"{name}: {value}"  # ASCII, one line, no encoded words: reads back as the stdlib's line
    return _encoded_header(name, value)


#: Header lines that need encoded words or folding, by (name, value). A campaign's Subject is the same
#: string for nearly every recipient, and encoding a header costs 30-70 µs (about 9% of a worker's time when
#: it ran per message). Bounded and in memory only (a value may hold a recipient's name); never logged.
_ENCODED_HEADERS = 256


@functools.lru_cache(maxsize=_ENCODED_HEADERS)
def _encoded_header(name: str, value: str) -> str:
    """The stdlib builder's own lines for the header, no final CRLF (uncached: ``__wrapped__``).

    The header object of ``build_email`` (``msg[name] = value``) folded with ``as_bytes``'s policy: the
    same bytes, so the same value once parsed, whatever the value. The whole value in encoded words
    (``email.header.Header``, before) did not read back the same:

    - leading spaces: the stdlib writes them before the first encoded word, and a reader drops whitespace
      before a header's first word (the stdlib's parser does, as mail readers generally do with the space
      after the colon); kept inside an encoded word (RFC 2047), ``' ¡'`` read back as ``' ¡'`` from
      ``email_bytes`` but ``'¡'`` from ``build_email`` (and ``' a'`` as ``'a'`` from both);
    - text that looks like encoded words (``=?utf-8?q?...?=``): the stdlib decodes it, as any reader of
      an ASCII header does (hence ``=?`` in :func:`_header`);
    - address headers (``Reply-To: Mairie de Fécamp <accueil@...>``): the stdlib encodes the name alone;
      one encoded word for the whole value hid the address inside a display name.

    Only past 998 characters does the stdlib fold, and Python 3.11's folder can then drop a space between
    two encoded words (CPython gh-92081): the same in both builders, for subjects of hundreds of non-ASCII
    characters. Its encoded words are not split at RFC 2047's 75 characters (the 998-character policy of
    :func:`as_bytes`, as ``formataddr`` in :func:`_address`); readers commonly decode longer ones, and folding
    at 76 would meet gh-92081 on ordinary subjects.
    """
    lines: str = _WIRE_POLICY.header_factory(name, value).fold(policy=_WIRE_POLICY)
    return lines.removesuffix("\r\n")


def _part(subtype: str, content: str) -> bytes:
    """A body part: its Content-Type and Content-Transfer-Encoding lines, a blank line, the body."""
    content = content.replace("\r\n", "\n").replace("\r", "\n")
    if not content.endswith("\n"):
        content += "\n"
    if content.isascii() and max(map(len, content.split("\n"))) <= 78:  # noqa: PLR2004 - RFC 5322's advice
        body = content.replace("\n", "\r\n").encode("ascii")
        cte = "7bit"
    else:
        body = binascii.b2a_qp(content.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")
        cte = "quoted-printable"
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    ).encode("ascii") + body
