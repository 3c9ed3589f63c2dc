"""Loading a campaign and checking everything that can be checked before a single message leaves.

:func:`load_campaign` reads the campaign file, validates its shape, then checks what needs the rest of
the project: provider accounts and the channels their drivers serve, templates (compiled once, in the
sandbox), the audience file and its columns, the variables the templates use. Every problem found is
reported at once in one :class:`~smartpush.errors.ConfigError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from . import registry
from .addresses import normalise_email
from .audience import AudienceFile
from .campaign import Campaign, Category, ChannelSpec, EmailChannel, PushChannel, SmsChannel
from .config import Config
from .errors import AudienceError, ConfigError, Problem, RecipientError, TemplateError
from .provider import Channel, SmsProviderOptions
from .schema import did_you_mean, problems_from
from .templating import PROVIDED_NAMES, CompiledExpression, CompiledTemplate, Templates, check_variables
from .yamlfile import Locations, PathPart, load

__all__ = ["PreparedCampaign", "PreparedChannel", "load_campaign"]


@dataclass
class PreparedChannel:
    """A channel of the campaign with its templates compiled and its accounts resolved."""

    index: int
    spec: ChannelSpec
    channel: Channel
    providers: list[str]
    column: str
    #: Field name (``body``, ``subject``, ``data.url``...) → compiled template.
    templates: dict[str, CompiledTemplate]
    #: Text appended to marketing SMS (the first account's ``stop_mention``), or "".
    stop_mention: str = ""
    sender: str | None = None


@dataclass
class PreparedCampaign:
    """Everything a plan, a preview or a send needs, checked."""

    campaign: Campaign
    file: str
    config: Config
    audience: AudienceFile
    where: CompiledExpression | None
    channels: list[PreparedChannel]
    region: str
    warnings: list[Problem] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.campaign.name


def _template_fields(spec: ChannelSpec) -> dict[str, tuple[str, bool]]:
    """Field → (template source, is HTML) for one channel."""
    if isinstance(spec, SmsChannel):
        return {"body": (spec.body, False)}
    if isinstance(spec, EmailChannel):
        out = {"subject": (spec.subject, False)}
        if spec.text is not None:
            out["text"] = (spec.text, False)
        if spec.html is not None:
            out["html"] = (spec.html, True)
        return out
    out = {"title": (spec.title, False), "body": (spec.body, False)}
    out.update({f"data.{k}": (v, False) for k, v in spec.data.items()})
    if spec.url is not None:
        out["url"] = (spec.url, False)
    return out


def _template_path(name: str) -> tuple[PathPart, ...]:
    return tuple(name.split(".", 1))


def load_campaign(path: Path, config: Config) -> PreparedCampaign:
    """Read, validate and prepare the campaign at ``path``; a :class:`ConfigError` lists every problem."""
    shown = str(path)
    raw, locs = load(path, shown)
    if not isinstance(raw, dict):
        raise ConfigError(locs.problem("a campaign file is a block of 'key: value' lines", ()))
    try:
        campaign = Campaign.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(problems_from(exc, locs, Campaign, raw)) from None

    problems: list[Problem] = []
    warnings: list[Problem] = list(config.warnings)
    project = config.project_dir
    templates = Templates(project, locale=config.settings.locale, timezone=config.settings.timezone)

    columns: tuple[str, ...] | None = None
    audience: AudienceFile | None = None
    try:  # an unknown encoding or delimiter is refused here: the problem then names this file's line
        audience = AudienceFile(
            project / campaign.audience.source,
            encoding=campaign.audience.encoding,
            delimiter=campaign.audience.delimiter,
            display_name=campaign.audience.source,
        )
        columns = audience.columns
    except AudienceError as exc:
        problems.extend(_at_source(exc.problems, locs))

    where = None
    if campaign.audience.where is not None:
        line = locs.find(("audience", "where"))[0]
        try:
            where = templates.expression(
                campaign.audience.where, field="audience.where", campaign_file=shown, line=line
            )
        except TemplateError as exc:
            problems.extend(exc.problems)

    if columns is not None:
        if campaign.audience.id not in columns:
            problems.append(
                locs.problem(
                    f"the audience has no column '{campaign.audience.id}'"
                    f"{did_you_mean(campaign.audience.id, columns)}; its columns are: {', '.join(columns)}",
                    ("audience", "id"),
                )
            )
        if where is not None:
            problems.extend(check_variables(where, columns))

    channels: list[PreparedChannel] = []
    seen: set[Channel] = set()
    for i, spec in enumerate(campaign.channels):
        prepared = _prepare_channel(i, spec, campaign, config, templates, locs, columns, problems, warnings)
        if prepared.channel in seen:
            problems.append(
                locs.problem(
                    f"the {prepared.channel} channel is listed twice; list it once, with several providers "
                    "for failover",
                    ("channels", i, "channel"),
                )
            )
        seen.add(prepared.channel)
        channels.append(prepared)

    schedule = campaign.schedule
    if schedule.at is not None and schedule.not_after is not None:
        limit = schedule.not_after
        too_late = schedule.at > limit if isinstance(limit, datetime) else schedule.at.date() > limit
        if too_late:
            problems.append(
                locs.problem(
                    "schedule.at is after schedule.not_after: the run could never start", ("schedule", "at")
                )
            )
    if problems:
        raise ConfigError(sorted(problems, key=lambda p: (p.file != shown, p.file or "", p.line or 0)))
    assert audience is not None  # noqa: S101 - without it there was a problem, raised above
    return PreparedCampaign(
        campaign=campaign,
        file=shown,
        config=config,
        audience=audience,
        where=where,
        channels=channels,
        region=campaign.audience.region or config.settings.region,
        warnings=warnings,
    )


def _at_source(problems: Sequence[Problem], locs: Locations) -> list[Problem]:
    line, column = locs.find(("audience", "source"))
    out = []
    for p in problems:
        if p.line is None:
            out.append(Problem(p.message, file=locs.file, line=line, column=column, field="audience.source"))
        else:
            out.append(p)
    return out


def _prepare_channel(
    i: int,
    spec: ChannelSpec,
    campaign: Campaign,
    config: Config,
    templates: Templates,
    locs: Locations,
    columns: tuple[str, ...] | None,
    problems: list[Problem],
    warnings: list[Problem],
) -> PreparedChannel:
    channel = Channel(spec.channel)
    where: tuple[PathPart, ...] = ("channels", i)
    column = campaign.audience.columns.for_channel(channel)
    if columns is not None and column not in columns:
        key = {Channel.SMS: "phone", Channel.EMAIL: "email", Channel.PUSH: "push_token"}[channel]
        problems.append(
            locs.problem(
                f"the {channel} channel reads addresses from the column '{column}', "
                f"which the audience does not have{did_you_mean(column, columns)}; "
                f"set audience.columns.{key} to the right column",
                ("channels", i, "channel"),
            )
        )

    stop_mention = ""
    sender = None
    for j, account in enumerate(spec.provider):
        at = (*where, "provider", j) if len(spec.provider) > 1 else (*where, "provider")
        if account not in config.accounts:
            known = ", ".join(config.accounts) or "none"
            problems.append(
                locs.problem(
                    f"no provider account named '{account}' in {config.source}"
                    f"{did_you_mean(account, list(config.accounts))}; accounts: {known}",
                    at,
                )
            )
            continue
        options = config.accounts[account]
        drv = registry.driver(options.type)
        if channel not in drv.channels:
            problems.append(
                locs.problem(
                    f"the account '{account}' ({options.type}) cannot send {channel}; it sends "
                    f"{', '.join(sorted(c.value for c in drv.channels))}",
                    at,
                )
            )
        if j == 0 and isinstance(options, SmsProviderOptions):
            sender = options.sender
            if campaign.category is Category.MARKETING and channel is Channel.SMS:
                if options.stop_mention:
                    stop_mention = options.stop_mention
                else:
                    warnings.append(
                        locs.problem(
                            f"marketing SMS must offer a free opt-out: set stop_mention on the account "
                            f"'{account}' (e.g. \"STOP 36111\", the number your aggregator gives)",
                            at,
                        )
                    )

    if isinstance(spec, EmailChannel):
        _check_email_addresses(spec, locs, where, problems)
        if campaign.category is not Category.SERVICE and not config.settings.public_url:
            all_outbox = all(
                config.accounts.get(a) is not None and config.accounts[a].type == "outbox"
                for a in spec.provider
            )
            p = locs.problem(
                f"{campaign.category} emails carry a one-click unsubscribe link built on public_url, "
                f"which {config.source} does not set",
                (*where, "channel"),
            )
            (warnings if all_outbox else problems).append(p)
    if (
        isinstance(spec, PushChannel)
        and spec.url is not None
        and "{{" not in spec.url
        and not spec.url.startswith(("https://", "http://", "/"))
    ):
        problems.append(
            locs.problem("url must be an https:// address or a path starting with /", (*where, "url"))
        )

    compiled: dict[str, CompiledTemplate] = {}
    for name, (source, html) in _template_fields(spec).items():
        at = (*where, *_template_path(name))
        try:
            compiled[name] = templates.compile(
                source,
                field=f"channels[{i}].{name}",
                html=html,
                campaign_file=locs.file,
                line=locs.find(at)[0],
            )
        except TemplateError as exc:
            problems.extend(exc.problems)
            continue
        if columns is not None:
            problems.extend(check_variables(compiled[name], columns, extra=PROVIDED_NAMES))
    return PreparedChannel(
        index=i,
        spec=spec,
        channel=channel,
        providers=list(spec.provider),
        column=column,
        templates=compiled,
        stop_mention=stop_mention,
        sender=sender,
    )


def _check_email_addresses(
    spec: EmailChannel, locs: Locations, where: tuple[PathPart, ...], problems: list[Problem]
) -> None:
    from email.utils import parseaddr

    for key, value in (("from", spec.from_), ("reply_to", spec.reply_to)):
        if value is None:
            continue
        _, address = parseaddr(value)
        try:
            normalise_email(address)
        except RecipientError:
            problems.append(
                locs.problem(
                    f"'{value}' is not an email address; write it as \"Service name <address@example.fr>\"",
                    (*where, key),
                )
            )
