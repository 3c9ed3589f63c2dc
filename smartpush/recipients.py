"""From audience rows to per-channel outcomes: who gets what, on which channel, and why not.

The same evaluation serves ``validate``, ``plan``, ``preview`` and the launch of a run, so what the
officer is shown is what will be sent. One row gives one :class:`RecipientOutcome`; each channel of the
campaign gives it one :class:`ChannelOutcome`:

- ``send``: the message will be created and sent (rendered here, so render errors surface now);
- ``fallback``: first-reachable strategy, an earlier channel reaches the recipient; this one is the
  fallback should that fail permanently (its address is checked, its templates render at send time);
- ``skipped``: the row has no address for this channel;
- ``invalid``: the address is malformed or the message cannot be built; ``reason`` says why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from .addresses import normalise_email, normalise_phone, normalise_push_token
from .audience import Row
from .dedup import SeenIds
from .errors import RecipientError, TemplateError
from .loading import PreparedCampaign, PreparedChannel
from .provider import Channel
from .sms import SmsInfo, analyse

__all__ = ["ChannelOutcome", "Evaluator", "RecipientOutcome", "Rendered"]

Codes = RecipientError.Codes
ChannelStatus = Literal["send", "fallback", "skipped", "invalid"]
RowKind = Literal["recipient", "filtered", "duplicate", "invalid"]


@dataclass(slots=True)
class Rendered:
    """A message's content for one recipient: template field → text, plus SMS facts."""

    fields: dict[str, str]
    sms: SmsInfo | None = None


@dataclass(slots=True)
class ChannelOutcome:
    channel: PreparedChannel
    status: ChannelStatus
    address: str | None = None
    code: str | None = None
    reason: str | None = None
    rendered: Rendered | None = None

    @property
    def provider(self) -> str:
        return self.channel.providers[0]


@dataclass(slots=True)
class RecipientOutcome:
    line: int
    kind: RowKind
    recipient_id: str | None = None
    reason: str | None = None
    duplicate_of: int | None = None
    channels: list[ChannelOutcome] = field(default_factory=list)
    data: dict[str, Any] | None = None


class Cell(str):
    """A CSV cell that compares as a number against numbers, so ``where: "age >= 65"`` works.

    CSV cells are text; ``"70" >= 65`` would be a type error. A cell still equals its text
    (``code_postal == "01000"`` keeps its leading zero) and filters such as ``|int`` work as before.
    """

    __slots__ = ()

    def _num(self, other: object) -> float | None:
        if isinstance(other, int | float) and not isinstance(other, bool):
            try:
                return float(self.replace(",", ".").replace(" ", ""))
            except ValueError:
                return None
        return None

    def __lt__(self, other: object) -> bool:
        n = self._num(other)
        return n < other if n is not None else str.__lt__(self, other)  # type: ignore[operator]

    def __le__(self, other: object) -> bool:
        n = self._num(other)
        return n <= other if n is not None else str.__le__(self, other)  # type: ignore[operator]

    def __gt__(self, other: object) -> bool:
        n = self._num(other)
        return n > other if n is not None else str.__gt__(self, other)  # type: ignore[operator]

    def __ge__(self, other: object) -> bool:
        n = self._num(other)
        return n >= other if n is not None else str.__ge__(self, other)  # type: ignore[operator]

    def __eq__(self, other: object) -> bool:
        n = self._num(other)
        return n == other if n is not None else str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = str.__hash__


def preview_unsubscribe_url(public_url: str | None) -> Callable[[str, Channel], str]:
    base = public_url or "http://127.0.0.1:8080"
    return lambda recipient_id, channel: f"{base}/unsubscribe/PREVIEW"


_NORMALISERS: dict[Channel, Callable[[str, str], str]] = {
    Channel.SMS: normalise_phone,
    Channel.EMAIL: lambda raw, region: normalise_email(raw),
    Channel.PUSH: lambda raw, region: normalise_push_token(raw),
}


class Evaluator:
    """Evaluates rows of a prepared campaign; iterate it to stream the whole audience.

    ``render`` chooses which channels are rendered: ``"due"`` (the ones that will be sent now),
    ``"all"`` (every channel with a valid address, for previews) or ``"none"`` (addresses only: a
    launch stores rows, workers render them when they send). ``keep_data`` keeps the row's cells
    on the outcome (previews only: it costs memory). ``dedup=False`` leaves duplicate ids to the
    caller (a plan split over several processes checks them once, in line order).
    """

    def __init__(
        self,
        prepared: PreparedCampaign,
        *,
        render: Literal["due", "all", "none"] = "due",
        keep_data: bool = False,
        dedup: bool = True,
        unsubscribe_url: Callable[[str, Channel], str] | None = None,
    ) -> None:
        self.prepared = prepared
        self.render_mode = render
        self.keep_data = keep_data
        self.dedup = dedup
        self.seen = SeenIds()
        campaign = prepared.campaign
        self.first_reachable = campaign.strategy == "first-reachable"
        self.id_column = campaign.audience.id
        self.unsubscribe_url = unsubscribe_url or preview_unsubscribe_url(prepared.config.settings.public_url)
        self.where_columns = tuple(prepared.where.variables) if prepared.where is not None else ()
        #: Channels whose templates show an unsubscribe link: only they pay for building one per row.
        self.with_unsubscribe = {
            c.index
            for c in prepared.channels
            if any("unsubscribe_url" in t.variables for t in c.templates.values())
        }
        self.globals: dict[str, Any] = {
            "campaign": {
                "name": campaign.name,
                "description": campaign.description or "",
                "category": str(campaign.category),
            },
            "now": datetime.now(UTC),
        }

    def __iter__(self) -> Iterator[RecipientOutcome]:
        return self.over(self.prepared.audience)

    def over(self, rows: Iterable[Row]) -> Iterator[RecipientOutcome]:
        """Evaluate ``rows`` (the whole audience, or one shard of it) in order."""
        for row in rows:
            yield self.evaluate(row)

    def evaluate(self, row: Row) -> RecipientOutcome:
        data = row.data
        keep = data if self.keep_data else None
        if row.error is not None:
            return RecipientOutcome(row.line, "invalid", reason=row.error, data=keep)
        rid = data.get(self.id_column)
        rid = "" if rid is None else str(rid).strip()
        if not rid:
            return RecipientOutcome(
                row.line, "invalid", reason=f"the id column '{self.id_column}' is empty", data=keep
            )
        where = self.prepared.where
        if where is not None:
            context = {
                k: Cell(v) if isinstance(v, str) else v
                for k in self.where_columns
                if (v := data.get(k)) is not None
            }
            try:
                keep_row = where(context)
            except TemplateError as exc:
                return RecipientOutcome(
                    row.line, "invalid", recipient_id=rid, reason=str(exc.problems[0].message), data=keep
                )
            if not keep_row:
                return RecipientOutcome(row.line, "filtered", recipient_id=rid, data=keep)
        first = self.seen.add(rid, row.line) if self.dedup else None
        if first is not None:
            return RecipientOutcome(
                row.line,
                "duplicate",
                recipient_id=rid,
                duplicate_of=first,
                data=keep,
                reason=f"the same recipient id is on line {first}; it is sent once",
            )
        outcome = RecipientOutcome(row.line, "recipient", recipient_id=rid, data=keep)
        reached = False
        for channel in self.prepared.channels:
            result = self._channel(channel, data, rid, reached)
            if result.status == "send":
                reached = True
            outcome.channels.append(result)
        return outcome

    def _channel(
        self, channel: PreparedChannel, data: dict[str, Any], rid: str, reached: bool
    ) -> ChannelOutcome:
        raw = data.get(channel.column)
        raw = "" if raw is None else str(raw).strip()
        if not raw:
            return ChannelOutcome(channel, "skipped", reason=f"no {channel.channel} address in the row")
        try:
            address = _NORMALISERS[channel.channel](raw, self.prepared.region)
        except RecipientError as exc:
            return ChannelOutcome(channel, "invalid", code=exc.code, reason=exc.reason)
        due = not (self.first_reachable and reached)
        if self.render_mode == "none" or (not due and self.render_mode == "due"):
            return ChannelOutcome(channel, "send" if due else "fallback", address=address)
        try:
            rendered = self.render(channel, data, rid)
        except RecipientError as exc:
            return ChannelOutcome(channel, "invalid", address=address, code=exc.code, reason=exc.reason)
        return ChannelOutcome(channel, "send" if due else "fallback", address=address, rendered=rendered)

    def render(
        self, channel: PreparedChannel, data: dict[str, Any], rid: str, *, unsubscribe_url: str | None = None
    ) -> Rendered:
        """Render every template of ``channel`` for one row; a :class:`RecipientError` when it cannot.

        ``unsubscribe_url`` is the recipient's real link when sending (previews use a placeholder).
        """
        context = dict(data)
        context.update(self.globals)
        context["recipient_id"] = rid
        if unsubscribe_url is not None:
            context["unsubscribe_url"] = unsubscribe_url
        elif channel.index in self.with_unsubscribe:
            context["unsubscribe_url"] = self.unsubscribe_url(rid, channel.channel)
        fields: dict[str, str] = {}
        try:
            for name, template in channel.templates.items():
                fields[name] = template.render(context)
        except TemplateError as exc:
            raise RecipientError(Codes.RENDER_FAILED, exc.problems[0].message) from None
        sms = None
        if channel.channel is Channel.SMS:
            body = fields["body"].strip()
            if channel.stop_mention:
                body = f"{body}\n{channel.stop_mention}"
            sms = analyse(body, transliterate=self.prepared.campaign.sms.transliterate)
            fields["body"] = sms.text
            limit = self.prepared.campaign.sms.max_parts
            if sms.parts > limit:
                raise RecipientError(
                    Codes.TOO_LONG,
                    f"the SMS needs {sms.parts} parts ({sms.encoding}, {sms.characters} characters); "
                    f"the campaign allows {limit} (sms.max_parts)",
                )
        elif channel.channel is Channel.EMAIL:
            fields["subject"] = " ".join(fields["subject"].split())
        for name in ("body", "subject", "title"):
            if name in fields and not fields[name].strip():
                raise RecipientError(
                    Codes.RENDER_FAILED, f"the {channel.channel} {name} is empty once rendered"
                )
        return Rendered(fields, sms)
