"""Prometheus metrics of smartpush processes (SPEC.md "Metrics"). No personal data in any label."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = ["INBOUND_SMS", "RATE_LIMIT_WAIT", "RECEIPTS", "TIME_TO_DELIVERY"]

RATE_LIMIT_WAIT = Counter(
    "smartpush_rate_limit_wait_seconds",
    "Seconds messages waited for their provider account's rate limit, quota or throttle pause.",
    ["provider"],
)

#: Seconds from a message's acceptance by its provider (``sent_at``) to its delivery receipt.
TIME_TO_DELIVERY = Histogram(
    "smartpush_time_to_delivery_seconds",
    "Seconds from a message's acceptance by its provider to its delivery receipt.",
    ["channel"],
    buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400, float("inf")),
)

#: Receipts ``serve`` stored, by what they did: ``applied`` (moved a message), ``unchanged`` (a
#: duplicate, or older news than the message's status), ``pending`` (no message carries the reference
#: yet), ``unknown`` (still none minutes later), ``ignored`` (an interim status the driver drops).
RECEIPTS = Counter(
    "smartpush_receipts",
    "Delivery receipts received by smartpush serve, by provider account and outcome.",
    ["provider", "outcome"],
)

#: SMS replies ``serve`` received: ``stop`` (an opt-out), ``other`` (counted, never read further),
#: ``unreadable`` (a sender that is not a phone number).
INBOUND_SMS = Counter(
    "smartpush_inbound_sms",
    "SMS replies received by smartpush serve, by provider account and outcome.",
    ["provider", "outcome"],
)
