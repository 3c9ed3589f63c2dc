"""The suppression list: the addresses a channel must not message, why, and when that still allows a send.

Each entry is a channel, a keyed hash of the address (:func:`smartpush.unsubscribe.recipient_hash`, an
HMAC with the config's secret key, over the address exactly as ``messages.address`` holds it: phones in
E.164, emails as :mod:`smartpush.addresses` normalises them, push tokens as they are), a reason, a
source (a provider account, ``serve``, ``manual:<operator>``) and a time. The list never holds an
address (SPEC "Personal data and security"); :func:`normalise` puts what an operator types or imports
into the ledger's form first, so ``06 12 34 56 78`` and ``+33 6 12 34 56 78`` are one entry.

The policy, by reason (SPEC "Suppression"):

- ``opt-out`` (a STOP reply, a one-click unsubscribe, a letter) and ``complaint`` (a message reported
  as spam): ``marketing`` and ``information`` messages are not sent (``suppressed``); ``service``
  messages are sent, and the send is on record (``messages.bypassed`` = the reason);
- ``hard-bounce``, ``unregistered`` and ``manual``: no message of any category is sent.

A ``service`` campaign is a legally required notice: objecting to messages does not exempt anyone from
it, so it still reaches people who opted out or complained, and the ledger marks each such send
(``messages.bypassed`` holds the reason). It never goes to an address known to be unreachable
(``hard-bounce``, ``unregistered``) or blocked by an operator (``manual``). A reason this code does not
know stops every campaign.

The list is applied twice: at launch (a suppressed message is stored ``suppressed`` with the reason as
its error code, and a ``first-reachable`` campaign tries the recipient's next channel), and again just
before each batch is sent, so an opt-out received mid-run stops the next message, not the next run.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum

from .addresses import normalise_email, normalise_phone, normalise_push_token
from .ledger import Ledger, MessageRecord, Result, Status, Suppression
from .unsubscribe import recipient_hash

__all__ = [
    "BYPASSABLE",
    "CHANNELS",
    "REASONS",
    "Reason",
    "Screened",
    "bypass",
    "entry",
    "lookup",
    "normalise",
    "screen",
    "stops",
    "suppressed_text",
]


class Reason(StrEnum):
    OPT_OUT = "opt-out"  # the person asked: STOP reply, one-click unsubscribe, a letter
    HARD_BOUNCE = "hard-bounce"  # the address does not exist (SMTP 5.1.x, a dead number)
    COMPLAINT = "complaint"  # the person reported a message as spam
    UNREGISTERED = "unregistered"  # the app was uninstalled: the push token is dead
    MANUAL = "manual"  # an operator's decision


REASONS = tuple(r.value for r in Reason)
#: Reasons a ``service`` campaign (a legally required notice) sends through, on record.
BYPASSABLE = frozenset({Reason.OPT_OUT.value, Reason.COMPLAINT.value})
CHANNELS = ("sms", "email", "push")


def normalise(channel: str, text: str, *, region: str = "FR") -> str:
    """``text`` in the form the ledger stores for ``channel``, the form its hash is taken of.

    Phones become E.164 (national numbers read as of ``region``), emails are normalised as the
    audience's are, push tokens are kept as they are. Raises :class:`RecipientError` when the address
    is not valid for the channel; its reason never repeats the address.
    """
    if channel == "sms":
        return normalise_phone(text.strip(), region)
    if channel == "email":
        return normalise_email(text)
    if channel == "push":
        return normalise_push_token(text)
    raise ValueError(f"unknown channel '{channel}': use one of {', '.join(CHANNELS)}")


def entry(key: bytes, channel: str, address: str, reason: str, source: str, now: datetime) -> Suppression:
    """The list entry for an address already normalised (:func:`normalise`)."""
    return Suppression(channel, recipient_hash(key, channel, address), reason, source, now)


def stops(category: str, reason: str) -> bool:
    """Whether an entry for ``reason`` stops a message of a campaign of ``category``."""
    return not (category == "service" and reason in BYPASSABLE)


def bypass(category: str, reason: str | None) -> str | None:
    """The reason to put on record when a message is sent despite an entry (``service`` only)."""
    return reason if reason is not None and not stops(category, reason) else None


def suppressed_text(channel: str, reason: str) -> str:
    """The ``error_text`` of a message the list stopped."""
    return f"the address is on the {channel} suppression list ({reason})"


def lookup(
    ledger: Ledger,
    key: bytes,
    items: Sequence[tuple[str, str | None]],
    channels: Collection[str] | None = None,
) -> list[str | None]:
    """The list's reason for each (channel, address), None when it is not on it.

    One query per channel present (per 500 addresses). ``channels``, when given, are the only ones
    looked up: the others are known to have empty lists.
    """
    hashes: list[str | None] = []
    wanted: dict[str, set[str]] = {}
    for channel, address in items:
        if address is None or (channels is not None and channel not in channels):
            hashes.append(None)
            continue
        h = recipient_hash(key, channel, address)
        hashes.append(h)
        wanted.setdefault(channel, set()).add(h)
    reasons = {channel: ledger.suppression_reasons(channel, hs) for channel, hs in wanted.items()}
    return [
        None if h is None else reasons[channel].get(h) for (channel, _), h in zip(items, hashes, strict=True)
    ]


@dataclass
class Screened:
    """A claimed batch after the check before sending."""

    send: list[MessageRecord] = field(default_factory=list)
    #: Messages the list stops, and their ``suppressed`` results (same order).
    stopped: list[MessageRecord] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    #: Message id → the reason a ``service`` message is sent despite its entry.
    bypassed: dict[str, str] = field(default_factory=dict)

    def mark(self, results: Iterable[Result]) -> list[Result]:
        """``results`` of :attr:`send`, with ``bypassed`` set on the ones sent despite an entry."""
        return [
            replace(r, bypassed=self.bypassed[r.message_id])
            if r.status is Status.SENT and r.message_id in self.bypassed
            else r
            for r in results
        ]


def screen(ledger: Ledger, key: bytes, category: str, batch: list[MessageRecord]) -> Screened:
    """Check a claimed batch against the list (one query per channel), under the category's policy."""
    out = Screened()
    reasons = lookup(ledger, key, [(m.channel, m.address) for m in batch])
    for message, reason in zip(batch, reasons, strict=True):
        if reason is not None and stops(category, reason):
            out.stopped.append(message)
            out.results.append(
                Result(
                    message.id,
                    Status.SUPPRESSED,
                    attempted=False,
                    error_code=reason,
                    error_text=suppressed_text(message.channel, reason),
                )
            )
            continue
        out.send.append(message)
        if reason is not None:
            out.bypassed[message.id] = reason
    return out
