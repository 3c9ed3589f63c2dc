from datetime import UTC, datetime

import pytest

from smartpush.campaign import Window
from smartpush.windows import MARKETING_WINDOW, next_opening

PARIS_OFFICE = Window(days=["mon", "tue", "wed", "thu", "fri"], hours="09:00-19:00", timezone="Europe/Paris")


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
