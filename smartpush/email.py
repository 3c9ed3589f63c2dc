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

from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, parseaddr

from .provider import OutboundMessage

__all__ = ["as_bytes", "build_email", "message_id_header", "sender_domain"]

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
