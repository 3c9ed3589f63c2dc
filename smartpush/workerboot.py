"""Entry point of each ``smartpush worker`` process, loaded by Dramatiq's CLI.

``smartpush worker`` runs ``dramatiq smartpush.workerboot:setup``; every worker process calls
:func:`setup`, which reads the configuration named by ``SMARTPUSH_CONFIG``, builds the process's
:class:`~smartpush.engine.Engine` (its broker, actors, ledger and drivers) and starts the sweeper.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import logs
from .config import load_config
from .engine import Engine

__all__ = ["setup"]

ENGINE: Engine | None = None


def setup() -> None:
    global ENGINE
    # `smartpush worker` set SMARTPUSH_LOG_FORMAT and SMARTPUSH_LOG_LEVEL for its processes; this one
    # writes to Dramatiq's log pipe (sys.stderr here), which Dramatiq's parent copies to its stderr.
    logs.configure("INFO")
    path = os.environ.get("SMARTPUSH_CONFIG") or None
    config = load_config(Path(path) if path else None)
    if config.settings.broker is None:
        from .errors import ConfigError

        raise ConfigError(
            f"{config.source} has no broker: set `broker: redis://…` (workers serve a shared broker; "
            "embedded `smartpush send` needs no worker)"
        )
    ENGINE = Engine(config)
    ENGINE.start_sweeper()
