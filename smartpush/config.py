"""``smartpush.yaml``: where things run and which provider accounts exist.

Values may read the environment with ``${VAR}`` (or ``${VAR:-default}``); a missing variable is an
error naming it and the line that asks for it. Secrets are held as :class:`pydantic.SecretStr`, so
they print as ``**********``; a secret written literally in the file gets a warning.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from . import registry
from .errors import ConfigError, Problem
from .provider import ProviderOptions
from .schema import did_you_mean, problems_from
from .units import Duration, Frequency, TimeZoneName
from .yamlfile import Locations, PathPart, load, load_text

__all__ = ["CONFIG_FILE", "Config", "Settings", "load_config"]

CONFIG_FILE = "smartpush.yaml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

#: Used when there is no smartpush.yaml: everything runs in-process and writes to ./outbox.
EMBEDDED_DEFAULTS = """\
providers:
  outbox:
    type: outbox
    path: outbox
"""


class Failover(BaseModel):
    """When an account counts as failing: ``errors`` provider-side failures within ``within``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    errors: int = Field(default=50, ge=1)
    within: Duration = Field(default="60s", validate_default=True)
    #: How long a failing account is skipped before it is tried again.
    cooldown: Duration = Field(default="5min", validate_default=True)


class Limits(BaseModel):
    """Limits across campaigns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: At most this many runs reach one recipient per period (``1/7d``), counted over ``information``
    #: and ``marketing`` campaigns; ``service`` campaigns (legally required notices) are neither capped
    #: nor counted.
    per_recipient: Frequency | None = None


class Settings(BaseModel):
    """The top level of ``smartpush.yaml`` (provider accounts are checked against their driver)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    broker: str | None = None
    database: str | None = None
    public_url: str | None = None
    secret_key: SecretStr | None = None
    #: Phones written without a country code are read as numbers of this region.
    region: str = "FR"
    locale: str = "fr_FR"
    timezone: TimeZoneName = "Europe/Paris"
    #: How long per-message personal data is kept before `purge` removes it.
    retention: Duration = Field(default="30d", validate_default=True)
    unsubscribe_mailto: str | None = None
    #: A message ``sending`` for longer than this lost its worker and is sent again (a send takes at
    #: most the provider timeout; providers that honour the idempotency key drop the repeat).
    stuck_after: Duration = Field(default="5min", validate_default=True)
    #: How often each worker looks for stuck messages and lost segments.
    sweep_every: Duration = Field(default="30s", validate_default=True)
    failover: Failover = Field(default_factory=lambda: Failover())
    limits: Limits = Field(default_factory=lambda: Limits())
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        import phonenumbers

        if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"'{value}' is not a region code; write a two-letter code such as FR or BE")
        return value.upper()

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("public_url must be an address such as https://notifications.example.org")
        return value.rstrip("/") if value else value


@dataclass
class Config:
    """A loaded configuration: settings, provider accounts and the project folder they belong to."""

    settings: Settings
    accounts: dict[str, ProviderOptions]
    project_dir: Path
    source: str
    warnings: list[Problem] = field(default_factory=list)

    def account(self, name: str) -> ProviderOptions:
        if name not in self.accounts:
            raise ConfigError(f"no provider account named '{name}'{did_you_mean(name, list(self.accounts))}")
        return self.accounts[name]

    def secret_key(self) -> bytes:
        """The key for signatures and recipient hashes; made once and kept when the config has none."""
        if self.settings.secret_key is not None:
            return self.settings.secret_key.get_secret_value().encode()
        path = self.project_dir / ".smartpush" / "secret_key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
        return path.read_text().strip().encode()


def _expand(
    data: Any,
    path: tuple[PathPart, ...],
    env: Mapping[str, str],
    locs: Locations,
    problems: list[Problem],
    from_env: set[tuple[PathPart, ...]],
) -> Any:
    if isinstance(data, dict):
        return {k: _expand(v, (*path, k), env, locs, problems, from_env) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand(v, (*path, i), env, locs, problems, from_env) for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(
            locs.problem(
                f"the environment variable {name} is not set; export it before running smartpush "
                f"(or write ${{{name}:-default}} to give a default)",
                path,
            )
        )
        return ""

    from_env.add(path)
    return _VAR.sub(sub, data)


def _is_secret_field(model: type[BaseModel], name: str) -> bool:
    f = model.model_fields.get(name)
    return f is not None and "SecretStr" in str(f.annotation)


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (default: ``./smartpush.yaml`` if present, else the embedded defaults).

    ``SMARTPUSH_BROKER_URL`` and ``SMARTPUSH_DATABASE_URL`` override ``broker:`` and ``database:``.
    Every problem in the file is reported at once in one :class:`ConfigError`.
    """
    env = os.environ if env is None else env
    if path is None and Path(CONFIG_FILE).is_file():
        path = Path(CONFIG_FILE)
    if path is None:
        raw, locs = load_text(EMBEDDED_DEFAULTS, "(embedded defaults)")
        project_dir = Path.cwd()
        source = "(embedded defaults)"
    else:
        raw, locs = load(path)
        project_dir = path.resolve().parent
        source = str(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(locs.problem("the file must be a block of 'key: value' lines", ()))

    problems: list[Problem] = []
    from_env: set[tuple[PathPart, ...]] = set()
    data = _expand(raw, (), env, locs, problems, from_env)
    for key, var in (("broker", "SMARTPUSH_BROKER_URL"), ("database", "SMARTPUSH_DATABASE_URL")):
        if env.get(var):
            data[key] = env[var]
    if problems:  # validating the empty stand-ins of missing variables would only add noise
        raise ConfigError(problems)
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems.extend(problems_from(exc, locs, Settings, data))
        raise ConfigError(problems) from None

    accounts: dict[str, ProviderOptions] = {}
    warnings: list[Problem] = []
    if settings.secret_key is not None and ("secret_key",) not in from_env:
        warnings.append(
            locs.problem(
                "secret_key is written in the file; read it from ${SMARTPUSH_SECRET_KEY}", ("secret_key",)
            )
        )
    for name, options in settings.providers.items():
        where: tuple[PathPart, ...] = ("providers", name)
        if not isinstance(options, dict):
            problems.append(locs.problem("a provider account is a block of 'option: value' lines", where))
            continue
        kind = options.get("type")
        if not isinstance(kind, str):
            problems.append(
                locs.problem(
                    f"the account needs a 'type:' (one of: {', '.join(registry.available())})", where
                )
            )
            continue
        try:
            model = registry.driver(kind).Options
        except ConfigError:
            hint = did_you_mean(kind, registry.available())
            problems.append(
                locs.problem(
                    f"unknown provider type '{kind}'{hint}; "
                    f"installed drivers: {', '.join(registry.available())}",
                    (*where, "type"),
                )
            )
            continue
        try:
            accounts[name] = model.model_validate(options)
        except ValidationError as exc:
            problems.extend(problems_from(exc, locs, model, options, prefix=where))
            continue
        for key in options:
            if (*where, key) not in from_env and _is_secret_field(model, key):
                warnings.append(
                    locs.problem(
                        f"{key} is written in the file; read it from the environment with ${{VAR}}",
                        (*where, key),
                    )
                )
    if problems:
        raise ConfigError(sorted(problems, key=lambda p: (p.line or 0, p.column or 0)))
    return Config(
        settings=settings, accounts=accounts, project_dir=project_dir, source=source, warnings=warnings
    )
