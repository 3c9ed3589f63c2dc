"""Failover between the provider accounts of a channel (``provider: [sms-main, sms-backup]``).

A circuit breaker per account: ``failover.errors`` provider-side failures (transient or technical)
within ``failover.within`` open it for ``failover.cooldown``; while open, messages go to the next
account of the channel. In distributed mode the counts and the open state live in Redis, so every
worker skips a failing account together. A message that failed for a provider-side reason is retried
on the next account; one refused for a recipient-side reason (permanent) is never sent elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

__all__ = ["Breaker", "choose_account"]

logger = logging.getLogger("smartpush.failover")

#: How long a process trusts its last reading of an account's breaker in Redis.
_CACHE_S = 1.0


class Breaker:
    """Counts provider-side failures per account and says which accounts to skip."""

    def __init__(self, errors: int, within_s: float, cooldown_s: float, redis_url: str | None = None) -> None:
        self.errors = errors
        self.within_s = within_s
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}
        self._open_until: dict[str, float] = {}
        self._cache: dict[str, tuple[float, bool]] = {}
        self._redis: Any = None
        if redis_url is not None:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=1.0)

    def failed(self, account: str) -> None:
        """Count one provider-side failure of ``account``."""
        now = time.time()
        if self._redis is not None:
            bucket = f"smartpush:breaker:{account}:{int(now // self.within_s)}"
            try:
                count = self._redis.incr(bucket)
                self._redis.expire(bucket, int(self.within_s * 2) + 1)
                if count >= self.errors:
                    self._redis.set(f"smartpush:breaker:{account}:open", 1, px=int(self.cooldown_s * 1000))
                    self._cache.pop(account, None)
                    if count == self.errors:  # the worker whose failure opened it says so, once
                        self._opened(account)
                return
            except Exception:
                pass
        with self._lock:
            stamps = self._failures.setdefault(account, deque())
            stamps.append(now)
            while stamps and stamps[0] < now - self.within_s:
                stamps.popleft()
            if len(stamps) >= self.errors:
                self._open_until[account] = now + self.cooldown_s
                stamps.clear()
                self._opened(account)

    def _opened(self, account: str) -> None:
        logger.warning(
            "account %s skipped for %.0f s: %d provider-side failures within %.0f s",
            account,
            self.cooldown_s,
            self.errors,
            self.within_s,
            extra={"provider": account, "outcome": "failover", "delay_s": self.cooldown_s},
        )

    def is_open(self, account: str) -> bool:
        """True while ``account`` is being skipped."""
        now = time.time()
        if self._open_until.get(account, 0.0) > now:
            return True
        if self._redis is None:
            return False
        cached = self._cache.get(account)
        if cached is not None and now - cached[0] < _CACHE_S:
            return cached[1]
        try:
            is_open = bool(self._redis.exists(f"smartpush:breaker:{account}:open"))
        except Exception:
            is_open = False
        self._cache[account] = (now, is_open)
        return is_open


def choose_account(
    breaker: Breaker, accounts: Sequence[str], last: str | None, failed_last: bool
) -> str | None:
    """The account to try: after ``last`` when it failed, skipping open breakers; None if all are open."""
    start = 0
    if failed_last and last is not None and last in accounts and len(accounts) > 1:
        start = (list(accounts).index(last) + 1) % len(accounts)
    order = [*accounts[start:], *accounts[:start]]
    for account in order:
        if not breaker.is_open(account):
            return account
    return None
