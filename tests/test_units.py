from datetime import timedelta

import pytest

from smartpush.units import format_duration, parse_duration, parse_rate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15min", timedelta(minutes=15)),
        ("1h", timedelta(hours=1)),
        ("1h30min", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(days=14)),
        ("250ms", timedelta(milliseconds=250)),
        ("10sec", timedelta(seconds=10)),
        (90, timedelta(seconds=90)),
    ],
)
def test_durations(text: str | int, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["30", "1 parsec", "h", "-5s", "", True, -3, "1h30"])
def test_bad_durations_say_how_to_write_one(bad: object) -> None:
    with pytest.raises(ValueError, match=r"duration|negative"):
        parse_duration(bad)


def test_duration_round_trip() -> None:
    assert format_duration(timedelta(hours=1, minutes=30)) == "1h30min"
    assert format_duration(timedelta(0)) == "0s"


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("100/s", 100), ("6000/min", 100), ("360000/h", 100), ("8640000/d", 100), ("1 / sec", 1)],
)
def test_rates(text: str, per_second: float) -> None:
    assert parse_rate(text).per_second == pytest.approx(per_second)


@pytest.mark.parametrize("bad", ["100", "100/week", "0/s", "fast", 100])
def test_bad_rates(bad: object) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(bad)
