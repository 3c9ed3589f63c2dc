"""Body of ``smartpush serve``: the HTTP server (uvicorn, one process) for the app in smartpush.serve."""

from __future__ import annotations

import contextlib
import errno
import json
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import uvicorn

from smartpush.config import Config, load_config
from smartpush.errors import InfrastructureError
from smartpush.ledger import Ledger

from . import output
from .commands import reporting
from .main import EXIT_INFRASTRUCTURE

if TYPE_CHECKING:
    from .main import State

#: Seconds requests in progress get to finish once a stop is asked for.
GRACEFUL_S = 10


class _Server(uvicorn.Server):
    """uvicorn's server, with a start-up callback and a plain stop on SIGINT/SIGTERM.

    uvicorn raises a captured SIGINT/SIGTERM again once it has shut down (the process then dies of it);
    a service stopped on purpose should exit 0 instead. A failed start-up (uvicorn's ``sys.exit(3)``)
    is noted, for our own exit code: 3 means "some messages failed" here.
    """

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_ready = on_ready
        self.failed = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        except SystemExit:
            self.failed = self.should_exit = True
            return
        if self.started:
            self.on_ready()


def _ledger(config: Config) -> Ledger:
    from smartpush.runtime import open_ledger

    return open_ledger(config)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or an error that says what to do."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise InfrastructureError(f"cannot listen on {host}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = "; another program uses it: pick another --port" if exc.errno == errno.EADDRINUSE else ""
        raise InfrastructureError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _configure_logging() -> None:
    """Our lines and uvicorn's on standard error, as JSON lines unless it is a terminal
    (smartpush.logs); other libraries only from warnings up."""
    from smartpush import logs

    logs.configure("INFO")


def serve(state: State, host: str, port: int) -> None:
    from smartpush.serve import create_app

    with reporting(state):
        _configure_logging()  # first: a bad SMARTPUSH_LOG_LEVEL is reported like any config error
        config = load_config(state.config)
        if not state.json:
            output.warnings(config.warnings)
        ledger = _ledger(config)
        sock = _listen(host, port)
        app = create_app(config, ledger=ledger)
    url = _url(sock)

    def ready() -> None:
        if state.json:  # one line, so a supervisor can read it while the server runs
            started = {"ok": True, "url": url, "public_url": config.settings.public_url}
            sys.stdout.write(json.dumps(started) + "\n")
            sys.stdout.flush()
        else:
            output.err.print(f"smartpush serve: listening on {url} (Ctrl-C or SIGTERM stops it)")

    server = _Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=False,  # uvicorn's prints paths, and paths carry tokens: RequestLimits logs instead
            server_header=False,
            proxy_headers=False,
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_S,
        ),
        on_ready=ready,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        ledger.close()
    if server.failed:
        output.err.print("smartpush serve: the server did not start (see the log above).")
        raise SystemExit(EXIT_INFRASTRUCTURE)
