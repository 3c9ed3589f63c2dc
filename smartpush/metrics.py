"""Prometheus metrics of smartpush processes (SPEC.md "Metrics"). No personal data in any label."""

from __future__ import annotations

from prometheus_client import Counter

__all__ = ["RATE_LIMIT_WAIT"]

RATE_LIMIT_WAIT = Counter(
    "smartpush_rate_limit_wait_seconds",
    "Seconds messages waited for their provider account's rate limit, quota or throttle pause.",
    ["provider"],
)
