"""The pacing limiter: burst, steady rate, SMS parts, daily quota roll-over, throttle pause, priorities.

Most tests run on a controllable clock: the limiter's ``sleep`` advances a fake clock instead of
waiting, so a minute of sending is checked in milliseconds and exactly. The same scenarios run against
both stores: one process's memory, and Redis (the Lua script) with the fake clock passed in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartpush.ratelimit import (
    AccountLimiter,
    Bucket,
    MemoryStore,
    QuotaExhausted,
    RedisStore,
    StoreUnavailable,
    reserve,
)

REDIS_DB = 13


def _redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=2).ping())
    except Exception:
        return False


needs_redis = pytest.mark.skipif(not _redis_up(), reason="needs Redis on 127.0.0.1:6379")


class FakeClock:
    """Monotonic seconds and a wall clock that move only when someone sleeps."""

    def __init__(self, wall: datetime = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)) -> None:
        self.t = 1000.0
        self.start_wall = wall

    def __call__(self) -> float:
        return self.t

    def wall(self) -> datetime:
        return self.start_wall + timedelta(seconds=self.t - 1000.0)

    async def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)


def worst_window(stamps: list[float], width: float = 1.0) -> int:
    """The most events in any half-open window [t, t + width)."""
    stamps = sorted(stamps)
    worst = j = 0
    for i, t in enumerate(stamps):
        while stamps[j] <= t - width:
            j += 1
        worst = max(worst, i - j + 1)
    return worst


@pytest.fixture(params=["memory", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    if request.param == "redis" and not _redis_up():
        pytest.skip("needs Redis on 127.0.0.1:6379")
    return str(request.param)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_store(kind: str, clock: FakeClock, prefix: str) -> Any:
    if kind == "memory":
        return MemoryStore(clock)
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    return RedisStore(f"redis://127.0.0.1:6379/{REDIS_DB}", prefix=prefix, clock=clock)


def limiter(bucket: Bucket, store: Any, clock: FakeClock, **kw: Any) -> AccountLimiter:
    return AccountLimiter(
        bucket, store, concurrency=100, clock=clock, sleep=clock.sleep, wall=clock.wall, **kw
    )


async def send_all(lim: AccountLimiter, clock: FakeClock, n: int, units: int = 1, **kw: Any) -> list[float]:
    stamps: list[float] = []

    async def one() -> None:
        await lim.acquire(units, **kw)
        stamps.append(clock())

    await asyncio.gather(*(one() for _ in range(n)))
    return stamps


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- the algorithm ---------------------------------------------------------------------------------


def test_an_idle_bucket_allows_a_tenth_of_a_second_at_once_then_paces() -> None:
    bucket = Bucket("sms", 50.0)
    assert bucket.burst == 5
    tat, grant = reserve(0.0, 100.0, bucket, demand=100, minimum=5, quota_left=None)
    times = grant.times(bucket.interval)
    assert times[:5] == [100.0] * 5  # the burst: a tenth of a second's worth, at once
    assert times[5] == pytest.approx(100.02)  # then one every 20 ms
    assert all(t <= 100.0 + bucket.horizon + 1e-9 for t in times)  # never reserved far ahead
    assert tat == pytest.approx(times[-1] + bucket.interval + bucket.tolerance)


def test_no_grant_smaller_than_the_batch_says_when_to_ask_again() -> None:
    bucket = Bucket("sms", 50.0)
    tat, _ = reserve(0.0, 100.0, bucket, demand=100, minimum=5, quota_left=None)
    tat2, none = reserve(tat, 100.0, bucket, demand=100, minimum=5, quota_left=None)
    assert none.count == 0 and tat2 == tat
    _, later = reserve(tat, none.first, bucket, demand=100, minimum=5, quota_left=None)
    assert later.count >= 5  # asking again when told gets a whole batch


def test_a_rate_per_minute_is_paced_per_minute() -> None:
    bucket = Bucket("sms", 6000 / 60)  # 6000/min = 100/s
    assert bucket.burst == 10 and bucket.interval == pytest.approx(0.01)
    slow = Bucket("sms", 1 / 60)  # 1/min: burst 1, one unit a minute
    tat, first = reserve(0.0, 0.0, slow, 5, 1, None)
    _, second = reserve(tat, 1.0, slow, 5, 1, None)
    assert first.count == 1 and second.count == 0 and second.first == pytest.approx(60.0 - slow.horizon)


# -- one process, on a controllable clock, against both stores --------------------------------------


@pytest.mark.parametrize("rate", [50.0, 1000.0])
def test_steady_rate_holds_every_one_second_window(store_kind: str, clock: FakeClock, rate: float) -> None:
    async def main() -> list[float]:
        store = make_store(store_kind, clock, f"t-steady-{rate}")
        lim = limiter(Bucket("sms", rate), store, clock)
        stamps = await send_all(lim, clock, int(rate * 10))
        await store.close()
        return stamps

    stamps = run(main())
    burst = max(1, int(rate / 10))
    assert worst_window(stamps) <= rate + burst  # SPEC: at most a tenth of a second's worth above N
    duration = max(stamps) - min(stamps)
    mean = (len(stamps) - burst) / duration
    assert mean == pytest.approx(rate, rel=0.02)


def test_sms_parts_use_one_unit_each(store_kind: str, clock: FakeClock) -> None:
    async def main() -> list[float]:
        store = make_store(store_kind, clock, "t-parts")
        lim = limiter(Bucket("sms", 10.0), store, clock)
        stamps = await send_all(lim, clock, 20, units=3)  # 20 SMS of 3 parts at 10 parts/s
        await store.close()
        return stamps

    stamps = run(main())
    assert max(stamps) - min(stamps) == pytest.approx((20 * 3 - 3) / 10, abs=0.05)


def test_daily_quota_stops_until_local_midnight_then_rolls_over(store_kind: str) -> None:
    # 23:59:58 in Paris on 1 December: the quota resets at midnight Paris, two seconds later.
    clock = FakeClock(datetime(2026, 12, 1, 22, 59, 58, tzinfo=UTC))

    async def main() -> None:
        store = make_store(store_kind, clock, "t-quota")
        bucket = Bucket("sms", 100.0, daily_quota=20, timezone="Europe/Paris")
        lim = limiter(bucket, store, clock)
        assert len(await send_all(lim, clock, 20)) == 20
        with pytest.raises(QuotaExhausted) as caught:
            await lim.acquire()
        assert caught.value.resets_at == datetime(2026, 12, 1, 23, 0, tzinfo=UTC)
        assert "daily quota of 20" in str(caught.value)
        # A second process sharing the store is refused too, and it is told the same time.
        other = limiter(bucket, store, clock)
        with pytest.raises(QuotaExhausted):
            await other.acquire()
        await clock.sleep(2.5)  # past midnight in Paris
        assert len(await send_all(lim, clock, 20)) == 20
        assert await store.quota_used(bucket, bucket.day(clock.wall())) == 20
        await store.close()

    run(main())


def test_quota_counts_units_given_back(store_kind: str, clock: FakeClock) -> None:
    async def main() -> None:
        store = make_store(store_kind, clock, "t-refund")
        bucket = Bucket("sms", None, daily_quota=5)
        lim = limiter(bucket, store, clock)
        await send_all(lim, clock, 5)
        await lim.give_back(2)  # two were throttled: they did not reach the provider
        await send_all(lim, clock, 2)
        with pytest.raises(QuotaExhausted):
            await lim.acquire()
        await store.close()

    run(main())


def test_quota_starts_from_what_the_ledger_already_counted_today(clock: FakeClock) -> None:
    async def main() -> None:
        bucket = Bucket("sms", None, daily_quota=10)
        lim = limiter(bucket, MemoryStore(clock), clock, used_today=lambda wall: 8)
        await send_all(lim, clock, 2)
        with pytest.raises(QuotaExhausted):
            await lim.acquire()

    run(main())


def test_throttle_pause_holds_every_process(store_kind: str, clock: FakeClock) -> None:
    async def main() -> None:
        store = make_store(store_kind, clock, "t-pause")
        bucket = Bucket("sms", 20.0)
        one, two = limiter(bucket, store, clock), limiter(bucket, store, clock)
        await send_all(one, clock, 10)
        paused_at = clock()
        await one.pause(5.0)  # a 429 with Retry-After: 5
        stamps = await send_all(two, clock, 10)  # another worker, same account
        assert min(stamps) >= paused_at + 5.0 - 1e-6
        # after the pause, no burst: the provider asked us to slow down
        assert worst_window(stamps, 0.1) <= 3
        await store.close()

    run(main())


def test_a_pause_wakes_a_waiter_that_was_about_to_send(clock: FakeClock) -> None:
    async def main() -> None:
        lim = limiter(Bucket("sms", 1.0), MemoryStore(clock), clock)
        await lim.acquire()
        waiting = asyncio.ensure_future(send_all(lim, clock, 1))
        await asyncio.sleep(0)
        await lim.pause(30.0)
        stamps = await waiting
        assert stamps[0] >= 1000.0 + 30.0

    run(main())


def test_urgent_is_served_before_bulk_waiting_longer(clock: FakeClock) -> None:
    async def main() -> list[str]:
        lim = limiter(Bucket("sms", 10.0), MemoryStore(clock), clock)
        order: list[str] = []

        async def one(name: str, priority: str) -> None:
            await lim.acquire(priority=priority, group=name)
            order.append(name)

        bulk = [asyncio.ensure_future(one("bulk", "bulk")) for _ in range(30)]
        await asyncio.sleep(0)
        urgent = [asyncio.ensure_future(one("urgent", "urgent")) for _ in range(3)]
        await asyncio.gather(*bulk, *urgent)
        return order

    order = run(main())
    assert order.index("urgent") <= 2  # the first free units go to urgent
    assert order[: order.index("urgent") + 3].count("urgent") == 3


def test_two_runs_sharing_an_account_share_its_rate(clock: FakeClock) -> None:
    async def main() -> list[tuple[str, float]]:
        lim = limiter(Bucket("sms", 10.0), MemoryStore(clock), clock)
        done: list[tuple[str, float]] = []

        async def one(run_id: str) -> None:
            await lim.acquire(group=run_id)
            done.append((run_id, clock()))

        first = [asyncio.ensure_future(one("A")) for _ in range(100)]
        await asyncio.sleep(0)
        second = [asyncio.ensure_future(one("B")) for _ in range(100)]
        await asyncio.gather(*first, *second)
        return done

    done = run(main())
    in_first_ten_seconds = [r for r, t in done if t < 1010.0]
    assert abs(in_first_ten_seconds.count("A") - in_first_ten_seconds.count("B")) <= 2


def test_cluster_concurrency_caps_requests_in_flight_across_processes(store_kind: str) -> None:
    async def main() -> int:
        store = make_store(store_kind, FakeClock(), "t-slots")
        if store_kind == "redis":
            store.clock = None  # real time: slots are held while real requests run
        else:
            store.clock = time.monotonic
        bucket = Bucket("sms", None, cluster_concurrency=3)
        procs = [AccountLimiter(bucket, store, concurrency=10) for _ in range(3)]
        in_flight = worst = 0

        async def request(lim: AccountLimiter) -> None:
            nonlocal in_flight, worst
            async with lim.slot():
                in_flight += 1
                worst = max(worst, in_flight)
                await asyncio.sleep(0.01)
                in_flight -= 1

        await asyncio.gather(*(request(p) for p in procs for _ in range(10)))
        await store.close()
        return worst

    assert run(main()) == 3


def test_a_dead_holder_frees_its_cluster_slot_after_the_lease(clock: FakeClock) -> None:
    async def main() -> None:
        store = MemoryStore(clock)
        bucket = Bucket("sms", None, cluster_concurrency=1, lease_s=10.0)
        assert await store.take_slot(bucket, "dead-worker")  # never given back
        lim = limiter(bucket, store, clock)
        async with lim.slot():
            assert clock() >= 1010.0

    run(main())


@needs_redis
def test_redis_down_is_reported_to_every_waiter_not_lost() -> None:
    async def main() -> None:
        lim = AccountLimiter(Bucket("sms", 10.0), RedisStore("redis://127.0.0.1:1/0"), concurrency=5)
        results = await asyncio.gather(*(lim.acquire() for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert "127.0.0.1" not in str(results[0])

    run(main())


# -- the Lua script is the Python function ----------------------------------------------------------


@pytest.fixture(scope="module")
def redis_store() -> Iterator[RedisStore]:
    if not _redis_up():
        pytest.skip("needs Redis on 127.0.0.1:6379")
    yield RedisStore(f"redis://127.0.0.1:6379/{REDIS_DB}", prefix="t-lua")


@needs_redis
@settings(max_examples=30, deadline=None)
@given(
    rate=st.sampled_from([None, 0.5, 7.0, 50.0, 333.0, 2000.0]),
    quota=st.one_of(st.none(), st.integers(1, 60)),
    steps=st.lists(
        st.tuples(st.floats(0, 0.3), st.integers(1, 40), st.integers(1, 10), st.floats(0, 2)),
        min_size=1,
        max_size=25,
    ),
)
def test_lua_and_python_agree(
    redis_store: RedisStore, rate: float | None, quota: int | None, steps: list[tuple[float, int, int, float]]
) -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    bucket = Bucket("lua", rate, daily_quota=quota)
    clock = FakeClock()
    redis_store.clock = clock
    memory = MemoryStore(clock)
    day = bucket.day(clock.wall())

    async def main() -> None:
        redis_store._client = None  # a fresh connection on this test's event loop
        for advance, demand, minimum, pause in steps:
            clock.t += advance
            if pause > 1.9:  # now and then, a throttle pause
                await memory.pause(bucket, pause)
                await redis_store.pause(bucket, pause)
            want = await memory.reserve(bucket, demand, min(minimum, demand), day)
            got = await redis_store.reserve(bucket, demand, min(minimum, demand), day)
            assert (got.count, got.exhausted) == (want.count, want.exhausted)
            assert got.first == pytest.approx(want.first, abs=1e-6)
        await redis_store.close()

    run(main())


# -- in real time ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [20.0, 200.0])
def test_in_real_time_no_one_second_window_exceeds_the_rate_by_more_than_the_burst(rate: float) -> None:
    async def main() -> list[float]:
        lim = AccountLimiter(Bucket("sms", rate), MemoryStore(), concurrency=50)
        stamps: list[float] = []

        async def one() -> None:
            await lim.acquire()
            async with lim.slot():
                stamps.append(time.monotonic())

        await asyncio.gather(*(one() for _ in range(int(rate * 2.5))))
        return stamps

    stamps = run(main())
    assert worst_window(stamps) <= rate * 1.1 + 1


def test_the_wait_is_reported_for_the_metric(clock: FakeClock) -> None:
    waits: list[float] = []

    async def main() -> None:
        lim = limiter(Bucket("sms", 10.0), MemoryStore(clock), clock, on_wait=waits.append)
        await send_all(lim, clock, 21)

    run(main())
    assert sum(waits) == pytest.approx(sum(i / 10 for i in range(1, 21)), abs=0.05)


def test_an_account_s_limits_come_from_smartpush_yaml(tmp_path: Any) -> None:
    from smartpush.config import load_config
    from smartpush.runtime import Runtime

    (tmp_path / "smartpush.yaml").write_text(
        f"database: sqlite:///{tmp_path / 'l.db'}\ntimezone: America/Cayenne\n"
        "providers:\n  sms:\n    type: webhook\n    base_url: http://127.0.0.1:9\n"
        "    rate: 6000/min\n    daily_quota: 250000\n    cluster_concurrency: 4\n    timeout: 10s\n",
        encoding="utf-8",
    )
    rt = Runtime(load_config(tmp_path / "smartpush.yaml", env={}))
    try:
        bucket = rt.bucket("sms")
        assert bucket.per_second == pytest.approx(100.0)
        assert (bucket.daily_quota, bucket.cluster_concurrency) == (250000, 4)
        assert bucket.timezone == "America/Cayenne"  # the quota's day is the config's local day
        assert bucket.lease_s == pytest.approx(15.0)  # the timeout plus a margin
        assert isinstance(rt.limit_store, MemoryStore)  # no broker: embedded, in this process
    finally:
        rt.close()


def test_waiters_can_give_their_place_up(clock: FakeClock) -> None:
    from smartpush.ratelimit import HandedBack

    async def main() -> tuple[int, list[Any]]:
        lim = limiter(Bucket("sms", 1.0), MemoryStore(clock), clock)
        batch, other = object(), object()
        waiting = [asyncio.ensure_future(lim.acquire(tag=batch)) for _ in range(5)]
        kept = asyncio.ensure_future(lim.acquire(tag=other))
        await asyncio.sleep(0)
        given_up = lim.abandon(batch)
        results = await asyncio.gather(*waiting, return_exceptions=True)
        await kept  # the other caller is served, and soon: the places given up are not waited for
        assert clock() < 1000.0 + 2.5
        return given_up, results

    given_up, results = run(main())
    assert given_up >= 4  # the first may already have had its turn
    assert sum(isinstance(r, HandedBack) for r in results) == given_up


def test_an_account_without_a_rate_sends_one_after_the_other_without_a_reservation_each(
    store_kind: str, clock: FakeClock
) -> None:
    """Messages that come one at a time (a sender per connection) take units reserved ahead: one
    store round trip for many messages, no wait, and still none after the units lapse unseen."""

    async def main() -> None:
        store = make_store(store_kind, clock, "t-ahead")
        lim = limiter(Bucket("sms", None), store, clock)
        waited = [await lim.acquire() for _ in range(100)]
        assert waited == [0.0] * 100
        assert lim.reservations == 1  # 100 messages at the same moment: one reservation ahead of them
        clock.t += 1.0  # the units left over lapse (STALE_SECONDS): the next message asks the store again
        await lim.acquire()
        assert lim.reservations == 2
        await store.close()

    run(main())


def test_an_account_without_a_rate_still_pauses_in_every_process(store_kind: str, clock: FakeClock) -> None:
    """Units reserved ahead never let a message through a pause: not in the process that was
    throttled (its units are dropped), not in another one once its own have lapsed."""

    async def main() -> None:
        store = make_store(store_kind, clock, "t-ahead-pause")
        bucket = Bucket("sms", None)
        one, two = limiter(bucket, store, clock), limiter(bucket, store, clock)
        await one.acquire()
        await two.acquire()
        paused_at = clock()
        await one.pause(5.0)  # a 429 with Retry-After: 5
        clock.t += 0.5  # the other process's units lapse: its next message waits for the end too
        await two.acquire()
        assert clock() >= paused_at + 5.0 - 1e-6
        await one.acquire()
        assert clock() >= paused_at + 5.0 - 1e-6
        await store.close()

    run(main())
