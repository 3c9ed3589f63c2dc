"""The chaos suite's machinery: private Redis and PostgreSQL servers, worker processes, a project.

Every scenario runs against servers of its own: a ``redis-server`` with AOF on (as ``deploy/`` ships it)
and a PostgreSQL cluster made by ``initdb``, each on a free port under a temporary folder, so that
restarting them never disturbs the shared servers other tests use. Everything started here is stopped
by the fixture that started it, process group and all.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import psycopg
import pytest

from smartpush.ledger import FINAL, Ledger, MessageRecord, Status
from smartpush.testing import FakeProviderServer

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
PG_BIN = Path(shutil.which("initdb") or "/usr/local/bin/initdb").parent
SMARTPUSH = str(Path(sys.executable).parent / "smartpush")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait_s: float = 15) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- Redis -----------------------------------------------------------------------------------------


class PrivateRedis:
    """A ``redis-server`` of our own: AOF on, ``appendfsync everysec``, data in a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)),
                *("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
                *("--daemonize", "no", "--protected-mode", "no"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for(self.ping, 20, "the private Redis to answer")

    def ping(self) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def flush(self) -> None:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        try:
            client.flushall()
        finally:
            client.close()

    def crash(self) -> None:
        """SIGKILL: what was written in the last second may be lost (``appendfsync everysec``)."""
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc, signal.SIGTERM)


@pytest.fixture(scope="session")
def private_redis() -> Iterator[PrivateRedis]:
    folder = Path(tempfile.mkdtemp(prefix="sp-chaos-redis-"))
    server = PrivateRedis(folder)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


# -- PostgreSQL ------------------------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL cluster of our own, run as the ``postgres`` user, trust auth on 127.0.0.1."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.port = free_port()

    @property
    def base(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def _as_postgres(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            start_new_session=True,
        )

    def init(self) -> None:
        user = pwd.getpwnam("postgres")
        os.chown(self.folder, user.pw_uid, user.pw_gid)
        self._as_postgres(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
        )

    def start(self) -> None:
        # fsync off is safe here: only the server process crashes, never the machine. Commits stay
        # synchronous: a crash must not lose a transaction the client was told had committed.
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._as_postgres(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "pg.log"), "-o", options,
            "-w", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def crash(self) -> None:
        """``pg_ctl stop -m immediate``: every connection dropped, no checkpoint (a crash restart)."""
        self.stop("immediate")

    def create_database(self, name: str) -> str:
        with psycopg.connect(f"{self.base}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"{self.base}/{name}"


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    folder = Path(tempfile.mkdtemp(prefix="sp-chaos-pg-"))
    server = PrivatePostgres(folder)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


def services_available() -> bool:
    return Path(REDIS_SERVER).exists() and (PG_BIN / "initdb").exists() and _has_postgres_user()


def _has_postgres_user() -> bool:
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return os.geteuid() == 0 and shutil.which("runuser") is not None


# -- workers and the project -----------------------------------------------------------------------


class Workers:
    """``smartpush worker`` processes, each in a session of its own so a kill takes its children."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []

    def start(self, threads: int = 4) -> subprocess.Popen[bytes]:
        log = (self.config.parent / f"worker{len(self.procs)}.log").open("wb")
        self.logs.append(log)
        proc = subprocess.Popen(
            [
                SMARTPUSH,
                "worker",
                "--config",
                str(self.config),
                "--processes",
                "1",
                "--threads",
                str(threads),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "SMARTPUSH_LOG_FORMAT": "text"},
        )
        self.procs.append(proc)
        return proc

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL to the worker's whole process group: no goodbye, no acknowledgement."""
        _stop_group(proc, signal.SIGKILL)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            _stop_group(proc, signal.SIGTERM, wait_s=20)
        for log in self.logs:
            log.close()


def make_project(
    folder: Path,
    rows: int,
    *,
    broker: str,
    database: str,
    account: str,
    campaign: str = "",
    settings: str = "stuck_after: 3s\nsweep_every: 1s\n",
) -> Path:
    """smartpush.yaml with one webhook SMS account ``sms``, an audience of ``rows``, ``c.yaml``."""
    config = folder / "smartpush.yaml"
    config.write_text(
        f"broker: {broker}\ndatabase: {database}\n{settings}"
        f"providers:\n  sms:\n    type: webhook\n    sender: MAIRIE\n    {account}\n",
        encoding="utf-8",
    )
    (folder / "people.csv").write_text(
        "id;phone\n" + "".join(f"{i};06{i:08d}\n" for i in range(rows)), encoding="utf-8"
    )
    (folder / "c.yaml").write_text(
        f"name: chaos\ncategory: service\n{campaign}audience: {{source: people.csv, id: id}}\n"
        "segments: {size: 500}\nchannels:\n  - {channel: sms, provider: sms, body: Alerte test.}\n"
        "retry: {max_attempts: 6, backoff: {min: 200ms, max: 2s}}\n",
        encoding="utf-8",
    )
    return config


def send(folder: Path, key: str, *, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SMARTPUSH, "send", "c.yaml", "--yes", "--detach", "--json", "--key", key],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def launch(folder: Path, key: str) -> str:
    done = send(folder, key)
    assert done.returncode == 0, done.stderr[-2000:]
    return str(json.loads(done.stdout)["run_id"])


# -- what a user checks afterwards -----------------------------------------------------------------


def run_finished(ledger: Ledger, run_id: str) -> bool:
    run = ledger.get_run(run_id)
    return run is not None and run.state.value == "finished"


def sent_ids(ledger: Ledger, run_id: str) -> set[str]:
    return {m.id for m in ledger.messages(run_id, statuses=[Status.SENT])}


def all_messages(ledger: Ledger, run_id: str) -> list[MessageRecord]:
    return list(ledger.messages(run_id))


def snapshot_sent(ledger: Ledger, run_id: str, sink: FakeProviderServer) -> dict[str, int]:
    """The messages recorded ``sent`` now, with how many requests the provider has seen for each.

    The ledger first: a message sent then was requested before; reading the provider first would count
    a message sent in between with none."""
    sent = sent_ids(ledger, run_id)
    requested = sink.requests_per_key()
    return {mid: requested[mid] for mid in sent}


def assert_exactly_once(
    ledger: Ledger,
    run_id: str,
    rows: int,
    sink: FakeProviderServer,
    sent_before: list[dict[str, int]] | None = None,
    *,
    max_replayed: int = 0,
) -> dict[str, int]:
    """Every message final and sent, counts add up, each delivered exactly once, at most
    ``max_replayed`` requests repeated (what a provider ignoring the key would have sent twice)."""
    messages = all_messages(ledger, run_id)
    assert len(messages) == rows, f"{len(messages)} messages for {rows} recipients"
    assert len({m.recipient_id for m in messages}) == rows  # one message per recipient, none twice
    statuses = Counter(m.status for m in messages)
    assert all(s in FINAL for s in statuses), statuses
    assert statuses == {Status.SENT: rows}, statuses
    run = ledger.get_run(run_id)
    assert run is not None and run.recipients == rows and run.split_complete
    delivered = sink.delivered_per_key()
    ids = {m.id for m in messages}
    assert set(delivered) == ids, "a sent message never reached the provider, or a stranger did"
    twice = {k: n for k, n in delivered.items() if n != 1}
    assert not twice, f"{len(twice)} messages delivered more than once"
    requested = sink.requests_per_key()
    for snapshot in sent_before or []:  # recorded `sent` means never requested again, not even replayed
        again = [mid for mid, n in snapshot.items() if requested[mid] != n]
        assert not again, f"{len(again)} messages recorded sent were requested again"
    figures = {
        "requests": sum(requested.values()),
        "replayed": sum(sink.replayed_per_key().values()),
        "attempts_over_1": sum(m.attempts - 1 for m in messages),
    }
    print(f"[chaos] {figures}")  # the at-least-once window's figures, for docs/reliability.md
    assert figures["replayed"] <= max_replayed, figures
    return figures
