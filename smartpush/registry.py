"""Provider drivers, found by name through the ``smartpush.providers`` entry-point group."""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points

from .errors import ConfigError
from .provider import Provider

__all__ = ["available", "driver"]

GROUP = "smartpush.providers"


@cache
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def available() -> list[str]:
    """Names of every installed driver, sorted."""
    return sorted(_entry_points())


def driver(name: str) -> type[Provider]:
    """The driver class registered as ``name``; a :class:`ConfigError` when there is none."""
    eps = _entry_points()
    if name not in eps:
        raise ConfigError(f"unknown provider type '{name}'; installed drivers: {', '.join(available())}")
    cls = eps[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise ConfigError(f"the entry point for provider type '{name}' is not a smartpush Provider class")
    return cls
