"""Pacing sends to each provider account: rate, burst, daily quota, throttle pauses, concurrency.

One algorithm, two stores. A :class:`Bucket` is an account's limits; its state lives in a
:class:`MemoryStore` (embedded mode: one process) or a :class:`RedisStore` (distributed mode: every
worker on every host shares it, updated by one atomic Lua script on Redis's own clock, so host clocks
do not matter). The algorithm is GCRA, the "virtual scheduling" form of a token bucket:

* the bucket holds at most ``burst`` units, a tenth of a second's worth (at least 1), so no sliding
  one-second window ever sees more than ``rate + burst`` sends, about 1.1 × the rate (SPEC.md);
* a process *reserves* a batch of units at once (one Redis round trip for many messages), each unit
  with the moment it may be used, no further ahead than :data:`HORIZON_SECONDS`, and then sleeps until
  each unit's moment: callers wait, nothing fails for being early;
* a throttle answer from the provider pauses the bucket for every worker (:meth:`AccountLimiter.pause`);
* ``daily_quota`` counts units per *calendar day in the configured timezone* (it resets at local
  midnight): once it is used up, :class:`QuotaExhausted` says when sending may resume.

In each process an :class:`AccountLimiter` hands the reserved units to waiting messages: ``urgent``
runs first, then ``normal``, then ``bulk``, and round robin between runs of the same priority, so two
campaigns sharing an account share its rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from . import logs

__all__ = [
    "DAILY_QUOTA_CODE",
    "AccountLimiter",
    "Bucket",
    "Grant",
    "HandedBack",
    "MemoryStore",
    "QuotaExhausted",
    "RedisStore",
    "StoreUnavailable",
    "reserve",
]

logger = logging.getLogger("smartpush.ratelimit")

#: ``error_code`` of a ``created`` message held back until tomorrow by its account's ``daily_quota``.
DAILY_QUOTA_CODE = "daily-quota"

#: The bucket holds at most this share of a second's units: the burst a provider may see.
BURST_SECONDS = 0.1
#: A process reserves units at most this far ahead of the store's clock.
HORIZON_SECONDS = 0.2
#: A reserved unit not used within this long after its moment is given back (its quota refunded)
#: instead of being sent late next to fresh ones, which would exceed the burst.
STALE_SECONDS = 0.02
#: Units an account without rate or quota reserves at a time, beyond the ones waited for.
UNLIMITED_AHEAD = 128
#: How long a cluster-wide concurrency slot is held at most when its holder dies without releasing.
LEASE_MARGIN_SECONDS = 5.0
#: Waiting for a cluster-wide concurrency slot: first and longest poll interval.
SLOT_POLL_MIN_S = 0.002
SLOT_POLL_MAX_S = 0.05

#: Absorbs float rounding when counting the units that fit in the horizon (the Lua script uses it too).
EPSILON = 1e-9
#: Priorities, most urgent first.
PRIORITIES = {"urgent": 0, "normal": 1, "bulk": 2}


class StoreUnavailable(Exception):
    """The shared store (Redis) failed: the message waits, it does not fail."""

    def __init__(self, account: str, cause: BaseException) -> None:
        super().__init__(f"the rate-limit store for account '{account}' failed ({type(cause).__name__})")
        self.account = account


class QuotaExhausted(Exception):
    """The account's daily quota is used up until ``resets_at`` (UTC)."""

    def __init__(self, account: str, quota: int, resets_at: datetime) -> None:
        super().__init__(f"provider account '{account}' used its daily quota of {quota:,}")
        self.account = account
        self.quota = quota
        self.resets_at = resets_at


@dataclass(frozen=True)
class Bucket:
    """One provider account's limits."""

    account: str
    per_second: float | None
    daily_quota: int | None = None
    timezone: str = "Europe/Paris"
    #: Requests in flight across every process (None: no cluster-wide cap).
    cluster_concurrency: int | None = None
    #: How long a cluster-wide slot may be held (the account's timeout plus a margin).
    lease_s: float = 60.0

    @property
    def limited(self) -> bool:
        return self.per_second is not None or self.daily_quota is not None

    @property
    def interval(self) -> float:
        """Seconds between two units (0: no rate)."""
        return 1.0 / self.per_second if self.per_second else 0.0

    @property
    def burst(self) -> int:
        return max(1, math.floor(self.per_second * BURST_SECONDS)) if self.per_second else 1_000_000

    @property
    def tolerance(self) -> float:
        """GCRA's τ: how far ahead of its schedule a unit may go, (burst - 1) intervals."""
        return (self.burst - 1) * self.interval

    @property
    def horizon(self) -> float:
        return HORIZON_SECONDS

    @property
    def batch(self) -> int:
        """The fewest units worth a round trip to the store (when that many are wanted)."""
        return self.burst if self.per_second else 1_000_000

    def day(self, wall: datetime) -> date:
        return wall.astimezone(ZoneInfo(self.timezone)).date()

    def day_ends(self, wall: datetime) -> datetime:
        """The next local midnight, in UTC: when the daily quota resets."""
        tz = ZoneInfo(self.timezone)
        tomorrow = wall.astimezone(tz).date() + timedelta(days=1)
        return datetime(tomorrow.year, tomorrow.month, tomorrow.day, tzinfo=tz).astimezone(UTC)


@dataclass(frozen=True)
class Grant:
    """The store's answer to a reservation, in the store's clock (seconds)."""

    count: int
    #: The store's clock when it answered.
    now: float
    #: With ``count`` > 0: the moment of the first unit (units follow every ``interval``, none before
    #: ``now``). With ``count`` == 0: when to ask again.
    first: float
    #: The daily quota is used up.
    exhausted: bool = False

    def times(self, interval: float) -> list[float]:
        return [max(self.now, self.first + j * interval) for j in range(self.count)]


def reserve(
    tat: float, now: float, bucket: Bucket, demand: int, minimum: int, quota_left: int | None
) -> tuple[float, Grant]:
    """GCRA: reserve up to ``demand`` units (at least ``minimum`` or none). Returns the new TAT.

    ``tat`` is the theoretical arrival time of the next unit on the bucket's schedule. A unit may go
    ``tolerance`` ahead of it. Only units due within the horizon are granted. The Lua script in
    :class:`RedisStore` is this function, line for line.
    """
    if quota_left is not None:
        if quota_left <= 0:
            return tat, Grant(0, now, now, exhausted=True)
        demand = min(demand, quota_left)
        minimum = min(minimum, demand)
    interval = bucket.interval
    if interval == 0:  # no rate: only a throttle pause (a TAT in the future) holds units back
        first = max(now, tat)
        if first > now + bucket.horizon:
            return tat, Grant(0, now, first - bucket.horizon)
        return tat, Grant(demand, now, first)
    tat = max(tat, now)
    first = tat - bucket.tolerance
    reach = now + bucket.horizon
    granted = 0 if first > reach else min(demand, math.floor((reach - first) / interval + EPSILON) + 1)
    if granted < max(1, minimum):
        # Ask again when `minimum` units will fit within the horizon.
        return tat, Grant(0, now, max(now, first + (max(1, minimum) - 1) * interval - bucket.horizon))
    return tat + granted * interval, Grant(granted, now, first)


class Store(Protocol):
    """Where buckets keep their state: one process's memory, or Redis for every worker."""

    async def reserve(self, bucket: Bucket, demand: int, minimum: int, day: date) -> Grant: ...
    async def pause(self, bucket: Bucket, seconds: float) -> None: ...
    async def refund(self, bucket: Bucket, units: int, day: date) -> None: ...
    async def quota_used(self, bucket: Bucket, day: date) -> int | None: ...
    async def seed_quota(self, bucket: Bucket, day: date, used: int) -> None: ...
    async def take_slot(self, bucket: Bucket, holder: str) -> bool: ...
    async def give_slot(self, bucket: Bucket, holder: str) -> None: ...
    async def close(self) -> None: ...


@dataclass
class _MemoryBucket:
    tat: float = 0.0
    used: dict[date, int] = field(default_factory=dict)
    slots: dict[str, float] = field(default_factory=dict)


class MemoryStore:
    """Buckets of one process (embedded mode). ``clock`` is monotonic seconds (replaceable in tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, _MemoryBucket] = {}
        self.calls = 0

    def _get(self, bucket: Bucket) -> _MemoryBucket:
        return self._buckets.setdefault(bucket.account, _MemoryBucket())

    async def reserve(self, bucket: Bucket, demand: int, minimum: int, day: date) -> Grant:
        self.calls += 1
        state = self._get(bucket)
        left = None if bucket.daily_quota is None else bucket.daily_quota - state.used.get(day, 0)
        state.tat, grant = reserve(state.tat, self.clock(), bucket, demand, minimum, left)
        if grant.count and bucket.daily_quota is not None:
            state.used[day] = state.used.get(day, 0) + grant.count
            for old in [d for d in state.used if d < day]:
                del state.used[old]
        return grant

    async def pause(self, bucket: Bucket, seconds: float) -> None:
        state = self._get(bucket)
        state.tat = max(state.tat, self.clock() + seconds + bucket.tolerance)

    async def refund(self, bucket: Bucket, units: int, day: date) -> None:
        state = self._get(bucket)
        if day in state.used:
            state.used[day] = max(0, state.used[day] - units)

    async def quota_used(self, bucket: Bucket, day: date) -> int | None:
        return self._get(bucket).used.get(day)

    async def seed_quota(self, bucket: Bucket, day: date, used: int) -> None:
        self._get(bucket).used.setdefault(day, used)

    async def take_slot(self, bucket: Bucket, holder: str) -> bool:
        slots = self._get(bucket).slots
        now = self.clock()
        for name in [h for h, until in slots.items() if until <= now]:
            del slots[name]
        if bucket.cluster_concurrency is not None and len(slots) >= bucket.cluster_concurrency:
            return False
        slots[holder] = now + bucket.lease_s
        return True

    async def give_slot(self, bucket: Bucket, holder: str) -> None:
        self._get(bucket).slots.pop(holder, None)

    async def close(self) -> None:
        return None


# KEYS: bucket hash, quota counter of the day. ARGV: interval, tolerance, horizon, demand, minimum,
# quota (0: none), now (-1: Redis's clock), quota key TTL in ms. Mirrors `reserve` above.
_RESERVE = """
local now = tonumber(ARGV[7])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local demand = tonumber(ARGV[4])
local minimum = tonumber(ARGV[5])
local quota = tonumber(ARGV[6])
if quota > 0 then
  local left = quota - tonumber(redis.call('GET', KEYS[2]) or '0')
  if left <= 0 then
    return {-1, string.format('%.17g', now), string.format('%.17g', now)}
  end
  if demand > left then demand = left end
  if minimum > demand then minimum = demand end
end
if minimum < 1 then minimum = 1 end
local granted = demand
local first = now
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or '0')
if interval == 0 then
  if tat > now then first = tat end
  if first > now + horizon then
    return {0, string.format('%.17g', now), string.format('%.17g', first - horizon)}
  end
else
  if tat < now then tat = now end
  first = tat - tolerance
  local reach = now + horizon
  if first > reach then
    granted = 0
  else
    granted = math.min(demand, math.floor((reach - first) / interval + 1e-9) + 1)
  end
  if granted < minimum then
    local again = first + (minimum - 1) * interval - horizon
    if again < now then again = now end
    return {0, string.format('%.17g', now), string.format('%.17g', again)}
  end
  tat = tat + granted * interval
  redis.call('HSET', KEYS[1], 'tat', string.format('%.17g', tat))
  redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now + tolerance) * 1000) + 60000)
end
if quota > 0 then
  redis.call('INCRBY', KEYS[2], granted)
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[8]))
end
return {granted, string.format('%.17g', now), string.format('%.17g', first)}
"""

# KEYS: bucket hash. ARGV: seconds, tolerance, now (-1: Redis's clock).
_PAUSE = """
local now = tonumber(ARGV[3])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local until_ = now + tonumber(ARGV[1])
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or '0')
local pushed = until_ + tonumber(ARGV[2])
if pushed > tat then
  redis.call('HSET', KEYS[1], 'tat', string.format('%.17g', pushed))
end
redis.call('HSET', KEYS[1], 'paused_until', string.format('%.17g', until_))
redis.call('PEXPIRE', KEYS[1], math.ceil((pushed - now) * 1000) + 60000)
return string.format('%.17g', until_)
"""

# KEYS: slot set. ARGV: holder, limit, lease seconds, now (-1: Redis's clock).
_TAKE_SLOT = """
local now = tonumber(ARGV[4])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) * 1000))
return 1
"""


class RedisStore:
    """Buckets shared by every worker through Redis: one Lua call per reservation, on Redis's clock.

    ``clock`` replaces Redis's clock in tests (seconds); leave it None in production.
    """

    def __init__(
        self, url: str, *, prefix: str = "smartpush", clock: Callable[[], float] | None = None
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.clock = clock
        self._client: Any = None
        self._scripts: dict[str, Any] = {}

    def _redis(self) -> Any:
        if self._client is None:
            import redis.asyncio

            self._client = redis.asyncio.Redis.from_url(self.url)
            for name, text in (("reserve", _RESERVE), ("pause", _PAUSE), ("take", _TAKE_SLOT)):
                self._scripts[name] = self._client.register_script(text)
        return self._client

    def _now(self) -> float:
        return self.clock() if self.clock is not None else -1.0

    def key(self, bucket: Bucket, kind: str = "bucket") -> str:
        return f"{self.prefix}:{kind}:{bucket.account}"

    def quota_key(self, bucket: Bucket, day: date) -> str:
        return f"{self.prefix}:quota:{bucket.account}:{day.isoformat()}"

    async def reserve(self, bucket: Bucket, demand: int, minimum: int, day: date) -> Grant:
        self._redis()
        count, now, first = await self._scripts["reserve"](
            keys=[self.key(bucket), self.quota_key(bucket, day)],
            args=[
                repr(bucket.interval),
                repr(bucket.tolerance),
                repr(bucket.horizon),
                demand,
                minimum,
                bucket.daily_quota or 0,
                repr(self._now()),
                2 * 86_400_000,  # two days: yesterday's count outlives any clock or zone doubt
            ],
        )
        count = int(count)
        if count < 0:
            return Grant(0, float(now), float(first), exhausted=True)
        return Grant(count, float(now), float(first))

    async def pause(self, bucket: Bucket, seconds: float) -> None:
        self._redis()
        await self._scripts["pause"](
            keys=[self.key(bucket)], args=[repr(seconds), repr(bucket.tolerance), repr(self._now())]
        )

    async def refund(self, bucket: Bucket, units: int, day: date) -> None:
        if bucket.daily_quota is None or units <= 0:
            return
        client = self._redis()
        key = self.quota_key(bucket, day)
        left = await client.decrby(key, units)
        if int(left) < 0:
            await client.set(key, 0, keepttl=True)

    async def quota_used(self, bucket: Bucket, day: date) -> int | None:
        value = await self._redis().get(self.quota_key(bucket, day))
        return None if value is None else int(value)

    async def seed_quota(self, bucket: Bucket, day: date, used: int) -> None:
        await self._redis().set(self.quota_key(bucket, day), used, nx=True, px=2 * 86_400_000)

    async def take_slot(self, bucket: Bucket, holder: str) -> bool:
        self._redis()
        limit = bucket.cluster_concurrency
        if limit is None:
            return True
        taken = await self._scripts["take"](
            keys=[self.key(bucket, "slots")], args=[holder, limit, repr(bucket.lease_s), repr(self._now())]
        )
        return bool(int(taken))

    async def give_slot(self, bucket: Bucket, holder: str) -> None:
        if bucket.cluster_concurrency is not None:
            await self._redis().zrem(self.key(bucket, "slots"), holder)

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


class HandedBack(Exception):
    """The caller gave its place up before its turn (its worker thread is wanted elsewhere)."""


@dataclass
class _Waiter:
    units: int
    future: asyncio.Future[None]
    tag: object = None


class AccountLimiter:
    """One account's limits in one process: waiting messages get the units the store reserves.

    ``clock`` (monotonic seconds), ``sleep`` and ``wall`` (UTC now) are replaceable so tests can run
    on a controllable clock. ``on_wait`` is told how long each caller waited (the metric).
    """

    def __init__(
        self,
        bucket: Bucket,
        store: Store,
        *,
        concurrency: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        used_today: Callable[[datetime], int] | None = None,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.bucket = bucket
        self.store = store
        self.concurrency = concurrency
        self.clock = clock
        self._sleep = sleep
        self.wall = wall
        self._used_today = used_today
        self._on_wait = on_wait
        self._queues: dict[int, dict[str, deque[_Waiter]]] = {}
        self._turn: dict[int, deque[str]] = {}
        self._stock: deque[float] = deque()
        self._stock_day: date | None = None
        self._pump: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._paused_until = 0.0
        self._pause_generation = 0
        self._exhausted_until: datetime | None = None
        self._seeded: set[date] = set()
        self._slots: asyncio.Semaphore | None = None
        self.waited_s = 0.0
        self.reservations = 0
        #: Units given up because this process reached them too late (see STALE_SECONDS).
        self.dropped = 0

    # -- waiting for units -------------------------------------------------------------------------

    def exhausted_until(self) -> datetime | None:
        """When the daily quota resets, while it is used up (as far as this process knows)."""
        if self._exhausted_until is not None and self.wall() >= self._exhausted_until:
            self._exhausted_until = None
        return self._exhausted_until

    async def acquire(
        self, units: int = 1, *, priority: str = "normal", group: str = "", tag: object = None
    ) -> float:
        """Wait until ``units`` may be sent; returns the seconds waited.

        Raises :class:`QuotaExhausted`, :class:`StoreUnavailable`, or :class:`HandedBack` when
        :meth:`abandon` is called with the same ``tag`` before the turn came.
        """
        resets = self.exhausted_until()
        if resets is not None:
            raise QuotaExhausted(self.bucket.account, self.bucket.daily_quota or 0, resets)
        units = max(1, units)
        if not self._queues and self._take_now(units):
            return 0.0
        level = PRIORITIES.get(priority, 1)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(units, loop.create_future(), tag)
        groups = self._queues.setdefault(level, {})
        if group not in groups:
            groups[group] = deque()
            self._turn.setdefault(level, deque()).append(group)
        groups[group].append(waiter)
        if self._pump is None or self._pump.done():
            self._pump = loop.create_task(self._run())
        started = self.clock()
        await waiter.future
        waited = self.clock() - started
        if waited > 0:
            self.waited_s += waited
            if self._on_wait is not None:
                self._on_wait(waited)
        return waited

    def _take_now(self, units: int) -> bool:
        """Nobody waits and ``units`` reserved units are due and fresh: take them without a turn (what
        the pump would do at once, without a future and a wake-up per message)."""
        stock = self._stock
        if len(stock) < units:
            return False
        now = self.clock()
        if stock[units - 1] > now or now - stock[0] > STALE_SECONDS or self._paused_until > now:
            return False
        for _ in range(units):
            stock.popleft()
        return True

    def _head(self) -> _Waiter | None:
        """The next waiter: most urgent priority first, round robin between groups (runs)."""
        for level in sorted(self._queues):
            groups = self._queues[level]
            turn = self._turn[level]
            while turn:
                name = turn[0]
                queue = groups[name]
                while queue and queue[0].future.done():  # cancelled while waiting
                    queue.popleft()
                if queue:
                    return queue[0]
                turn.popleft()
                del groups[name]
            del self._queues[level]
            del self._turn[level]
        return None

    def abandon(self, tag: object) -> int:
        """Every caller waiting with ``tag`` gives its place up (:class:`HandedBack`); returns how many."""
        count = 0
        for groups in self._queues.values():
            for queue in groups.values():
                for waiter in queue:
                    if waiter.tag is tag and not waiter.future.done():
                        waiter.future.set_exception(HandedBack())
                        count += 1
        return count

    def _waiting_units(self) -> int:
        return sum(w.units for groups in self._queues.values() for q in groups.values() for w in q)

    async def _run(self) -> None:
        try:
            await self._refund_stale()
            while (waiter := self._head()) is not None:
                generation = self._pause_generation
                if not await self._fill(waiter.units):
                    return  # quota used up: every waiter was told
                if generation != self._pause_generation:
                    continue  # paused while reserving: those units were dropped
                moment = self._stock[waiter.units - 1]
                for _ in range(waiter.units):
                    self._stock.popleft()
                wait = moment - self.clock()
                if wait > 0:
                    await self._interruptible_sleep(wait)
                if generation != self._pause_generation:
                    continue  # paused while sleeping: the waiter waits for the pause to end
                if waiter.future.done():  # cancelled meanwhile: the units go to the next waiter
                    self._stock.extendleft([moment] * waiter.units)
                    continue
                if self.clock() - moment > STALE_SECONDS:
                    # This process fell behind (a busy event loop, a pause of the whole machine): sent
                    # now, these units would bunch with the ones every other worker sends on time.
                    await self._refund(waiter.units)
                    self.dropped += waiter.units
                    continue
                self._remove(waiter)
                waiter.future.set_result(None)
        except Exception as exc:  # the store failed (Redis down): every waiter hears it, no task dies
            if logs.every(("store-unavailable", self.bucket.account)):
                logger.warning(
                    "account %s: the rate-limit store cannot be reached (%s); its messages wait",
                    self.bucket.account,
                    type(exc).__name__,
                    extra={
                        "provider": self.bucket.account,
                        "outcome": "store-down",
                        "code": type(exc).__name__,
                    },
                )
            self._fail_all(StoreUnavailable(self.bucket.account, exc))

    def _remove(self, waiter: _Waiter) -> None:
        """Take ``waiter`` out of its queue; its run goes to the back of its priority's turn."""
        for level, groups in self._queues.items():
            for name, queue in groups.items():
                if queue and queue[0] is waiter:
                    queue.popleft()
                    turn = self._turn[level]
                    if turn and turn[0] == name:
                        turn.rotate(-1)
                    return

    async def _fill(self, units: int) -> bool:
        """Make sure ``units`` are in stock; False when the daily quota is used up."""
        bucket = self.bucket
        cap = bucket.burst + math.ceil(bucket.horizon * bucket.per_second) if bucket.per_second else 1_000
        while len(self._stock) < units:
            pause_left = self._paused_until - self.clock()
            if pause_left > 0:
                await self._interruptible_sleep(pause_left)
                continue
            wall = self.wall()
            day = bucket.day(wall)
            if self._stock_day is not None and day != self._stock_day:  # midnight passed: new count
                await self._refund(len(self._stock))
                self._stock.clear()
            self._stock_day = day
            await self._seed(day, wall)
            needed = units - len(self._stock)
            wanted = max(needed, min(self._waiting_units() - len(self._stock), cap))
            if not bucket.limited:
                # No rate and no quota: units cost nothing, and the ones not taken within STALE_SECONDS
                # lapse. Reserving ahead lets the next messages take theirs at once (_take_now).
                wanted = max(wanted, min(cap, UNLIMITED_AHEAD))
            grant = await self.store.reserve(bucket, wanted, min(wanted, bucket.batch), day)
            self.reservations += 1
            if grant.exhausted:
                await self._refund(len(self._stock))
                self._stock.clear()
                self._exhausted_until = bucket.day_ends(wall)
                logger.warning(
                    "account %s used its daily quota of %d: its messages wait until %s",
                    bucket.account,
                    bucket.daily_quota or 0,
                    self._exhausted_until.isoformat(timespec="minutes"),
                    extra={
                        "provider": bucket.account,
                        "outcome": "quota-exhausted",
                        "quota": bucket.daily_quota,
                        "resumes_at": self._exhausted_until,
                    },
                )
                self._fail_all(QuotaExhausted(bucket.account, bucket.daily_quota or 0, self._exhausted_until))
                return False
            offset = self.clock() - grant.now  # the store's clock → this process's clock
            if grant.count == 0:
                await self._interruptible_sleep(max(0.0, grant.first - grant.now))
                continue
            self._stock.extend(t + offset for t in grant.times(bucket.interval))
        return True

    async def _seed(self, day: date, wall: datetime) -> None:
        """Start today's quota count from the ledger when the store has none (a new process, a new day)."""
        if self.bucket.daily_quota is None or day in self._seeded or self._used_today is None:
            return
        self._seeded.add(day)
        if await self.store.quota_used(self.bucket, day) is None:
            used = await asyncio.to_thread(self._used_today, wall)
            await self.store.seed_quota(self.bucket, day, used)

    async def _refund_stale(self) -> None:
        """Units reserved earlier and left over: give back those whose moment has passed."""
        now = self.clock()
        stale = 0
        while self._stock and self._stock[0] < now - STALE_SECONDS:
            self._stock.popleft()
            stale += 1
        await self._refund(stale)

    async def _refund(self, units: int) -> None:
        if units and self.bucket.daily_quota is not None and self._stock_day is not None:
            await self.store.refund(self.bucket, units, self._stock_day)

    async def give_back(self, units: int) -> None:
        """Units acquired but not sent (the run was paused, the provider throttled): quota refunded."""
        if self.bucket.daily_quota is not None:
            await self.store.refund(self.bucket, units, self.bucket.day(self.wall()))

    async def _interruptible_sleep(self, seconds: float) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.clear()
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, woken):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    def _fail_all(self, exc: BaseException) -> None:
        for groups in self._queues.values():
            for queue in groups.values():
                for waiter in queue:
                    if not waiter.future.done():
                        waiter.future.set_exception(exc)
        self._queues.clear()
        self._turn.clear()

    # -- back-pressure -------------------------------------------------------------------------------

    async def pause(self, seconds: float) -> None:
        """The provider throttled us: no unit for ``seconds``, in this process and (through the store)
        in every other one. Units already reserved here are dropped and their quota refunded."""
        if seconds <= 0:
            return
        if self._paused_until <= self.clock():  # once a pause, not once a throttled message
            logger.info(
                "account %s throttled by its provider: paused %.1f s",
                self.bucket.account,
                seconds,
                extra={"provider": self.bucket.account, "outcome": "throttled", "delay_s": seconds},
            )
        self._paused_until = max(self._paused_until, self.clock() + seconds)
        self._pause_generation += 1
        dropped = len(self._stock)
        self._stock.clear()
        if self._wake is not None:
            self._wake.set()
        await self._refund(dropped)
        await self.store.pause(self.bucket, seconds)

    @property
    def paused_for(self) -> float:
        return max(0.0, self._paused_until - self.clock())

    # -- concurrency ---------------------------------------------------------------------------------

    def slot(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A request in flight: at most ``concurrency`` per process, ``cluster_concurrency`` overall."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        if self.bucket.cluster_concurrency is None:
            return self._slots  # the semaphore itself: no generator-based context per message
        return self._cluster_slot(self._slots)

    @contextlib.asynccontextmanager
    async def _cluster_slot(self, slots: asyncio.Semaphore) -> AsyncIterator[None]:
        async with slots:
            holder = uuid.uuid4().hex
            poll = SLOT_POLL_MIN_S
            while not await self.store.take_slot(self.bucket, holder):
                await self._sleep(poll)
                poll = min(SLOT_POLL_MAX_S, poll * 2)
            try:
                yield
            finally:
                await self.store.give_slot(self.bucket, holder)
