"""The one error tree of smartpush.

Every error smartpush raises on purpose is a :class:`SmartpushError`, and each one says what the user
must fix. The tree::

    SmartpushError
    ├── ConfigError            smartpush.yaml, a campaign file or its templates are wrong (exit 1)
    │   ├── TemplateError      a template does not compile, uses an unknown variable, leaves the sandbox
    │   └── AudienceError      the audience file cannot be read at all (missing, undecodable, no header)
    ├── RecipientError         one row's address is unusable; the row is counted ``invalid``, never raised
    │                          out of a run
    ├── ProviderError          a provider did not accept one message; the class decides what happens next
    │   ├── ThrottledError     slow down: wait ``retry_after_s`` and retry; spends no attempt
    │   ├── TransientError     5xx, timeout, connection reset: retry with backoff up to max_attempts
    │   ├── PermanentError     invalid number, unknown address, unregistered token: never retried
    │   └── TechnicalError     our side or our credentials: never retried for this message
    ├── RunNotFound            no run has that id or key
    └── InfrastructureError    the broker, the database or a provider account cannot be reached (exit 4)

Messages never contain an address, a token or a secret: they name the file, the line, the field and
the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

__all__ = [
    "AudienceError",
    "ConfigError",
    "InfrastructureError",
    "Outcome",
    "PermanentError",
    "Problem",
    "ProviderError",
    "RecipientError",
    "RunNotFound",
    "SmartpushError",
    "TechnicalError",
    "TemplateError",
    "ThrottledError",
    "TransientError",
    "outcome_error",
    "redact_code",
]

#: An error code is short: a longer value is not a code (a provider echoing a token, say).
MAX_CODE = 40
#: What an error "code" that looks like an address, a number or a token is stored and shown as.
REDACTED = "<redacted>"
_CODE = re.compile(r"[A-Za-z0-9 _.:/\-]+")
_DIGIT_RUN = re.compile(r"\d{7,}")


def redact_code(code: str | None) -> str | None:
    """``code`` as it is, or :data:`REDACTED` when it looks like anything but an error code.

    Codes are words and numbers (``429``, ``550 5.1.1``, ``UNREGISTERED``, ``21610``); a value with
    an ``@``, seven digits in a row or more than :data:`MAX_CODE` characters is an address or a token
    that a provider echoed back, and must not reach the ledger, a report or a log.
    """
    if code is None:
        return None
    if len(code) > MAX_CODE or not _CODE.fullmatch(code) or _DIGIT_RUN.search(code.replace(" ", "")):
        return REDACTED
    return code


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


class ProviderError(SmartpushError):
    """A provider did not accept one message. Retry is decided by the subclass alone.

    ``code`` is the provider's own error code or HTTP status (for reports), ``detail`` a short text
    for a person; neither may contain the recipient's address or the message body. A code that looks
    like an address or a token (a provider echoing the number as its "code") is kept as ``<redacted>``.
    """

    #: The ledger status a message ends in when this error is final for it.
    status = "technical-failure"

    def __init__(self, detail: str, *, code: str | None = None, retry_after_s: float | None = None) -> None:
        code = redact_code(code)
        self.detail = detail
        self.code = code
        self.retry_after_s = retry_after_s
        super().__init__(f"{code}: {detail}" if code else detail)


class ThrottledError(ProviderError):
    """The provider asks us to slow down (HTTP 429, SMTP 4.7.x, QUOTA_EXCEEDED): wait, then retry.

    A throttled send is not an attempt: it does not count towards ``max_attempts``.
    """

    status = "temporary-failure"


class TransientError(ProviderError):
    """A failure that may pass (5xx, timeout, connection error): retried with backoff."""

    status = "temporary-failure"


class PermanentError(ProviderError):
    """The provider will never accept this message for this address: not retried.

    ``suppress`` is true when the address itself is dead (unregistered token, hard bounce) and belongs
    on the suppression list.
    """

    status = "permanent-failure"

    def __init__(self, detail: str, *, code: str | None = None, suppress: bool = False) -> None:
        super().__init__(detail, code=code)
        self.suppress = suppress


class TechnicalError(ProviderError):
    """Our side is wrong (credentials refused, malformed request, a bug): not retried for this message."""

    status = "technical-failure"


class RunNotFound(SmartpushError):
    """No run has the id, id prefix or key the user gave."""

    exit_code = 1


#: How a driver's table classifies one documented provider error: ``suppress`` is permanent with the
#: address put on the suppression list.
Outcome = Literal["throttled", "transient", "permanent", "suppress", "technical"]


def outcome_error(
    outcome: Outcome, detail: str, *, code: str | None = None, retry_after_s: float | None = None
) -> ProviderError:
    """The :class:`ProviderError` a driver's error table entry stands for."""
    if outcome == "throttled":
        return ThrottledError(detail, code=code, retry_after_s=retry_after_s)
    if outcome == "transient":
        return TransientError(detail, code=code, retry_after_s=retry_after_s)
    if outcome in ("permanent", "suppress"):
        return PermanentError(detail, code=code, suppress=outcome == "suppress")
    return TechnicalError(detail, code=code)
