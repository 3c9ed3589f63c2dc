"""``smartpush serve``: the one network-facing part of smartpush (receipts, STOP, unsubscribe, health)."""

from __future__ import annotations

from .app import ServeContext, create_app

__all__ = ["ServeContext", "create_app"]
