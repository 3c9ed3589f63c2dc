"""The one error tree of smartpush.

Every error smartpush raises on purpose is a :class:`SmartpushError`, and each one says what the user
must fix. The tree::

    SmartpushError
    ├── ConfigError            smartpush.yaml, a campaign file or its templates are wrong (exit 1)
    │   ├── TemplateError      a template does not compile, uses an unknown variable, leaves the sandbox
    │   └── AudienceError      the audience file cannot be read at all (missing, undecodable, no header)
    ├── RecipientError         one row's address is unusable; the row is counted ``invalid``, never raised
    │                          out of a run
    └── InfrastructureError    the broker, the database or a provider account cannot be reached (exit 4)

Messages never contain an address, a token or a secret: they name the file, the line, the field and
the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "AudienceError",
    "ConfigError",
    "InfrastructureError",
    "Problem",
    "RecipientError",
    "SmartpushError",
    "TemplateError",
]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a file the user wrote, with where it is.

    ``field`` is a dotted path such as ``channels[1].provider``; ``line`` and ``column`` are 1-based.
    """

    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.message}"

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "field": self.field,
            "message": self.message,
        }


class SmartpushError(Exception):
    """Root of every error smartpush raises on purpose."""

    #: The process exit code a command ends with when this error stops it.
    exit_code = 1


class ConfigError(SmartpushError):
    """A file the user wrote is wrong; carries every problem found, not just the first."""

    exit_code = 1

    def __init__(self, problems: Problem | str | Iterable[Problem]) -> None:
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: Sequence[Problem] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class TemplateError(ConfigError):
    """A template cannot be compiled or rendered, or tried to leave the sandbox."""


class AudienceError(ConfigError):
    """The audience file as a whole cannot be read: missing, undecodable, empty, no id column."""


class RecipientError(SmartpushError):
    """One recipient's address for one channel is unusable.

    ``reason`` is written for a person and never repeats the address itself.
    """

    class Codes(StrEnum):
        MISSING_ID = "missing-id"
        INVALID_PHONE = "invalid-phone"
        NOT_MOBILE = "not-mobile"
        INVALID_EMAIL = "invalid-email"
        INVALID_PUSH_TOKEN = "invalid-push-token"
        RENDER_FAILED = "render-failed"
        TOO_LONG = "too-long"
        BAD_ROW = "bad-row"

    def __init__(self, code: RecipientError.Codes, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)


class InfrastructureError(SmartpushError):
    """Something smartpush depends on is unreachable or refuses us: broker, database, a provider."""

    exit_code = 4
