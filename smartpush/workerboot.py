"""Entry point of each ``smartpush worker`` process, loaded by Dramatiq's CLI.

``smartpush worker`` runs ``dramatiq smartpush.workerboot:setup``; every worker process calls
:func:`setup`, which reads the configuration named by ``SMARTPUSH_CONFIG``, builds the process's
:class:`~smartpush.engine.Engine` (its broker, actors, ledger and drivers) and starts the sweeper.

Metrics: before any process starts, the parent calls :func:`metrics_environment`, which empties the
multiprocess folder (``PROMETHEUS_MULTIPROC_DIR``, or a private temporary one for ``--metrics-port``)
and exports it to the children, as ``dramatiq_prom_db`` too. It must run before anything imports
``prometheus_client``: that import decides, once, whether a process writes its metrics to the folder.
Each worker process then adds Dramatiq's Prometheus middleware (``dramatiq_*`` metrics, in the same
folder), and with ``--metrics-port`` Dramatiq starts one more process, :func:`serve_metrics`, that
serves every process's metrics on that port, with the live gauges read from the ledger and Redis.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import logs
from .config import load_config
from .errors import ConfigError, InfrastructureError

if TYPE_CHECKING:
    import dramatiq

    from .engine import Engine

__all__ = ["metrics_environment", "serve_metrics", "setup", "wipe_metrics"]

log = logging.getLogger("smartpush.workerboot")

#: Set by ``smartpush worker --metrics-port`` for its processes: the port :func:`serve_metrics` serves.
PORT_ENV = "SMARTPUSH_METRICS_PORT"
#: The address it listens on: Dramatiq's own setting, and Dramatiq's default (every interface).
HOST_ENV = "dramatiq_prom_host"
DEFAULT_HOST = "0.0.0.0"  # Prometheus scrapes workers from another host; no personal data in metrics
#: Dramatiq's settings: its metrics folder (read when its middleware is imported) and its port.
DRAMATIQ_DB_ENV = "dramatiq_prom_db"
DRAMATIQ_PORT_ENV = "dramatiq_prom_port"
#: prometheus-client's deprecated spelling of PROMETHEUS_MULTIPROC_DIR, still honoured by it.
OLD_DIR_ENV = "prometheus_multiproc_dir"
#: prometheus-client's files in a multiprocess folder: ``counter_123.db``, ``gauge_livesum_123.db``…
_METRICS_FILE = re.compile(r"_(\d+)\.db$")

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
    from .engine import Engine

    ENGINE = Engine(config)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        ENGINE.broker.add_middleware(_prometheus())
    ENGINE.start_sweeper()
    ENGINE.rt.warm_up()


# -- metrics --------------------------------------------------------------------------------------------


def metrics_environment(port: int | None) -> Path | None:
    """In the parent ``smartpush worker`` process, before its worker processes start and before
    anything imports ``prometheus_client``: the multiprocess folder, emptied and exported.

    The folder is ``PROMETHEUS_MULTIPROC_DIR`` (or ``dramatiq_prom_db``; both must then name the same
    one); with neither set, ``--metrics-port`` makes a private temporary one, removed when this process
    exits, and returns it. Without a folder and without a port, workers keep no metrics: returns None
    and changes nothing. With a port, checks first that it is free (else InfrastructureError).
    """
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(OLD_DIR_ENV)
    dramatiq_db = os.environ.get(DRAMATIQ_DB_ENV)
    if folder and dramatiq_db and os.path.realpath(folder) != os.path.realpath(dramatiq_db):
        raise ConfigError(
            f"PROMETHEUS_MULTIPROC_DIR ({folder}) and dramatiq_prom_db ({dramatiq_db}) name different "
            "folders: Dramatiq's metrics would be missing from the workers' metrics; set one of them, or "
            "both to the same folder"
        )
    folder = folder or dramatiq_db
    if not folder and port is None:
        return None
    if port is not None:
        _check_port(os.environ.get(HOST_ENV) or DEFAULT_HOST, port)
    made: Path | None = None
    if not folder:  # removed when this process exits; forked processes never run atexit handlers
        made = Path(tempfile.mkdtemp(prefix="smartpush-metrics-"))
        atexit.register(shutil.rmtree, made, True)
        folder = str(made)
    wipe_metrics(Path(folder))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[DRAMATIQ_DB_ENV] = folder
    os.environ.pop(OLD_DIR_ENV, None)  # prometheus-client warns about it
    if port is not None:
        os.environ[PORT_ENV] = os.environ[DRAMATIQ_PORT_ENV] = str(port)
    return made


def wipe_metrics(folder: Path) -> int:
    """Remove the metrics files of processes that are gone (counters of dead processes are otherwise
    summed for ever); the files of running processes (a ``serve`` sharing the folder) stay. Only
    prometheus-client's ``*.db`` files are touched. Returns how many were removed."""
    folder.mkdir(parents=True, exist_ok=True)
    removed = 0
    for path in folder.glob("*.db"):
        found = _METRICS_FILE.search(path.name)
        if found is not None and _alive(int(found[1])):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _check_port(host: str, port: int) -> None:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        taken = exc.errno == errno.EADDRINUSE
        hint = "; another program uses it: pick another --metrics-port" if taken else ""
        detail = f"{exc.strerror or exc}{hint}"
        raise InfrastructureError(f"cannot serve metrics on {host}:{port}: {detail}") from None


def _prometheus() -> dramatiq.Middleware:
    """Dramatiq's Prometheus middleware (``dramatiq_*`` metrics, written to ``dramatiq_prom_db``),
    with :func:`serve_metrics` instead of Dramatiq's own exposition server when a port is set."""
    from dramatiq.middleware import prometheus

    from .metrics import multiprocess

    if not multiprocess() or os.path.realpath(prometheus.DB_PATH) != os.path.realpath(
        os.environ["PROMETHEUS_MULTIPROC_DIR"]
    ):
        log.error(
            "this worker process's metrics will be missing: prometheus_client was imported before "
            "PROMETHEUS_MULTIPROC_DIR was set, or dramatiq_prom_db names another folder"
        )

    class WorkerPrometheus(prometheus.Prometheus):
        @property
        def forks(self) -> list[Callable[[], int]]:
            return [serve_metrics] if os.environ.get(PORT_ENV) else []

    middleware: dramatiq.Middleware = WorkerPrometheus()
    return middleware


def serve_metrics() -> int:
    """The process Dramatiq forks for ``smartpush worker --metrics-port``: ``/metrics`` on that port.

    Every worker process's metrics (smartpush's and Dramatiq's, from the multiprocess folder) and the
    live gauges (runs in progress from the ledger, queue lengths from Redis), read at each scrape.
    """
    from prometheus_client import start_http_server

    from .ledger import Ledger
    from .metrics import endpoint_registry
    from .runtime import database_url

    path = os.environ.get("SMARTPUSH_CONFIG") or None
    config = load_config(Path(path) if path else None)
    registry = endpoint_registry(Ledger(database_url(config)), config.settings.broker)
    host, port = os.environ.get(HOST_ENV) or DEFAULT_HOST, int(os.environ[PORT_ENV])
    start_http_server(port, host, registry)
    log.info("metrics served on %s:%d/metrics", host, port)
    while True:  # the server runs in a thread; Dramatiq stops this process with SIGTERM
        time.sleep(3600)
