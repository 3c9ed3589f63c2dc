"""The pacing limiter holds `rate: N/s` over every sliding one-second window (at most about 1.1 N)."""

import asyncio
import time

import pytest

from smartpush.ratelimit import RateLimiter


def send_times(rate: float, count: int, concurrency: int = 50) -> list[float]:
    limiter = RateLimiter(rate, concurrency)
    stamps: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        async with limiter.slots:
            stamps.append(time.monotonic())

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(count)))

    asyncio.run(main())
    return sorted(stamps)


@pytest.mark.parametrize("rate", [20.0, 200.0])
def test_no_one_second_window_exceeds_the_rate_by_more_than_the_burst(rate: float) -> None:
    stamps = send_times(rate, int(rate * 2.5))
    worst = 0
    j = 0
    for i, t in enumerate(stamps):
        while stamps[j] <= t - 1.0:
            j += 1
        worst = max(worst, i - j + 1)
    assert worst <= rate * 1.1 + 1


def test_no_rate_means_no_wait() -> None:
    limiter = RateLimiter(None, 10)

    async def main() -> None:
        for _ in range(10_000):
            await limiter.acquire()

    asyncio.run(main())
    assert limiter.waited_s == 0
