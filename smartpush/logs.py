"""Logs that ops can ship as they are: one JSON object a line, or readable lines on a terminal.

Every long-running command (``send``, ``resend``, ``resume``, ``worker`` and each of its Dramatiq
processes, ``serve``) calls :func:`configure` once. It puts one handler on the root logger, writing to
standard error:

* **JSON lines** when standard error is not a terminal: ``ts`` (ISO-8601, UTC), ``level``, ``logger``,
  ``event`` (the message), ``pid``, then the record's structured fields (``extra={...}`` at the call
  site: ``run_id``, ``segment``, ``message_id``, ``provider``, ``status``, ``code``…);
* **text** on a terminal: ``12:00:01.234 INFO    smartpush.sending: run … finished  sent=300 …``.

``SMARTPUSH_LOG_FORMAT`` (``json`` or ``text``) and ``SMARTPUSH_LOG_LEVEL`` (``debug`` … ``error``)
override both the terminal test and the command's default level.

Personal data stays out (SPEC.md "Personal data and security"): call sites log ids, counts, codes and
the keyed hash of a recipient id, never an address, a body or a template value. Three rules here back
them up. Other libraries log from WARNING up only, whatever the level: their debug lines quote SMTP
dialogues (``RCPT TO:<address>``) and URLs (a Web Push endpoint *is* the token); Dramatiq and uvicorn
from INFO (worker boot, server start). An exception is written as its type, the first line of its
message with anything that looks like an email address, a phone number or a token masked, and its
frames as ``file:line function``: never locals, never the parameters SQLAlchemy appends. A ``code``
field that does not look like an error code (providers choose them, and one could echo a number) is
replaced by ``<redacted>``.
"""

from __future__ import annotations

import enum
import json as _json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Hashable, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import PurePath
from types import TracebackType
from typing import TextIO

from .errors import ConfigError, redact_code

__all__ = [
    "ENV_FORMAT",
    "ENV_LEVEL",
    "JsonFormatter",
    "TextFormatter",
    "configure",
    "every",
    "safe_code",
    "scrub",
]

#: Environment variable that forces the format: ``json`` or ``text``.
ENV_FORMAT = "SMARTPUSH_LOG_FORMAT"
#: Environment variable that sets the level of smartpush's own loggers: ``debug`` … ``critical``.
ENV_LEVEL = "SMARTPUSH_LOG_LEVEL"
#: Libraries whose INFO lines ops want (a worker process booting, the server listening).
INFO_LIBRARIES = ("dramatiq", "uvicorn")
#: Characters of an exception message kept (its first line only).
MAX_EXCEPTION_MESSAGE = 300
#: Frames of a traceback kept, innermost last.
MAX_FRAMES = 30

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
#: Attributes every LogRecord has: anything else on a record came from ``extra=`` and is a field.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName"}
)
_RESERVED = frozenset({"ts", "level", "logger", "event", "pid"})
#: Fields libraries add that say nothing new: uvicorn's ``color_message`` is the event with ANSI colours.
_DROPPED = frozenset({"color_message"})
#: Fields whose values providers choose: checked by :func:`safe_code` before they are written.
_CODE_FIELDS = frozenset({"code", "error_code"})

_EMAIL = re.compile(r"[^\s@<>()\[\]'\",;:]+@[^\s@<>()\[\]'\",;:]+")
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d(?:[ ()\-]?\d){6,}(?!\w)")
_TOKEN = re.compile(r"[A-Za-z0-9_\-:.%+=]{40,}")


def scrub(text: str) -> str:
    """``text`` on one line, shortened, with email addresses, phone numbers and tokens masked."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = _EMAIL.sub("<email>", line)
    line = _TOKEN.sub("<token>", line)
    line = _PHONE.sub("<number>", line)
    if len(line) > MAX_EXCEPTION_MESSAGE:
        line = line[: MAX_EXCEPTION_MESSAGE - 1] + "…"
    return line


def safe_code(value: object) -> object:
    """An error code as it is, or ``<redacted>`` when it looks like anything but a code.

    The rule is :func:`smartpush.errors.redact_code`'s: provider errors already carry redacted codes,
    this catches the codes other fields bring.
    """
    if value is None or isinstance(value, bool | int):
        return value
    return redact_code(str(value))


def _plain(value: object) -> object:
    """``value`` as something json.dumps writes (and text mode prints) predictably."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return str(value)


def _iso(moment: datetime) -> str:
    """ISO-8601 in UTC with milliseconds and ``Z``; a naive datetime is read as local time."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """The structured fields of a record (what ``extra=`` added), ready to be written."""
    found: dict[str, object] = {}
    for key, value in vars(record).items():
        if key in _STANDARD or key in _DROPPED or key.startswith("_"):
            continue
        name = f"field_{key}" if key in _RESERVED else key
        found[name] = safe_code(value) if key in _CODE_FIELDS else _plain(value)
    return found


def _exception_type(kind: type[BaseException]) -> str:
    module = kind.__module__
    return kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}"


def _frames(tb: TracebackType | None) -> list[str]:
    frames = traceback.extract_tb(tb)[-MAX_FRAMES:]
    return [f"{'/'.join(PurePath(f.filename).parts[-2:])}:{f.lineno} {f.name}" for f in frames]


def _exception_fields(
    exc_info: tuple[type[BaseException], BaseException, TracebackType | None] | None,
) -> dict[str, object]:
    """``exc_type``, ``exc_message`` (scrubbed), ``exc_cause`` and ``stack``: no locals, no source."""
    if not exc_info or exc_info[1] is None:
        return {}
    kind, exc, tb = exc_info
    found: dict[str, object] = {"exc_type": _exception_type(kind), "exc_message": scrub(str(exc))}
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None:
        found["exc_cause"] = f"{_exception_type(type(cause))}: {scrub(str(cause))}"
    found["stack"] = _frames(tb)
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``ts``, ``level``, ``logger``, ``event``, ``pid``,
    the record's fields, and ``exc_type``/``exc_message``/``exc_cause``/``stack`` for an exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _iso(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            "pid": record.process,
        }
        entry.update(_fields(record))
        entry.update(_exception_fields(record.exc_info))  # type: ignore[arg-type]
        return _json.dumps(entry, ensure_ascii=False, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS.mmm LEVEL   logger: event  key=value …`` for a person at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        head = f"{clock}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: {record.getMessage()}"
        extra = " ".join(f"{k}={_text_value(v)}" for k, v in _fields(record).items())
        lines = [f"{head}  {extra}" if extra else head]
        error = _exception_fields(record.exc_info)  # type: ignore[arg-type]
        if error:
            lines.append(f"  {error['exc_type']}: {error['exc_message']}")
            if "exc_cause" in error:
                lines.append(f"  caused by {error['exc_cause']}")
            lines.extend(f"    at {frame}" for frame in error["stack"])  # type: ignore[attr-defined]
        return "\n".join(lines)


def _text_value(value: object) -> str:
    if isinstance(value, str):
        return value if value and not any(c.isspace() or c in "\"'=" for c in value) else _json.dumps(value)
    return _json.dumps(value, ensure_ascii=False, default=str)


class _StderrHandler(logging.Handler):
    """Writes each record as one line to ``stream``, or to whatever ``sys.stderr`` is at that moment.

    Looked up at each record, not kept: a Dramatiq worker process points ``sys.stderr`` at its log
    pipe after start-up, and ``rich``'s live progress redirects it to print above the live view.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            stream = self.stream or sys.stderr
            stream.write(line)  # one write a record: a pipe shared by processes never splits a line
            stream.flush()
        except Exception:
            self.handleError(record)


def _level(value: str | int) -> int:
    if isinstance(value, int):
        return value
    found = _LEVELS.get(value.strip().lower())
    if found is None:
        raise ConfigError(
            f"{ENV_LEVEL}: '{value}' is not a log level; use debug, info, warning, error or critical"
        )
    return found


def _wants_json(json: bool | None, stream: TextIO) -> bool:
    forced = os.environ.get(ENV_FORMAT, "").strip().lower()
    if forced:
        if forced not in ("json", "text"):
            raise ConfigError(f"{ENV_FORMAT}: '{forced}' is not a log format; use json or text")
        return forced == "json"
    if json is not None:
        return json
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream: machines read it
        return True


def configure(level: str | int = "INFO", *, json: bool | None = None, stream: TextIO | None = None) -> None:
    """Send every log record to standard error (or ``stream``), as JSON lines or as text.

    ``level`` applies to smartpush's loggers (``SMARTPUSH_LOG_LEVEL`` overrides it); Dramatiq and
    uvicorn log from INFO at most, every other library from WARNING. ``json`` None: JSON unless the
    stream is a terminal (``SMARTPUSH_LOG_FORMAT`` overrides both). Calling it again replaces the
    handler it installed before and the plain handlers ``logging.basicConfig`` adds (Dramatiq's);
    other handlers (a test's capture) stay. Python's warnings become records of ``py.warnings``.
    """
    env_level = os.environ.get(ENV_LEVEL, "").strip()
    chosen = _level(env_level or level)
    target = stream or sys.stderr
    handler = _StderrHandler(stream)
    handler.setFormatter(JsonFormatter() if _wants_json(json, target) else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, _StderrHandler) or type(old) is logging.StreamHandler:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(chosen, logging.WARNING))
    logging.getLogger("smartpush").setLevel(chosen)
    for name in INFO_LIBRARIES:
        logging.getLogger(name).setLevel(max(chosen, logging.INFO))
    logging.captureWarnings(True)  # Python's warnings too, as records: every line stays JSON


_every_lock = threading.Lock()
_every_last: dict[Hashable, float] = {}


def every(key: Hashable, seconds: float = 60.0) -> bool:
    """True at most once per ``seconds`` for ``key``: for a line that could repeat per message.

    ``if logs.every(("store-down", account)): logger.warning(...)`` says it once a minute, not a
    million times.
    """
    now = time.monotonic()
    with _every_lock:
        last = _every_last.get(key)
        if last is not None and now - last < seconds:
            return False
        _every_last[key] = now
        return True
