"""Bounce mail: delivery status notifications (RFC 3464) read from a Maildir or an mbox and applied to
the ledger (``smartpush bounces``).

An email accepted by the relay is ``sent``; when a mail server down the line refuses it, the bounce
comes back later as a DSN in the sender's mailbox. Each DSN is matched to its message by the
original's ``Message-ID`` (``<message id@domain>``, :func:`smartpush.email.message_id_header`), taken
from the DSN's third part (``message/rfc822`` or ``text/rfc822-headers``), else from
``X-Original-Message-ID``/``Original-Message-ID``, ``In-Reply-To`` or ``References``. Then, from the
recipient blocks of its ``message/delivery-status`` part (those naming the message's address when
any does):

- ``Action: failed`` and ``Status: 5.x.x``: a **hard bounce**. The message becomes
  ``permanent-failure`` (error code the status, error text from :data:`MEANINGS`, never the server's
  diagnostic, which may quote the address) and the address goes on the suppression list
  (``hard-bounce``, source ``bounces``).
- ``5.7.x`` (security or policy: our reputation, SPF/DKIM/DMARC, blocked content) and ``5.1.7``/
  ``5.1.8`` (RFC 3463: *our* sender address is bad): **sender-side**. The message fails, the
  recipient's address stays usable: suppressing it would punish the citizen for our mistake.
- ``5.2.2`` (mailbox full): the message fails, the address stays usable, as the ``smtp`` driver does
  for the same refusal made during the SMTP session.
- ``4.x.x``, ``Action: delayed``, ``delivered``, ``relayed``, ``expanded``: **ignored** (the relay
  still retries, or the mail went through).

A message that is no longer ``sent`` is left as it is: ``delivered`` or ``permanent-failure`` counts as
*already applied* (so reading the same mailbox twice changes nothing the second time), any other
status (a message handed back for a retry, expired...) as *other status*. A DSN whose message is not
in the ledger is *unknown*; mail that is not a DSN (auto-replies, complaints, spam) or cannot be
understood is *skipped*. Nothing is deleted or moved from the mailbox.

Addresses and diagnostic texts are read to match and classify, and go nowhere else: not to the
ledger, a log line or the report, which holds counts, status codes, message ids and mailbox keys.
"""

from __future__ import annotations

import email
import logging
import mailbox
import re
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .ledger import Ledger, MessageRecord, Status, Suppression
from .unsubscribe import recipient_hash

__all__ = [
    "MEANINGS",
    "BounceReport",
    "Dsn",
    "MailSource",
    "NotADsn",
    "Outcome",
    "RecipientBlock",
    "apply_bounces",
    "meaning",
    "open_mailbox",
    "read_dsn",
]

_log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """What one mail of the mailbox did to the ledger."""

    HARD_BOUNCE = "hard_bounce"  # message failed, address suppressed
    MAILBOX_FULL = "mailbox_full"  # message failed, address kept
    SENDER_SIDE = "sender_side"  # 5.7.x, 5.1.7, 5.1.8: message failed, address kept
    IGNORED = "ignored"  # delayed, 4.x.x, delivered, relayed, expanded
    UNKNOWN = "unknown"  # a DSN for a message this ledger does not hold
    SKIPPED = "skipped"  # not a DSN, or one that cannot be understood
    ALREADY_APPLIED = "already_applied"  # the message is already delivered or permanent-failure
    OTHER_STATUS = "other_status"  # the message is in another status than sent: left as it is


#: The outcomes that fail a ``sent`` message, most telling first (a DSN with several recipient
#: blocks takes the first one found among them).
_FAILING = (Outcome.HARD_BOUNCE, Outcome.SENDER_SIDE, Outcome.MAILBOX_FULL)

#: What an enhanced status code means (RFC 3463, RFC 7505, and the 5.7.x codes the large mailbox
#: providers document), written for the report's ``error`` column. Never the server's own text.
MEANINGS: dict[str, str] = {
    "5.0.0": "permanent failure, no detail given",
    "5.1.0": "the address was refused",
    "5.1.1": "the mailbox does not exist",
    "5.1.2": "the recipient's domain does not exist or takes no mail",
    "5.1.3": "the address is malformed",
    "5.1.4": "the address is ambiguous",
    "5.1.6": "the mailbox has moved and left no forwarding address",
    "5.1.7": "our sender address is malformed",
    "5.1.8": "our sender domain was refused",
    "5.1.10": "the address does not exist (or its domain takes no mail)",
    "5.2.0": "the mailbox cannot take mail",
    "5.2.1": "the mailbox is disabled",
    "5.2.2": "the mailbox is full",
    "5.2.3": "the message is larger than the mailbox accepts",
    "5.3.0": "the recipient's mail system refused the message",
    "5.3.4": "the message is larger than the recipient's system accepts",
    "5.4.0": "the message could not be routed",
    "5.4.1": "the recipient's mail server did not answer",
    "5.4.4": "the recipient's domain cannot be reached",
    "5.4.6": "the recipient's mail system forwards in a loop",
    "5.4.7": "delivery took too long and was given up",
    "5.5.0": "the recipient's mail server refused our mail protocol",
    "5.6.0": "the message's content was refused",
    "5.7.0": "refused by a security or policy rule",
    "5.7.1": "refused by the recipient's policy (sender or content not allowed)",
    "5.7.23": "refused: our SPF check failed",
    "5.7.25": "refused: our sending server has no reverse DNS",
    "5.7.26": "refused: our SPF, DKIM or DMARC authentication failed",
    "5.7.27": "refused: our SPF check failed",
    "5.7.509": "refused: our domain's DMARC check failed",
    "5.7.515": "refused: our domain does not meet the authentication requirements",
    "5.7.606": "refused: our sending address or server is blocked",
}
#: By subject (RFC 3463's middle number), for codes :data:`MEANINGS` does not name.
_SUBJECTS = {
    0: "permanent failure",
    1: "the address was refused",
    2: "the mailbox cannot take mail",
    3: "the recipient's mail system refused the message",
    4: "the message could not be routed",
    5: "the recipient's mail server refused our mail protocol",
    6: "the message's content was refused",
    7: "refused by a security or policy rule",
}
#: Subjects and details of RFC 3463 about our side, not the recipient's address.
_POLICY_SUBJECT = 7
_SENDER_ADDRESS = frozenset({(1, 7), (1, 8)})
_MAILBOX_FULL = (2, 2)

#: Content types of a DSN's third part: the original message or its headers (RFC 3462, RFC 6533).
_ORIGINAL_TYPES = ("message/rfc822", "text/rfc822-headers", "message/global", "message/global-headers")
_STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")
#: Headers, in order of trust, that may name the original message when its headers are missing.
_FALLBACK_HEADERS = ("X-Original-Message-ID", "Original-Message-ID", "In-Reply-To", "References")

_STATUS = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\d)")
#: "smtp; 550 5.1.1 ..." or "smtp; 550-5.1.1 ...": the reply code and the enhanced code after it.
_DIAGNOSTIC = re.compile(r"^\s*([245])\d\d(?:[\s-]+([245])\.(\d{1,3})\.(\d{1,3})(?!\d))?")
_MESSAGE_ID = re.compile(r"<\s*([^<>@\s]+)@([^<>@\s]+)\s*>")
#: DSNs looked up in the ledger at once.
_BATCH = 500


def meaning(code: str) -> str:
    """A short text for an enhanced status code, for the report: ``"5.1.1"`` → the mailbox does not exist."""
    if code in MEANINGS:
        return MEANINGS[code]
    found = _STATUS.match(code)
    if found is None:
        return "permanent failure"
    return _SUBJECTS.get(int(found.group(2)), "permanent failure")


# Reading a DSN -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecipientBlock:
    """One per-recipient block of a ``message/delivery-status`` part.

    ``recipients`` (the ``Original-Recipient`` and ``Final-Recipient`` addresses, lower-cased) only
    serve to find the block about the message's own address; they are kept out of ``repr``.
    """

    action: str  # failed, delayed, delivered, relayed, expanded (lower-cased as written)
    status: str  # an enhanced status code such as "5.1.1"
    recipients: frozenset[str] = field(default=frozenset(), repr=False)

    @property
    def outcome(self) -> Outcome:
        """What this block alone asks for: a failing outcome, or :attr:`Outcome.IGNORED`."""
        klass, subject, detail = (int(n) for n in self.status.split("."))
        if self.action != "failed" or klass != 5:  # noqa: PLR2004 - class 5: permanent failure
            return Outcome.IGNORED
        if subject == _POLICY_SUBJECT or (subject, detail) in _SENDER_ADDRESS:
            return Outcome.SENDER_SIDE
        if (subject, detail) == _MAILBOX_FULL:
            return Outcome.MAILBOX_FULL
        return Outcome.HARD_BOUNCE


@dataclass(frozen=True)
class Dsn:
    """A delivery status notification: which message it is about, and its recipient blocks."""

    message_ids: tuple[str, ...]  # ``<left@right>`` values naming the original, most trusted first
    blocks: tuple[RecipientBlock, ...]

    def verdict(self, address: str | None) -> tuple[Outcome, str]:
        """The outcome and status code for a message sent to ``address``.

        The blocks naming that address decide when there are any, else all of them; among them a
        failure wins over the rest, a hard bounce over the other failures.
        """
        wanted = address.strip().lower() if address else None
        chosen = [b for b in self.blocks if wanted in b.recipients] if wanted else []
        chosen = chosen or list(self.blocks)
        for outcome in _FAILING:
            for block in chosen:
                if block.outcome is outcome:
                    return outcome, block.status
        return Outcome.IGNORED, chosen[0].status


class NotADsn(ValueError):
    """This mail is not a DSN smartpush can use; ``reason`` says why: ``not-a-dsn`` or ``malformed``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_dsn(data: bytes) -> Dsn:
    """The DSN in a mail's bytes; :class:`NotADsn` when it is none or cannot be understood.

    A DSN is a ``multipart/report`` with ``report-type=delivery-status`` (or holding a
    ``message/delivery-status`` part) and at least one recipient block with an ``Action`` and a
    readable ``Status`` (or, lacking one, an SMTP reply code in ``Diagnostic-Code``).
    """
    try:
        return _read_dsn(data)
    except NotADsn:
        raise
    except Exception as exc:  # the stdlib parser on hostile input: whatever it raises, the mail is unusable
        raise NotADsn("malformed") from exc


def _read_dsn(data: bytes) -> Dsn:
    msg = email.message_from_bytes(data, policy=default_policy)
    if msg.get_content_type() != "multipart/report":
        raise NotADsn("not-a-dsn")
    status_part = next((p for p in msg.walk() if p.get_content_type() in _STATUS_TYPES), None)
    report_type = str(msg.get_param("report-type", "") or "").lower()
    if status_part is None:
        raise NotADsn("malformed" if report_type == "delivery-status" else "not-a-dsn")
    per_message, *per_recipient = _status_fields(status_part)
    blocks = tuple(b for b in (_block(fields) for fields in per_recipient) if b is not None)
    if not blocks:
        raise NotADsn("malformed")
    ids: list[str] = []
    original = next((p for p in msg.walk() if p.get_content_type() in _ORIGINAL_TYPES), None)
    if original is not None:
        ids.extend(_ids(_values(_original_headers(original), "Message-ID")))
    for name in _FALLBACK_HEADERS:
        ids.extend(_ids(_values(per_message, name)))
        ids.extend(_ids(_values(msg, name)))
    return Dsn(tuple(dict.fromkeys(ids)), blocks)


def _status_fields(part: Message) -> list[Message]:
    """The field groups of a delivery-status part: the per-message one, then one per recipient."""
    payload = part.get_payload()
    if isinstance(payload, list):  # the stdlib parsed the groups already
        groups = [g for g in payload if isinstance(g, Message) and len(g) > 0]
    else:  # an encoded part, or message/global-delivery-status (UTF-8, RFC 6533): parse the text
        raw = part.get_payload(decode=True)
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(payload)
        chunks = re.split(r"\r?\n[ \t]*\r?\n", text.strip())
        parser = email.parser.HeaderParser(policy=default_policy)
        groups = [g for g in (parser.parsestr(c.strip() + "\n") for c in chunks if c.strip()) if len(g)]
    if not groups:
        raise NotADsn("malformed")
    if _values(groups[0], "Action"):  # no per-message group: the recipients come first
        groups.insert(0, Message())
    return groups


def _block(fields: Message) -> RecipientBlock | None:
    action = _first(fields, "Action").strip().lower()
    if not action:
        return None
    status = _status(_first(fields, "Status"), _first(fields, "Diagnostic-Code"))
    if status is None:
        return None
    recipients = set()
    for name in ("Original-Recipient", "Final-Recipient"):
        for value in _values(fields, name):
            address = value.partition(";")[2].strip().strip("<>").strip().lower()
            if address:
                recipients.add(address)
    return RecipientBlock(action, status, frozenset(recipients))


def _status(status: str, diagnostic: str) -> str | None:
    """The enhanced status code of a block: its ``Status``, made precise by ``Diagnostic-Code``.

    Exim writes ``Status: 5.0.0`` for every refusal and the remote's ``550 5.1.1`` in the diagnostic:
    a generic ``X.0.0`` takes the diagnostic's code of the same class. Without a ``Status``, the
    diagnostic's enhanced code, else its reply code's class (``550`` → ``5.0.0``).
    """
    reply = _DIAGNOSTIC.match(diagnostic.partition(";")[2] if ";" in diagnostic else diagnostic)
    detailed = (
        f"{reply.group(2)}.{int(reply.group(3))}.{int(reply.group(4))}"
        if reply is not None and reply.group(2)
        else None
    )
    found = _STATUS.match(status)
    if found is not None:
        code = f"{found.group(1)}.{int(found.group(2))}.{int(found.group(3))}"
        if code.endswith(".0.0") and detailed is not None and detailed[0] == code[0]:
            return detailed
        return code
    if detailed is not None:
        return detailed
    return f"{reply.group(1)}.0.0" if reply is not None else None


def _original_headers(part: Message) -> Message:
    """The headers of the original message a DSN carries (the whole message, or its headers only)."""
    payload = part.get_payload()
    if isinstance(payload, list):  # message/rfc822: the stdlib parsed the message
        first = payload[0] if payload else None
        return first if isinstance(first, Message) else Message()
    raw = part.get_payload(decode=True)
    data = raw if isinstance(raw, bytes) else str(payload).encode("utf-8", "replace")
    return BytesHeaderParser(policy=default_policy).parsebytes(data.lstrip(b"\r\n"))


def _values(msg: Message, name: str) -> list[str]:
    """Every value of header ``name`` as text; a value the header parser chokes on is left out."""
    try:
        return [str(v) for v in msg.get_all(name) or ()]
    except Exception:  # a malformed header must not lose the rest of the DSN
        return []


def _first(msg: Message, name: str) -> str:
    values = _values(msg, name)
    return values[0] if values else ""


def _ids(values: Sequence[str]) -> list[str]:
    return [f"<{m.group(1)}@{m.group(2)}>" for value in values for m in _MESSAGE_ID.finditer(value)]


# The mailbox ---------------------------------------------------------------------------------------
@dataclass
class MailSource:
    """An opened mailbox: ``kind`` is ``maildir`` or ``mbox``."""

    path: Path
    kind: str
    box: mailbox.Mailbox[Any]

    def mail_keys(self) -> list[str]:
        """Every mail's key, in a stable order (Maildir file names, mbox positions)."""
        return sorted(self.box.keys())

    def read(self, key: str) -> bytes:
        return self.box.get_bytes(key)

    def close(self) -> None:
        self.box.close()


def open_mailbox(path: Path) -> MailSource:
    """The Maildir (a folder holding ``cur/`` and ``new/``) or mbox file (first line ``From ``) at ``path``.

    Anything else raises :class:`ConfigError` naming the path and what was expected. An empty file is
    an empty mbox (a spool file after its mail was read).
    """
    expected = (
        "a Maildir (a folder holding cur/, new/ and tmp/) or an mbox file (whose first line starts "
        "with 'From ')"
    )
    if path.is_dir():
        if (path / "cur").is_dir() and (path / "new").is_dir():
            return MailSource(path, "maildir", mailbox.Maildir(path, factory=None, create=False))
        raise ConfigError(f"{path} is a folder without cur/ and new/: expected {expected}")
    if not path.exists():
        raise ConfigError(f"{path} does not exist: expected {expected}")
    if not path.is_file():
        raise ConfigError(f"{path} is not a regular file: expected {expected}")
    try:
        with path.open("rb") as f:
            head = f.read(5)
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror}): expected {expected}") from None
    if head not in (b"", b"From "):
        raise ConfigError(f"{path} is neither a Maildir nor an mbox file: expected {expected}")
    try:
        box = mailbox.mbox(path, factory=None, create=False)
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read as an mbox ({exc.strerror})") from None
    return MailSource(path, "mbox", box)


# Applying ------------------------------------------------------------------------------------------
@dataclass
class BounceReport:
    """What ``smartpush bounces`` found and did: counts, status codes, message ids. No addresses."""

    path: str
    kind: str
    dry_run: bool
    read: int = 0
    counts: Counter[Outcome] = field(default_factory=Counter)
    #: Ledger message ids per outcome (outcomes about a message found in the ledger).
    message_ids: dict[Outcome, list[str]] = field(default_factory=dict)
    #: Mailbox keys of the mail that was skipped or about an unknown message, to look at by hand.
    mail_keys: dict[Outcome, list[str]] = field(default_factory=dict)
    #: Why mail was skipped: ``not-a-dsn``, ``malformed``, ``unreadable``.
    skipped: Counter[str] = field(default_factory=Counter)
    #: Status codes of the DSNs that failed a message in this pass.
    codes: Counter[str] = field(default_factory=Counter)
    #: Entries added to the suppression list (with ``dry_run``: that would be added).
    suppressed: int = 0
    #: Hard bounces whose message no longer holds its address (purged): nothing to suppress.
    address_missing: int = 0

    def count(self, outcome: Outcome, *, message_id: str | None = None, key: str | None = None) -> None:
        self.counts[outcome] += 1
        if message_id is not None:
            self.message_ids.setdefault(outcome, []).append(message_id)
        elif key is not None:
            self.mail_keys.setdefault(outcome, []).append(key)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": True,
            "path": self.path,
            "format": self.kind,
            "dry_run": self.dry_run,
            "read": self.read,
            "counts": {o.value: self.counts[o] for o in Outcome},
            "suppressed": self.suppressed,
            "address_missing": self.address_missing,
            "codes": dict(sorted(self.codes.items())),
            "skipped_reasons": dict(sorted(self.skipped.items())),
            "message_ids": {o.value: ids for o, ids in self.message_ids.items()},
            "mail_keys": {o.value: keys for o, keys in self.mail_keys.items()},
        }


@dataclass
class _Pending:
    key: str
    dsn: Dsn


@dataclass
class _Pass:
    """One reading of a mailbox: what it decided so far, and for which messages."""

    ledger: Ledger
    key: bytes
    providers: Collection[str]
    dry_run: bool
    now: datetime
    report: BounceReport
    decided: set[str] = field(default_factory=set)  # messages a DSN of this pass already failed

    def settle(self, batch: Sequence[_Pending]) -> None:
        """Match a batch of DSNs to their messages and apply them (one lookup, two writes)."""
        ids = {_local_part(mid) for p in batch for mid in p.dsn.message_ids}
        references = {mid for p in batch for mid in p.dsn.message_ids}
        found = self.ledger.messages_for_bounces(ids, references=references, providers=self.providers)
        by_id = {m.id: m for m in found}
        by_reference = {m.provider_reference: m for m in found if m.provider_reference}
        failures: list[tuple[str, str, str, Outcome]] = []
        entries: list[Suppression] = []
        for pending in batch:
            record = _match(pending.dsn, by_id, by_reference)
            if record is None:
                self.report.count(Outcome.UNKNOWN, key=pending.key)
                continue
            outcome, code = pending.dsn.verdict(record.address)
            if outcome is Outcome.IGNORED:
                self.report.count(outcome, message_id=record.id)
            elif record.id in self.decided or record.status in (Status.DELIVERED, Status.PERMANENT_FAILURE):
                self.report.count(Outcome.ALREADY_APPLIED, message_id=record.id)
            elif record.status is not Status.SENT:
                self.report.count(Outcome.OTHER_STATUS, message_id=record.id)
            else:
                self.decided.add(record.id)
                failures.append((record.id, code, f"bounced (DSN {code}): {meaning(code)}", outcome))
                if outcome is Outcome.HARD_BOUNCE:
                    if record.address:
                        address_hash = recipient_hash(self.key, "email", record.address)
                        entries.append(Suppression("email", address_hash, "hard-bounce", "bounces", self.now))
                    else:
                        self.report.address_missing += 1
        self._write(failures, entries)

    def _write(self, failures: list[tuple[str, str, str, Outcome]], entries: list[Suppression]) -> None:
        hashes = {e.address_hash for e in entries}
        if hashes:  # counted the same way with and without dry_run: addresses not on the list yet
            self.report.suppressed += len(hashes - self.ledger.suppressed("email", hashes))
        if self.dry_run:
            changed = {f[0] for f in failures}
        else:
            # The address first: a crash between the two writes leaves the message `sent`, so the next
            # reading of the mailbox does both again (the suppression list keeps its first entry).
            self.ledger.suppress(entries)
            changed = self.ledger.mark_bounced([f[:3] for f in failures], self.now)
        for message_id, code, _, outcome in failures:
            if message_id in changed:
                self.report.count(outcome, message_id=message_id)
                self.report.codes[code] += 1
            else:  # another process changed it between our read and our write
                self.report.count(Outcome.ALREADY_APPLIED, message_id=message_id)


def _local_part(message_id: str) -> str:
    return message_id.strip("<>").rpartition("@")[0]


def _match(
    dsn: Dsn, by_id: dict[str, MessageRecord], by_reference: dict[str, MessageRecord]
) -> MessageRecord | None:
    for message_id in dsn.message_ids:
        record = by_reference.get(message_id) or by_id.get(_local_part(message_id))
        if record is not None and record.channel == "email":
            return record
    return None


def apply_bounces(
    ledger: Ledger,
    source: MailSource,
    *,
    key: bytes,
    providers: Collection[str] = (),
    dry_run: bool = False,
    now: datetime | None = None,
) -> BounceReport:
    """Read every mail of ``source`` and apply the DSNs among them to the ledger (see the module).

    ``key`` keys the suppression list's address hashes (``Config.secret_key()``); ``providers`` are
    the account names whose provider references may be a DSN's ``Message-ID`` (those the ``smtp``
    driver stores). ``dry_run`` reads the ledger and changes nothing. Nothing in the mailbox changes.
    """
    report = BounceReport(str(source.path), source.kind, dry_run)
    state = _Pass(ledger, key, providers, dry_run, now or datetime.now(UTC), report)
    batch: list[_Pending] = []
    for mail_key, data in _mails(source, report):
        report.read += 1
        try:
            dsn = read_dsn(data)
        except NotADsn as exc:
            report.skipped[exc.reason] += 1
            report.count(Outcome.SKIPPED, key=mail_key)
            continue
        batch.append(_Pending(mail_key, dsn))
        if len(batch) >= _BATCH:
            state.settle(batch)
            batch = []
    if batch:
        state.settle(batch)
    _log.info(
        "bounces %s(%s, %d mails): %s; %d addresses suppressed",
        "dry run " if dry_run else "",
        source.kind,
        report.read,
        ", ".join(f"{report.counts[o]} {o.value}" for o in Outcome),
        report.suppressed,
        extra={
            "outcome": "dry-run" if dry_run else "applied",
            "source_kind": source.kind,
            "mails": report.read,
            "counts": {o.value: report.counts[o] for o in Outcome},
            "suppressed": report.suppressed,
        },
    )
    return report


def _mails(source: MailSource, report: BounceReport) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of each mail; one that vanished or cannot be read is counted as skipped."""
    for mail_key in source.mail_keys():
        try:
            data = source.read(mail_key)
        except (KeyError, OSError):  # moved away by a mail client meanwhile, or unreadable
            report.read += 1
            report.skipped["unreadable"] += 1
            report.count(Outcome.SKIPPED, key=str(mail_key))
            continue
        yield str(mail_key), data
