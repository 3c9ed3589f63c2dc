"""smartpush.logs: the JSON lines ops ship, the text people read, the levels and the overrides."""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from smartpush import logs
from smartpush.errors import ConfigError
from smartpush.ledger import Status

PHONE = "+33612345678"
EMAIL = "zephyrine.martin@example.fr"
TOKEN = "fGz3-Tk9:APA91bH" + "x7Q2" * 20


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure() changes process-wide state: put it back after each test."""
    monkeypatch.delenv(logs.ENV_FORMAT, raising=False)
    monkeypatch.delenv(logs.ENV_LEVEL, raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("smartpush", "dramatiq", "uvicorn", "aiosmtplib")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines_of(stream)]


# -- JSON --------------------------------------------------------------------------------------------


def test_a_record_is_one_json_line_with_its_fields() -> None:
    out = io.StringIO()
    logs.configure("INFO", stream=out)
    logging.getLogger("smartpush.sending").info(
        "run %s segment %d: %d sent",
        "r1",
        3,
        200,
        extra={
            "run_id": "r1",
            "segment": 3,
            "message_id": "m1",
            "provider": "sms-main",
            "status": Status.SENT,
            "campaign": "grippe",
            "retry_in": timedelta(seconds=1.5),
            "at": datetime(2026, 5, 1, 12, 0, tzinfo=UTC),
            "counts": {"sent": 200, "failed": 0},
        },
    )
    (line,) = lines_of(out)
    entry = json.loads(line)
    assert entry["event"] == "run r1 segment 3: 200 sent"
    assert entry["level"] == "info" and entry["logger"] == "smartpush.sending"
    assert entry["ts"].endswith("Z") and datetime.fromisoformat(entry["ts"]).tzinfo is not None
    assert isinstance(entry["pid"], int)
    assert {k: entry[k] for k in ("run_id", "segment", "message_id", "provider", "campaign")} == {
        "run_id": "r1",
        "segment": 3,
        "message_id": "m1",
        "provider": "sms-main",
        "campaign": "grippe",
    }
    assert entry["status"] == "sent"  # an enum is written as its value
    assert entry["retry_in"] == 1.5  # a timedelta as seconds
    assert entry["at"] == "2026-05-01T12:00:00.000Z"
    assert entry["counts"] == {"sent": 200, "failed": 0}


def test_a_field_cannot_overwrite_the_envelope() -> None:
    out = io.StringIO()
    logs.configure("INFO", stream=out)
    logging.getLogger("smartpush.x").info("real", extra={"event": "fake", "level": "none", "ts": 0})
    (entry,) = records(out)
    assert entry["event"] == "real" and entry["level"] == "info"
    assert entry["field_event"] == "fake" and entry["field_level"] == "none" and entry["field_ts"] == 0


def test_uvicorns_coloured_copy_of_the_message_is_dropped() -> None:
    out = io.StringIO()
    logs.configure("INFO", stream=out)
    logging.getLogger("uvicorn.error").info(
        "Started server process [%d]",
        42,
        extra={"color_message": "Started server process [\x1b[36m%d\x1b[0m]"},
    )
    (entry,) = records(out)
    assert entry["event"] == "Started server process [42]" and "color_message" not in entry


def test_a_message_with_line_breaks_stays_one_line() -> None:
    out = io.StringIO()
    logs.configure("INFO", stream=out)
    logging.getLogger("smartpush.x").warning("first\nsecond", extra={"note": "a\nb"})
    (line,) = lines_of(out)
    assert json.loads(line)["event"] == "first\nsecond"


def test_an_exception_is_its_type_a_scrubbed_message_and_frames_never_locals() -> None:
    out = io.StringIO()
    logs.configure("INFO", stream=out)

    def render(address: str) -> None:
        secret_local = f"Bonjour Zéphyrine, {address}"  # a local: must not be written
        raise ValueError(f"cannot send to {address} ({PHONE}, {TOKEN})\n[parameters: {secret_local}]")

    try:
        render(EMAIL)
    except ValueError:
        logging.getLogger("smartpush.x").exception("failed")
    (line,) = lines_of(out)
    entry = json.loads(line)
    assert entry["exc_type"] == "ValueError"
    assert entry["exc_message"] == "cannot send to <email> (<number>, <token>)"
    assert any(frame.endswith(" render") for frame in entry["stack"])
    for personal in (EMAIL, PHONE, TOKEN, "Zéphyrine", "Bonjour"):
        assert personal not in line


def test_an_exception_keeps_its_cause_and_library_types_are_qualified() -> None:
    out = io.StringIO()
    logs.configure("INFO", stream=out)
    try:
        try:
            raise ConnectionRefusedError("connect to 127.0.0.1:5432 refused")
        except OSError as exc:
            raise ConfigError("the ledger cannot be reached") from exc
    except ConfigError:
        logging.getLogger("smartpush.x").exception("boom")
    (entry,) = records(out)
    assert entry["exc_type"] == "smartpush.errors.ConfigError"
    assert entry["exc_cause"] == "ConnectionRefusedError: connect to 127.0.0.1:5432 refused"


@pytest.mark.parametrize(
    ("code", "written"),
    [
        ("429", "429"),
        ("550 5.1.1", "550 5.1.1"),
        ("UNREGISTERED", "UNREGISTERED"),
        ("21610", "21610"),
        (401, 401),
        (None, None),
        (PHONE, "<redacted>"),  # a provider that echoes the number as its error code
        ("0612345678", "<redacted>"),
        ("06 12 34 56 78", "<redacted>"),
        (EMAIL, "<redacted>"),
        (TOKEN, "<redacted>"),
        ("bad\nline", "<redacted>"),
    ],
)
def test_codes_that_are_not_codes_are_redacted(code: object, written: object) -> None:
    out = io.StringIO()
    logs.configure("INFO", stream=out)
    logging.getLogger("smartpush.x").info("refused", extra={"code": code, "error_code": code})
    (entry,) = records(out)
    assert entry["code"] == written and entry["error_code"] == written


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        ("no such run 01923abc4567def", "no such run 01923abc4567def"),  # ids stay readable
        ("connection to 127.0.0.1:6379 refused", "connection to 127.0.0.1:6379 refused"),
        ("number 06 12 34 56 78 refused", "number <number> refused"),
        ("to +33 6 12 34 56 78.", "to <number>."),
        ("mailto:jean@example.fr", "mailto:<email>"),
        ("line one\nline two with jean@example.fr", "line one"),
        ("x" * 500, "<token>"),
    ],
)
def test_scrub(text: str, scrubbed: str) -> None:
    assert logs.scrub(text) == scrubbed


# -- text --------------------------------------------------------------------------------------------


def test_text_on_a_terminal() -> None:
    tty = Terminal()
    logs.configure("INFO", stream=tty)
    logging.getLogger("smartpush.sending").info(
        "run %s finished", "r1", extra={"run_id": "r1", "counts": {"sent": 3}, "campaign": "a b"}
    )
    (line,) = lines_of(tty)
    found = re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} (\w+) +(\S+): (.*)", line)
    assert found is not None, line
    assert found.groups() == (
        "INFO",
        "smartpush.sending",
        'run r1 finished  run_id=r1 counts={"sent": 3} campaign="a b"',
    )


def test_text_shows_an_exception_without_its_personal_data() -> None:
    tty = Terminal()
    logs.configure("INFO", stream=tty)
    try:
        raise KeyError(EMAIL)
    except KeyError:
        logging.getLogger("smartpush.x").exception("driver failed")
    text = tty.getvalue()
    assert "driver failed" in text and "KeyError: '<email>'" in text and " at " in text
    assert EMAIL not in text


# -- levels and overrides ----------------------------------------------------------------------------


def test_levels_of_our_loggers_and_of_libraries() -> None:
    out = io.StringIO()
    logs.configure("DEBUG", stream=out)
    logging.getLogger("smartpush.sending").debug("ours")
    logging.getLogger("dramatiq.worker").info("worker up")
    logging.getLogger("dramatiq.worker").debug("dramatiq chatter")
    logging.getLogger("aiosmtplib").debug("RCPT TO:<%s>", EMAIL)  # a library's debug quotes addresses
    logging.getLogger("httpx").info("a URL holding a token")
    logging.getLogger("aiohttp.client").warning("a library warning")
    assert [e["event"] for e in records(out)] == ["ours", "worker up", "a library warning"]


def test_the_default_level_hides_debug() -> None:
    out = io.StringIO()
    logs.configure("INFO", stream=out)
    logging.getLogger("smartpush.sending").debug("per message")
    logging.getLogger("smartpush.sending").info("per segment")
    assert [e["event"] for e in records(out)] == ["per segment"]


def test_env_overrides_format_and_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logs.ENV_FORMAT, "json")
    monkeypatch.setenv(logs.ENV_LEVEL, "debug")
    tty = Terminal()
    logs.configure("WARNING", stream=tty)  # a terminal and WARNING, both overridden
    logging.getLogger("smartpush.x").debug("shown", extra={"run_id": "r"})
    assert records(tty)[0]["run_id"] == "r"

    monkeypatch.setenv(logs.ENV_FORMAT, "TEXT")
    monkeypatch.setenv(logs.ENV_LEVEL, "error")
    pipe = io.StringIO()
    logs.configure("DEBUG", json=True, stream=pipe)
    logging.getLogger("smartpush.x").warning("hidden")
    logging.getLogger("smartpush.x").error("shown")
    (line,) = lines_of(pipe)
    assert " ERROR " in line and not line.startswith("{")


def test_json_unless_a_terminal_and_the_argument_decides_without_env() -> None:
    pipe, tty, forced = io.StringIO(), Terminal(), Terminal()
    for stream, json_ in ((pipe, None), (tty, None), (forced, True)):
        logs.configure("INFO", json=json_, stream=stream)
        logging.getLogger("smartpush.x").info("hello")
    assert pipe.getvalue().startswith("{") and forced.getvalue().startswith("{")
    assert not tty.getvalue().startswith("{")


@pytest.mark.parametrize(("name", "value"), [(logs.ENV_LEVEL, "verbose"), (logs.ENV_FORMAT, "yaml")])
def test_a_bad_env_value_is_an_error_that_names_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        logs.configure("INFO", stream=io.StringIO())


def test_configure_again_replaces_its_handler_and_basic_config_but_keeps_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = io.StringIO(), io.StringIO()
    logging.getLogger().addHandler(logging.StreamHandler(io.StringIO()))  # as Dramatiq's basicConfig does
    logs.configure("INFO", stream=first)
    logs.configure("INFO", stream=second)
    with caplog.at_level(logging.INFO, logger="smartpush"):
        logging.getLogger("smartpush.x").info("once")
    assert first.getvalue() == "" and len(lines_of(second)) == 1
    plain = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    assert plain == []
    assert [r.getMessage() for r in caplog.records] == ["once"]  # a test's capture still works


def test_the_handler_follows_sys_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dramatiq's worker processes and rich's live view replace sys.stderr after start-up."""
    logs.configure("INFO")
    later = io.StringIO()
    monkeypatch.setattr("sys.stderr", later)
    logging.getLogger("smartpush.x").info("to the new stderr")
    assert json.loads(later.getvalue())["event"] == "to the new stderr"


def test_every_says_it_once_per_interval() -> None:
    key = ("test", object())
    assert logs.every(key, 60) is True
    assert logs.every(key, 60) is False
    assert logs.every(key, 0) is True


def test_python_warnings_become_json_records() -> None:
    out = io.StringIO()
    logs.configure("INFO", stream=out)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("an old option", DeprecationWarning, stacklevel=1)
    (entry,) = records(out)
    assert entry["logger"] == "py.warnings" and entry["level"] == "warning"
    assert "DeprecationWarning: an old option" in str(entry["event"])
