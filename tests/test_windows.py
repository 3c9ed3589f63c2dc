"""Send windows, public holidays and the time a piece of sending work ends, on a frozen clock."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from smartpush.campaign import Campaign, Day, Window
from smartpush.errors import ConfigError
from smartpush.schema import problems_from
from smartpush.windows import (
    MARKETING_WINDOW,
    closing,
    describe,
    finish_time,
    holiday_calendar,
    is_holiday,
    local_midnight_after,
    next_opening,
)
from smartpush.yamlfile import load

PARIS = ZoneInfo("Europe/Paris")
WEEKDAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri")
PARIS_OFFICE = Window(days=list(WEEKDAYS), hours="09:00-19:00", timezone="Europe/Paris")
OFFICE_FR = Window(days=list(WEEKDAYS), hours="09:00-19:00", timezone="Europe/Paris", holidays="FR")


def paris(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=PARIS)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # Tuesday 1 Dec 2026, 10:00 Paris (09:00 UTC): open now
        (datetime(2026, 12, 1, 9, 0, tzinfo=UTC), datetime(2026, 12, 1, 9, 0, tzinfo=UTC)),
        # Tuesday 07:30 Paris: opens at 09:00 Paris = 08:00 UTC
        (datetime(2026, 12, 1, 6, 30, tzinfo=UTC), datetime(2026, 12, 1, 8, 0, tzinfo=UTC)),
        # Tuesday 19:00 Paris sharp: closed, next is Wednesday 09:00
        (datetime(2026, 12, 1, 18, 0, tzinfo=UTC), datetime(2026, 12, 2, 8, 0, tzinfo=UTC)),
        # Friday 20:00 Paris: next is Monday 09:00
        (datetime(2026, 12, 4, 19, 0, tzinfo=UTC), datetime(2026, 12, 7, 8, 0, tzinfo=UTC)),
        # Summer time: Monday 6 July 2026 08:30 Paris = 06:30 UTC, opens at 07:00 UTC
        (datetime(2026, 7, 6, 6, 30, tzinfo=UTC), datetime(2026, 7, 6, 7, 0, tzinfo=UTC)),
    ],
)
def test_next_opening(now: datetime, expected: datetime) -> None:
    assert next_opening(PARIS_OFFICE, now) == expected


def test_all_day_window_is_always_open() -> None:
    now = datetime(2026, 12, 6, 3, 0, tzinfo=UTC)  # Sunday, 04:00 Paris
    assert next_opening(Window(), now) == now


def test_marketing_default_skips_sunday_and_night() -> None:
    sunday_noon = datetime(2026, 12, 6, 11, 0, tzinfo=UTC)
    assert next_opening(MARKETING_WINDOW, sunday_noon) == datetime(2026, 12, 7, 7, 0, tzinfo=UTC)
    saturday_night = datetime(2026, 12, 5, 20, 30, tzinfo=UTC)  # 21:30 Paris
    assert next_opening(MARKETING_WINDOW, saturday_night) == datetime(2026, 12, 7, 7, 0, tzinfo=UTC)


def test_marketing_default_is_monday_to_saturday_8_to_20_paris_without_french_holidays() -> None:
    assert describe(MARKETING_WINDOW) == "mon-sat 08:00-20:00 Europe/Paris (holidays FR)"
    # Wednesday 11 November 2026 (Armistice), 10:00 Paris: closed all day, opens Thursday 08:00.
    assert next_opening(MARKETING_WINDOW, paris(2026, 11, 11, 10, 0)) == paris(2026, 11, 12, 8, 0)
    # Friday 1 May 2026 (Labour Day): the next opening is Saturday 2 May, 08:00.
    assert next_opening(MARKETING_WINDOW, paris(2026, 5, 1, 9, 0)) == paris(2026, 5, 2, 8, 0)


def test_christmas_is_skipped_and_the_weekend_after_it() -> None:
    # Friday 25 December 2026 is a holiday: Thursday evening's next opening is Monday 28, 09:00.
    assert next_opening(OFFICE_FR, paris(2026, 12, 24, 19, 30)) == paris(2026, 12, 28, 9, 0)
    assert next_opening(PARIS_OFFICE, paris(2026, 12, 24, 19, 30)) == paris(2026, 12, 25, 9, 0)
    assert is_holiday("FR", paris(2026, 12, 25).date())
    assert not is_holiday("FR", paris(2026, 12, 26).date())
    assert not is_holiday(None, paris(2026, 12, 25).date())


def test_a_holiday_is_a_day_in_the_windows_time_zone() -> None:
    # 24 Dec 2026 23:30 UTC is already 25 Dec in Paris: closed, even in an all-day window.
    window = Window(holidays="FR")
    late = datetime(2026, 12, 24, 23, 30, tzinfo=UTC)
    assert next_opening(window, late) == paris(2026, 12, 26, 0, 0)
    assert next_opening(window, datetime(2026, 12, 24, 22, 30, tzinfo=UTC)) == datetime(
        2026, 12, 24, 22, 30, tzinfo=UTC
    )


def test_alsace_moselle_has_holidays_of_its_own() -> None:
    # Good Friday (3 April 2026) and 26 December are holidays in Moselle (FR-57) and Alsace (67, 68).
    good_friday = paris(2026, 4, 3, 10, 0)
    assert next_opening(OFFICE_FR, good_friday) == good_friday
    for region in ("FR-57", "FR-67", "FR-68", "FR-Moselle", "fr-6ae"):
        moselle = Window(days=list(WEEKDAYS), hours="09:00-19:00", holidays=region)
        # Easter Monday is a holiday everywhere: Tuesday 7 April.
        assert next_opening(moselle, good_friday) == paris(2026, 4, 7, 9, 0), region
    assert holiday_calendar("FR-67") == ("FR", "6AE")
    assert holiday_calendar("fr-57") == ("FR", "57")
    assert Window(holidays="fr-57").holidays == "FR-57"


def test_search_horizon_covers_long_closures() -> None:
    # Mondays only, French holidays: Easter Monday 6 April and Whit Monday 25 May 2026 are skipped.
    mondays = Window(days=["mon"], hours="09:00-19:00", holidays="FR")
    assert next_opening(mondays, paris(2026, 4, 1, 12, 0)) == paris(2026, 4, 13, 9, 0)
    assert next_opening(mondays, paris(2026, 5, 19, 12, 0)) == paris(2026, 6, 1, 9, 0)
    assert next_opening(Window(days=[]), paris(2026, 5, 19, 12, 0)) is None


def test_holiday_sets_are_cached_so_a_lookup_is_cheap() -> None:
    start = time.perf_counter()
    now = paris(2026, 12, 24, 19, 30)
    for i in range(5000):
        next_opening(OFFICE_FR, now + timedelta(minutes=i))
    assert time.perf_counter() - start < 2.0  # about 10 µs each; generous for slow CI machines


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("XX", "'XX' is not a country whose public holidays are known"),
        ("France", "did you mean 'FR'?"),
        ("FR-99", "FR has no region '99' with holidays of its own"),
        ("FR-Mosele", "did you mean 'Moselle'?"),
        ("FR-99", "FR-57"),
    ],
)
def test_unknown_holiday_calendars_are_refused_with_a_hint(value: str, said: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Window(holidays=value)
    assert said in str(exc.value)


def test_holiday_error_names_the_field_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: c\naudience: {source: a.csv, id: id}\n"
        "channels: [{channel: sms, provider: p, body: hi}]\n"
        "schedule:\n  window: {days: mon-fri, holidays: FRA-57x}\n",
        encoding="utf-8",
    )
    raw, locs = load(path, "c.yaml")
    with pytest.raises(ValidationError) as exc:
        Campaign.model_validate(raw)
    (problem,) = problems_from(exc.value, locs, Campaign, raw)
    assert problem.field == "schedule.window.holidays"
    assert problem.line == 5
    assert "FRA" in problem.message and "region" in problem.message
    assert isinstance(ConfigError([problem]), ConfigError)


def test_describe() -> None:
    assert describe(PARIS_OFFICE) == "mon-fri 09:00-19:00 Europe/Paris"
    assert describe(Window.model_validate({"days": "mon,wed-fri", "holidays": "FR-57"})) == (
        "mon,wed-fri all day Europe/Paris (holidays FR-57)"
    )
    assert describe(Window(timezone="UTC")) == "every day all day UTC"


def test_closing_and_midnight() -> None:
    assert closing(PARIS_OFFICE, paris(2026, 12, 1, 10, 0)) == paris(2026, 12, 1, 19, 0)
    assert closing(PARIS_OFFICE, paris(2026, 12, 1, 20, 0)) == paris(2026, 12, 1, 20, 0)  # closed
    assert closing(Window(), paris(2026, 12, 1, 10, 0)) == paris(2026, 12, 2, 0, 0)
    assert local_midnight_after(datetime(2026, 12, 1, 23, 30, tzinfo=UTC), "Europe/Paris") == paris(
        2026, 12, 3, 0, 0
    )


# finish_time ------------------------------------------------------------------------------------------
def test_finish_without_window_or_quota_is_work_over_rate() -> None:
    start = paris(2026, 12, 1, 3, 0)
    assert finish_time(None, start, 12_400, 100.0) == start + timedelta(seconds=124)
    assert finish_time(None, start, 0, 100.0) == start
    assert finish_time(None, start, 5000, None) == start  # no rate: all at once


def test_finish_when_the_window_closes_mid_way() -> None:
    # 12,000 at 100/s is 2 min: 1 min before Tuesday's 19:00, the other at Wednesday 09:00.
    done = finish_time(PARIS_OFFICE, paris(2026, 12, 1, 18, 59), 12_000, 100.0)
    assert done == paris(2026, 12, 2, 9, 1)


def test_finish_over_a_weekend() -> None:
    done = finish_time(PARIS_OFFICE, paris(2026, 12, 4, 18, 59, 30), 6000, 100.0)
    assert done == paris(2026, 12, 7, 9, 0, 30)
    # Starting on a Saturday: nothing before Monday 09:00.
    assert finish_time(PARIS_OFFICE, paris(2026, 12, 5, 12, 0), 100, 100.0) == paris(2026, 12, 7, 9, 0, 1)


def test_finish_skips_christmas() -> None:
    # Thursday 24 Dec 18:59:50: 10 s that evening, Friday 25 is a holiday, the rest on Monday 28.
    done = finish_time(OFFICE_FR, paris(2026, 12, 24, 18, 59, 50), 2000, 100.0)
    assert done == paris(2026, 12, 28, 9, 0, 10)
    without = finish_time(PARIS_OFFICE, paris(2026, 12, 24, 18, 59, 50), 2000, 100.0)
    assert without == paris(2026, 12, 25, 9, 0, 10)


def test_quota_spills_to_the_next_calendar_days() -> None:
    # 1,000 a day at 10/s from Tuesday 23:00 Paris: 1,000 by 23:01:40, then 1,000 from Wednesday
    # midnight, and the last 500 from Thursday midnight: done at Thursday 00:00:50 Paris.
    start = paris(2026, 12, 1, 23, 0)
    done = finish_time(None, start, 2500, 10.0, 1000, quota_timezone="Europe/Paris")
    assert done == paris(2026, 12, 3, 0, 0, 50)
    # The quota day is the config's time zone's: in UTC, midnight comes an hour later.
    utc = finish_time(None, start, 2500, 10.0, 1000, quota_timezone="UTC")
    assert utc == datetime(2026, 12, 3, 0, 0, 50, tzinfo=UTC)
    # Part of today's quota already spent: the rest goes today, the remainder after midnight.
    assert finish_time(None, start, 600, 10.0, 1000, used_today=500) == paris(2026, 12, 2, 0, 0, 10)
    # No rate, only a quota: each day's share goes at midnight.
    assert finish_time(None, start, 2500, None, 1000) == paris(2026, 12, 3, 0, 0)


def test_quota_and_window_together() -> None:
    # Mon-fri 09-19, 1,000 a day at 1/s (16 min 40 s a day), 2,500 from Friday 4 Dec 10:00:
    # 1,000 Friday, 1,000 Monday, 500 Tuesday from 09:00 → 09:08:20.
    done = finish_time(PARIS_OFFICE, paris(2026, 12, 4, 10, 0), 2500, 1.0, 1000)
    assert done == paris(2026, 12, 8, 9, 8, 20)
    # Friday's quota already spent: Monday and Tuesday, then 500 on Wednesday.
    spent = finish_time(PARIS_OFFICE, paris(2026, 12, 4, 10, 0), 2500, 1.0, 1000, used_today=1000)
    assert spent == paris(2026, 12, 9, 9, 8, 20)


def test_daylight_saving_change() -> None:
    # Sunday 25 October 2026 lasts 25 hours in Paris: 90,000 s of work at 1/s fits in it exactly.
    sundays = Window(days=["sun"])
    start = paris(2026, 10, 25, 0, 0)
    assert finish_time(sundays, start, 90_000, 1.0) == paris(2026, 10, 26, 0, 0)
    assert finish_time(sundays, start, 90_001, 1.0) == paris(2026, 11, 1, 0, 0, 1)
    # A window closing at 19:00 CEST on Friday reopens at 09:00 CET on Monday (08:00 UTC).
    done = finish_time(PARIS_OFFICE, paris(2026, 10, 23, 18, 59), 120, 1.0)
    assert done == datetime(2026, 10, 26, 8, 1, tzinfo=UTC)
    # A quota day that is 23 hours long (29 March 2026, summer time begins) still resets at midnight.
    done = finish_time(None, paris(2026, 3, 29, 0, 0), 120, 1.0, 60)
    assert done == paris(2026, 3, 30, 0, 1) == datetime(2026, 3, 29, 22, 1, tzinfo=UTC)


def test_a_window_that_never_opens_never_finishes() -> None:
    assert finish_time(Window(days=[]), paris(2026, 12, 1, 9, 0), 10, 1.0) is None
    assert finish_time(None, paris(2026, 12, 1, 9, 0), 10**12, 1.0) is None  # beyond ten years
