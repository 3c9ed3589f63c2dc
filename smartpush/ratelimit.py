"""Pacing sends to a provider account's ``rate`` and ``concurrency``, in one process.

A token bucket whose burst is a tenth of a second's worth (at least 1), so no one-second window sees
more than about 1.1 × the rate (SPEC.md). Callers *wait* for tokens; nothing fails for being early.
Sharing the bucket across workers (Redis) and daily quotas arrive with the rate-limits issue.
"""

from __future__ import annotations

import asyncio
import time

from .provider import ProviderOptions

__all__ = ["DAILY_QUOTA_CODE", "RateLimiter"]

#: ``error_code`` of a ``created`` message held back until tomorrow by its account's ``daily_quota``.
DAILY_QUOTA_CODE = "daily-quota"

#: The bucket holds at most this share of a second's tokens: the burst a provider may see.
BURST_SECONDS = 0.1


class RateLimiter:
    """``acquire(n)`` waits until ``n`` tokens are free; ``slots`` caps requests in flight."""

    def __init__(self, per_second: float | None, concurrency: int) -> None:
        self.per_second = per_second
        self.capacity = max(1.0, per_second * BURST_SECONDS) if per_second else 0.0
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock: asyncio.Lock | None = None
        self.concurrency = concurrency
        self._slots: asyncio.Semaphore | None = None
        self.waited_s = 0.0

    @classmethod
    def for_account(cls, options: ProviderOptions) -> RateLimiter:
        return cls(options.messages_per_second, options.concurrency)

    @property
    def slots(self) -> asyncio.Semaphore:
        """Requests in flight (created on the loop that first uses it)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        return self._slots

    async def acquire(self, n: int = 1) -> None:
        if not self.per_second:
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # first come, first served: waiting callers keep their order
            need = min(float(n), self.capacity)
            while True:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.per_second)
                self._stamp = now
                if self._tokens >= need:
                    self._tokens -= float(n)  # may go negative for n > capacity: later callers wait longer
                    return
                wait = (need - self._tokens) / self.per_second
                self.waited_s += wait
                await asyncio.sleep(wait)
