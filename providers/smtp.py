"""``smtp``: email through an SMTP relay, over a small pool of long-lived connections.

::

    providers:
      relay:
        type: smtp
        host: smtp.agency.example
        port: 587                 # 587: STARTTLS is required; 465 with tls: true; 25 upgrades if offered
        username: campaigns
        password: ${SMTP_PASSWORD}
        connections: 4            # connections kept open per worker process
        dkim:
          domain: agency.example
          selector: s2026
          private_key_file: /run/secrets/dkim.pem   # or private_key: ${DKIM_KEY}

Each send takes a free connection from the pool (waiting when all are busy), opens it if it is closed
(first use, after a 421, a timeout or the server hanging up: aiosmtplib closes the connection itself
in those cases), authenticates when a username is given, and runs one MAIL/RCPT/DATA transaction. A
connection that was dropped while idle is reopened once and the message sent again.

The envelope of a plain ASCII sender and recipient (nothing that needs quoting) is sent by
:func:`_send_plain`: the same MAIL/RCPT/DATA commands, replies, exceptions and RSET as aiosmtplib's
``sendmail``, without its four address parses per message; any other address goes through ``sendmail``.

The message is written by :func:`smartpush.email.email_bytes` (so it is the same as the ``outbox``'s
``.eml``; about 120 µs of CPU for text + HTML against 1.5 ms by the stdlib's builder), then signed
with DKIM when the account has a key: the signature covers From, To, Subject, Date, Message-ID and,
when present, List-Unsubscribe and List-Unsubscribe-Post, as RFC 8058 requires.

Replies are classified by :func:`classify_reply`: throttling (421, 4.7.x) waits, other 4xx retry, an
unknown mailbox (5.1.x) is permanent and suppresses the address, a full mailbox is permanent, policy
and authentication refusals (5.7.x, 530, 535) are technical failures of our side, any other 5xx is
permanent. Details never contain an address: the server's text is kept with addresses blanked out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import Any, ClassVar

import aiosmtplib
import dkim
from aiosmtplib import SMTPStatus
from aiosmtplib.protocol import normalize_message_line_endings
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from smartpush.email import email_bytes
from smartpush.errors import (
    ConfigError,
    PermanentError,
    ProviderError,
    TechnicalError,
    ThrottledError,
    TransientError,
)
from smartpush.provider import Channel, OutboundMessage, Provider, ProviderOptions, SendResult

__all__ = [
    "DkimOptions",
    "SmtpOptions",
    "SmtpProvider",
    "classify_exception",
    "classify_reply",
    "scrub",
]

log = logging.getLogger(__name__)

#: The submission port (RFC 6409), where STARTTLS is expected.
SUBMISSION_PORT = 587
#: The implicit-TLS submission port (RFC 8314).
SUBMISSIONS_PORT = 465
#: Reply classes (first digit, RFC 5321): transient and permanent negative completion.
TRANSIENT, PERMANENT = 4, 5
#: Enhanced status subjects (middle number, RFC 3463): X.1.x addressing, X.7.x security or policy.
ADDRESSING, POLICY = 1, 7
#: X.2.2: mailbox full (RFC 3463 calls it permanent; some servers send it as 4.2.2).
MAILBOX_FULL = (2, 2)
#: "Service not available, closing transmission channel": the server is shedding load.
SERVICE_NOT_AVAILABLE = 421
#: "Requested action aborted: exceeded storage allocation" (the mailbox is full) without an enhanced code.
EXCEEDED_STORAGE = 552
#: Replies that refuse our credentials: 530 authentication required, 534 mechanism too weak,
#: 535 credentials invalid, 538 encryption required for the mechanism (RFC 4954).
AUTH_REPLIES = frozenset({530, 534, 535, 538})
#: Basic codes that may mean "no such mailbox" when no enhanced status code says more (RFC 5321).
MAILBOX_REPLIES = frozenset({550, 551, 553})
#: X.1.7 and X.1.8 are about *our* sender address, not the recipient's (RFC 3463).
SENDER_ADDRESS_DETAILS = frozenset({7, 8})
#: The longest server text kept in an error detail.
MAX_DETAIL = 200
#: Headers the DKIM signature covers when present; RFC 8058 requires the two List-Unsubscribe ones.
DKIM_HEADERS = (
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "mime-version",
    "content-type",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-id",
    "feedback-id",
)
#: Seconds a QUIT may take when the pool closes.
QUIT_TIMEOUT_S = 5.0

#: An envelope address that aiosmtplib's ``quote_address`` puts between angle brackets unchanged:
#: printable ASCII without whitespace, quotes, brackets, parentheses, ``,;:`` or a backslash (``parseaddr``
#: ends or rewrites an address at those; ``[`` starts a domain literal). Others go through ``sendmail``.
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+\-./=?@^_`{|}~]+")
_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")
_ADDRESS = re.compile(r"<[^<>\s]*@[^<>\s]*>|[^\s<>()\[\]\"',;:]+@[^\s<>()\[\]\"',;:]+")
_THROTTLE_WORDS = re.compile(r"throttl|rate limit|too many|try again later|slow down", re.IGNORECASE)
_MAILBOX_WORDS = re.compile(
    r"user unknown|unknown user|no such user|no such (?:mailbox|recipient)|mailbox (?:unavailable|not found)"
    r"|does not exist|doesn't exist|unknown recipient|recipient unknown|invalid recipient|not found",
    re.IGNORECASE,
)
_FULL_WORDS = re.compile(r"mailbox full|mailbox is full|over quota|quota exceeded|insufficient storage", re.I)
_RETRY_IN = re.compile(
    r"(?:retry|try again|wait)\D{0,20}?(\d{1,6})\s*(s|sec|secs|seconds?|m|mins?|minutes?|h|hours?)\b",
    re.IGNORECASE,
)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


class DkimOptions(BaseModel):
    """Where DKIM signatures come from: ``d=`` domain, selector and an RSA private key in PEM."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str = Field(min_length=1)
    selector: str = Field(min_length=1)
    #: The PEM text itself, read from ``${VAR}``.
    private_key: SecretStr | None = None
    #: A PEM file, relative to the project folder.
    private_key_file: str | None = None

    @model_validator(mode="after")
    def _one_key(self) -> DkimOptions:
        if (self.private_key is None) == (self.private_key_file is None):
            raise ValueError("give the DKIM key once: either private_key or private_key_file")
        return self


class SmtpOptions(ProviderOptions):
    """An ``smtp`` account: the relay, how to reach it securely, how many connections, DKIM."""

    host: str = Field(min_length=1)
    port: int = Field(default=SUBMISSION_PORT, gt=0, lt=65536)
    #: Upgrade with STARTTLS: true is required, false never; unset means required on port 587 or with
    #: credentials, and used when offered otherwise.
    starttls: bool | None = None
    #: Implicit TLS from the first byte (port 465, the default port when this is true).
    tls: bool = False
    username: str | None = None
    password: SecretStr | None = None
    #: Connections kept open per worker process; sends beyond that wait for a free one.
    connections: int = Field(default=4, gt=0, le=100)
    #: The name we give in EHLO; defaults to this machine's FQDN.
    helo: str | None = None
    dkim: DkimOptions | None = None
    #: Check the server's certificate (only a lab relay may turn this off).
    verify_tls: bool = True
    #: A CA bundle (PEM) to trust instead of the system's, relative to the project folder.
    ca_file: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _tls_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tls") is True and "port" not in data:
            return {**data, "port": SUBMISSIONS_PORT}
        return data

    @model_validator(mode="after")
    def _coherent(self) -> SmtpOptions:
        if self.tls and self.starttls:
            raise ValueError("tls (implicit TLS) and starttls exclude each other: choose one")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.username is not None and not self.tls and self.starttls is False:
            raise ValueError("credentials must not travel in clear: remove starttls: false or use tls: true")
        return self

    @property
    def start_tls(self) -> bool | None:
        """aiosmtplib's ``start_tls``: True required, False never, None when the server offers it."""
        if self.tls:
            return False
        if self.starttls is not None:
            return self.starttls
        if self.port == SUBMISSION_PORT or self.username is not None:
            return True
        return None


def scrub(text: str) -> str:
    """``text`` with every email address replaced by ``<address>``, on one line and shortened."""
    flat = " ".join(_ADDRESS.sub("<address>", text).split())
    return flat if len(flat) <= MAX_DETAIL else flat[: MAX_DETAIL - 1] + "…"


def _retry_after(text: str) -> float | None:
    found = _RETRY_IN.search(text)
    if found is None:
        return None
    return float(int(found.group(1)) * _UNIT_SECONDS[found.group(2)[0].lower()])


def classify_reply(code: int, message: str) -> ProviderError:
    """The provider error for an SMTP reply that refused a message (RFC 5321 code, RFC 3463 status)."""
    enhanced = _ENHANCED.match(message)
    status = enhanced.group(0).strip() if enhanced else None
    text = scrub(message[enhanced.end() :] if enhanced else message)
    subject, detail_no = (int(enhanced.group(2)), int(enhanced.group(3))) if enhanced else (None, None)
    label = f"{code} {status}" if status else str(code)
    detail = f"the SMTP server answered {label}: {text}" if text else f"the SMTP server answered {label}"
    klass = code // 100
    if klass == TRANSIENT:
        if code == SERVICE_NOT_AVAILABLE or subject == POLICY or _THROTTLE_WORDS.search(message):
            return ThrottledError(detail, code=label, retry_after_s=_retry_after(message))
        return TransientError(detail, code=label)
    if klass != PERMANENT:
        return TechnicalError(f"unexpected SMTP reply: {detail}", code=label)
    if code in AUTH_REPLIES:
        return TechnicalError(detail, code="authentication")
    if subject == POLICY:  # security or policy: caused by our side, it will hit every message
        return TechnicalError(detail, code=label)
    if subject == ADDRESSING:
        if detail_no in SENDER_ADDRESS_DETAILS:
            return TechnicalError(detail, code=label)
        return PermanentError(detail, code=label, suppress=True)
    full = (subject, detail_no) == MAILBOX_FULL or (code == EXCEEDED_STORAGE and enhanced is None)
    if full or _FULL_WORDS.search(message):
        return PermanentError(f"mailbox full: {detail}", code=label)
    if enhanced is None and code in MAILBOX_REPLIES and _MAILBOX_WORDS.search(message):
        return PermanentError(detail, code=label, suppress=True)
    return PermanentError(detail, code=label)


def classify_exception(exc: BaseException) -> ProviderError:
    """The provider error for anything aiosmtplib (or the socket under it) raised during a send."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        if exc.recipients:
            first = exc.recipients[0]
            return classify_reply(first.code, first.message)
        return PermanentError("the SMTP server refused the recipient", code="recipient-refused")
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return TechnicalError(
            f"the SMTP server refused our credentials ({exc.code}): check username and password",
            code="authentication",
        )
    if isinstance(exc, aiosmtplib.SMTPSenderRefused | aiosmtplib.SMTPHeloError):
        if exc.code // 100 == TRANSIENT:  # a 4yz at MAIL FROM or EHLO is load shedding
            return classify_reply(exc.code, exc.message)
        what = "our sender address" if isinstance(exc, aiosmtplib.SMTPSenderRefused) else "our EHLO"
        return TechnicalError(f"the SMTP server refused {what}: {scrub(exc.message)}", code=str(exc.code))
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        if exc.code // 100 == TRANSIENT:  # "421 too many connections" and the like
            return classify_reply(exc.code, exc.message)
        return TechnicalError(
            f"the SMTP server refused the connection ({exc.code}): {scrub(exc.message)}", code="connection"
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException):  # SMTPDataError, SMTPRecipientRefused, others
        return classify_reply(exc.code, exc.message)
    if isinstance(exc, TimeoutError):  # SMTPTimeoutError and its subclasses, asyncio timeouts
        return TransientError("the SMTP server did not answer in time", code="timeout")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TechnicalError(
            "the SMTP server's certificate is not trusted: check host, ca_file or verify_tls", code="tls"
        )
    if isinstance(exc, aiosmtplib.SMTPNotSupported):
        return TechnicalError(
            f"the SMTP server lacks a feature we need: {scrub(str(exc))}", code="not-supported"
        )
    if isinstance(exc, ConnectionError | OSError):  # SMTPServerDisconnected, SMTPConnectError, refused
        return TransientError("the connection to the SMTP server failed or was lost", code="connection")
    if isinstance(exc, aiosmtplib.SMTPException):  # e.g. STARTTLS required but not offered
        return TechnicalError(f"SMTP error: {scrub(str(exc))}", code="smtp")
    return TechnicalError(f"unexpected error while sending: {type(exc).__name__}", code="internal")


def _plain_address(address: str) -> bool:
    """Whether ``address`` goes on the MAIL or RCPT line as ``<address>``, exactly as given."""
    return _PLAIN_ADDRESS.fullmatch(address) is not None


def _wire_size(payload: bytes) -> int:
    """The RFC 1870 size aiosmtplib announces: the octets DATA sends, lone CR or LF counted as CRLF."""
    crlf = payload.count(b"\r\n")
    if payload.count(b"\r") == crlf == payload.count(b"\n"):  # every line already ends in CRLF
        return len(payload) if payload.endswith(b"\r\n") else len(payload) + 2
    return len(normalize_message_line_endings(payload))


async def _send_plain(smtp: aiosmtplib.SMTP, sender: str, recipient: str, payload: bytes) -> None:
    """One MAIL/RCPT/DATA transaction for plain addresses (:func:`_plain_address`), after EHLO.

    The same commands, reply checks and exceptions as ``smtp.sendmail(sender, [recipient], payload)``
    in aiosmtplib 5: ``size=`` when the server has SIZE, :class:`~aiosmtplib.SMTPSenderRefused` unless
    MAIL gets 250, :class:`~aiosmtplib.SMTPRecipientsRefused` (its one recipient) unless RCPT gets 250
    or 251, :class:`~aiosmtplib.SMTPDataError` from ``data``, and after any refusal an RSET whose own
    failure (a disconnect, a bad reply) is ignored. ``sendmail``'s lock is not needed: the pool lends
    a connection to one send at a time.
    """
    options = [b"size=%d" % _wire_size(payload)] if smtp.supports_extension("size") else []
    try:
        reply = await smtp.execute_command(b"MAIL", b"FROM:<" + sender.encode("ascii") + b">", *options)
        if reply.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, sender)
        reply = await smtp.execute_command(b"RCPT", b"TO:<" + recipient.encode("ascii") + b">")
        if reply.code not in (SMTPStatus.completed, SMTPStatus.will_forward):
            refused = aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, recipient)
            raise aiosmtplib.SMTPRecipientsRefused([refused])
        await smtp.data(payload)
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as exc:
        # Reset the envelope for the connection's next message. Disconnected or a bad reply: ignored,
        # the refusal is what the caller needs to see.
        with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
            await smtp.rset()
        raise exc


@dataclass(slots=True)
class _Slot:
    """One place in the pool; holds a connection once it has been opened."""

    number: int
    smtp: aiosmtplib.SMTP | None = None


Signer = Callable[[bytes], bytes]


class SmtpProvider(Provider):
    """Sends email through one SMTP relay with a pool of connections; see the module docstring."""

    channels: ClassVar[frozenset[Channel]] = frozenset({Channel.EMAIL})
    Options: ClassVar[type[ProviderOptions]] = SmtpOptions

    def __init__(self, account: str, options: ProviderOptions, **context: Any) -> None:
        super().__init__(account, options, **context)
        if not isinstance(options, SmtpOptions):
            raise TypeError("SmtpProvider needs SmtpOptions")
        self.settings = options
        self._base = Path(context.get("project_dir", "."))
        self._timeout_s = options.timeout.total_seconds()
        self._signer = self._make_signer(options.dkim) if options.dkim else None
        # Made on the first send: the instance is built per worker process before any loop runs.
        self._pool: asyncio.LifoQueue[_Slot] | None = None
        self._slots: list[_Slot] = []
        self._tls_context: ssl.SSLContext | None = None
        #: Connections opened so far (for logs and tests).
        self.connects = 0

    # -- DKIM ------------------------------------------------------------------------------------

    def _make_signer(self, options: DkimOptions) -> Signer:
        if options.private_key is not None:
            key = options.private_key.get_secret_value().encode()
        else:
            assert options.private_key_file is not None  # noqa: S101 - the validator guarantees it
            path = self._base / options.private_key_file
            try:
                key = path.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"account {self.account}: cannot read dkim.private_key_file {path}: {exc.strerror}"
                ) from None
        try:
            dkim.crypto.parse_pem_private_key(key)
        except Exception:  # dkimpy raises several unrelated types for a bad key
            raise ConfigError(
                f"account {self.account}: the DKIM private key is not an RSA key in PEM"
            ) from None
        selector, domain = options.selector.encode(), options.domain.encode()
        headers = [h.encode() for h in DKIM_HEADERS]

        def sign(payload: bytes) -> bytes:
            signature: bytes = dkim.sign(payload, selector, domain, key, include_headers=headers)
            return signature + payload

        return sign

    # -- pool ------------------------------------------------------------------------------------

    def _queue(self) -> asyncio.LifoQueue[_Slot]:
        # Last in, first out: the connection used last is reused first, so a light load keeps only the
        # connections it needs open, and the pool grows to ``connections`` only under concurrency.
        if self._pool is None:
            self._pool = asyncio.LifoQueue()
            self._slots = [_Slot(n) for n in range(self.settings.connections)]
            for slot in self._slots:
                self._pool.put_nowait(slot)
        return self._pool

    def _tls(self) -> ssl.SSLContext:
        if self._tls_context is None:
            opts = self.settings
            cafile = str(self._base / opts.ca_file) if opts.ca_file else None
            context = ssl.create_default_context(cafile=cafile)
            if not opts.verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls_context = context
        return self._tls_context

    async def _open(self, slot: _Slot) -> aiosmtplib.SMTP:
        opts = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=opts.host,
            port=opts.port,
            username=opts.username,
            password=opts.password.get_secret_value() if opts.password is not None else None,
            local_hostname=opts.helo,
            timeout=self._timeout_s,
            use_tls=opts.tls,
            start_tls=opts.start_tls,
            tls_context=self._tls(),
        )
        try:
            await smtp.connect()
        except BaseException:
            smtp.close()  # a failed STARTTLS or AUTH leaves the socket open otherwise
            raise
        slot.smtp = smtp
        self.connects += 1
        log.debug(
            "account %s: SMTP connection %d opened to %s:%d",
            self.account,
            slot.number,
            opts.host,
            opts.port,
            extra={"provider": self.account, "outcome": "connected"},
        )
        return smtp

    @staticmethod
    def _drop(slot: _Slot) -> None:
        if slot.smtp is not None:
            slot.smtp.close()
            slot.smtp = None

    # -- sending ---------------------------------------------------------------------------------

    async def send(self, message: OutboundMessage) -> SendResult:
        if message.channel is not Channel.EMAIL:
            raise TechnicalError(f"the smtp driver sends email, not {message.channel.value}", code="channel")
        envelope_from = parseaddr(message.sender or "")[1]
        if "@" not in envelope_from:
            raise TechnicalError("the message has no sender address: set the channel's sender", code="sender")
        try:
            payload, reference = email_bytes(message)
        except ValueError:  # a header value with a line break; the value itself is not repeated
            raise TechnicalError(
                "the message cannot be written as email: a header value contains a line break", code="format"
            ) from None
        if self._signer is not None:
            payload = self._signer(payload)
        await self._transaction(envelope_from, message.to, payload)
        return SendResult(provider_reference=reference)

    async def _transaction(self, envelope_from: str, recipient: str, payload: bytes) -> None:
        plain = _plain_address(envelope_from) and _plain_address(recipient)
        pool = self._queue()
        slot = await pool.get()
        try:
            for attempt in range(2):
                reused = slot.smtp is not None and slot.smtp.is_connected
                try:
                    smtp = slot.smtp if reused and slot.smtp is not None else await self._reopen(slot)
                    if plain and not smtp.is_ehlo_or_helo_needed:
                        await _send_plain(smtp, envelope_from, recipient, payload)
                        return
                    # Other addresses, or no EHLO yet on this connection (sendmail sends it)
                    refused, _ = await smtp.sendmail(envelope_from, [recipient], payload)
                except asyncio.CancelledError:  # the transaction's state is unknown: never reuse it
                    self._drop(slot)
                    raise
                except aiosmtplib.SMTPServerDisconnected:
                    self._drop(slot)
                    if reused and attempt == 0:  # dropped while idle: once more on a fresh connection
                        log.info(
                            "account %s: SMTP connection %d was closed; reconnecting",
                            self.account,
                            slot.number,
                            extra={"provider": self.account, "outcome": "reconnecting"},
                        )
                        continue
                    raise TransientError(
                        "the connection to the SMTP server was lost", code="connection"
                    ) from None
                except Exception as exc:
                    if slot.smtp is not None and not slot.smtp.is_connected:
                        self._drop(slot)
                    error = classify_exception(exc)
                    # The code only: a server's words may quote the address.
                    log.debug(
                        "account %s: SMTP send refused (%s)",
                        self.account,
                        type(error).__name__,
                        extra={"provider": self.account, "code": error.code},
                    )
                    raise error from None
                if refused:  # only one recipient, so aiosmtplib raises instead; kept for safety
                    reply = next(iter(refused.values()))
                    raise classify_reply(reply.code, reply.message)
                return
        finally:
            pool.put_nowait(slot)

    async def _reopen(self, slot: _Slot) -> aiosmtplib.SMTP:
        self._drop(slot)
        return await self._open(slot)

    async def close(self) -> None:
        for slot in self._slots:
            smtp, slot.smtp = slot.smtp, None
            if smtp is None:
                continue
            try:
                if smtp.is_connected:
                    await asyncio.wait_for(smtp.quit(), QUIT_TIMEOUT_S)
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                pass
            finally:
                smtp.close()
