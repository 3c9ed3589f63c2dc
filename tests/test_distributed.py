"""Distributed mode on real servers: Redis broker, PostgreSQL ledger, `smartpush worker` processes.

A worker is killed with SIGKILL in the middle of a run; another one takes over. Every message must end
final, the counts must add up, and no message that was already `sent` may be sent again.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import psycopg
import pytest
from conftest import smartpush_exe

from smartpush.ledger import Ledger, Status
from smartpush.testing import FakeProviderServer

PG = "postgresql://postgres@127.0.0.1:5432"
REDIS_DB = 9


def _services_up() -> bool:
    try:
        with psycopg.connect(f"{PG}/test", connect_timeout=3):
            pass
        import redis

        return bool(redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=3).ping())
    except Exception:
        return False


pytestmark = pytest.mark.skipif(
    not _services_up(), reason="needs Redis and PostgreSQL on 127.0.0.1 (.ci/run starts them)"
)


@pytest.fixture
def database() -> Iterator[str]:
    name = f"sp_dist_{secrets.token_hex(4)}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{PG}/{name}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def redis_url() -> str:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    return f"redis://127.0.0.1:6379/{REDIS_DB}"


class Workers:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []

    def start(self, threads: int = 4) -> subprocess.Popen[bytes]:
        log = (self.config.parent / f"worker{len(self.procs)}.log").open("wb")
        self.logs.append(log)
        proc = subprocess.Popen(
            [
                smartpush_exe(),
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
        )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole worker: main and child processes, no goodbye
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in self.logs:
            log.close()


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def make_project(tmp_path: Path, rows: int, settings: str, account: str, campaign: str = "") -> Path:
    """smartpush.yaml (``settings`` + one webhook SMS account), an audience of ``rows``, c.yaml."""
    config = tmp_path / "smartpush.yaml"
    config.write_text(
        f"{settings}providers:\n  sms:\n    type: webhook\n    sender: MAIRIE\n    {account}\n",
        encoding="utf-8",
    )
    (tmp_path / "people.csv").write_text(
        "id;phone\n" + "".join(f"{i};061{i:07d}\n" for i in range(rows)), encoding="utf-8"
    )
    (tmp_path / "c.yaml").write_text(
        f"name: alerte\ncategory: service\n{campaign}audience: {{source: people.csv, id: id}}\n"
        "segments: {size: 100}\nchannels:\n  - {channel: sms, provider: sms, body: Alerte test.}\n",
        encoding="utf-8",
    )
    return config


def test_kill_a_worker_mid_run(tmp_path: Path, database: str, redis_url: str) -> None:
    rows = 3000
    with FakeProviderServer(delay_s=0.02) as server:
        config = make_project(
            tmp_path,
            rows,
            f"broker: {redis_url}\ndatabase: {database}\nstuck_after: 3s\nsweep_every: 1s\n",
            f"base_url: {server.url}\n    concurrency: 20",
            "priority: urgent\n",
        )
        workers = Workers(config)
        try:
            first = workers.start()
            workers.start()
            launched = subprocess.run(
                [smartpush_exe(), "send", "c.yaml", "--yes", "--detach", "--json", "--key", "alerte-1"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert launched.returncode == 0, launched.stderr
            run_id = json.loads(launched.stdout)["run_id"]
            ledger = Ledger(database)

            def sent() -> set[str]:
                return {m.id for m in ledger.messages(run_id, statuses=[Status.SENT])}

            wait_for(lambda: len(sent()) >= 500, 60, "500 messages sent")
            workers.kill(first)
            sent_before_kill = sent()
            workers.start()  # a replacement, as systemd or Kubernetes would start one
            wait_for(lambda: ledger.get_run(run_id).state.value == "finished", 180, "the run to finish")

            # pause and resume take effect on a finished run as refusals, not as changes
            paused = subprocess.run(
                [smartpush_exe(), "pause", run_id, "--config", str(config)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert paused.returncode == 1

            counts = ledger.counts(run_id)
            assert counts == {("sms", Status.SENT): rows}  # every message final, counts add up
            per_key = server.accepted_per_key()
            assert len(per_key) == rows
            assert all(per_key[mid] == 1 for mid in sent_before_kill)  # sent means never sent again
            repeats = sum(n - 1 for n in per_key.values())
            # At-least-once: only messages in flight in the killed worker may be repeated, with the same
            # idempotency key (providers that honour it drop the repeat).
            assert repeats <= 4 * 200
            again = subprocess.run(
                [smartpush_exe(), "send", "c.yaml", "--yes", "--detach", "--json", "--key", "alerte-1"],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert json.loads(again.stdout)["run_id"] == run_id  # same key, same run
            ledger.close()
        finally:
            workers.stop_all()


def test_pause_resume_cancel_across_processes(tmp_path: Path, database: str, redis_url: str) -> None:
    rows = 2000
    with FakeProviderServer(delay_s=0.005) as server:
        config = make_project(
            tmp_path,
            rows,
            f"broker: {redis_url}\ndatabase: {database}\n",
            f"base_url: {server.url}\n    rate: 200/s",
        )

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [smartpush_exe(), *args, "--config", str(config)],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        workers = Workers(config)
        try:
            workers.start()
            launched = cli("send", "c.yaml", "--yes", "--detach", "--json")
            assert launched.returncode == 0, launched.stderr
            run_id = json.loads(launched.stdout)["run_id"]
            ledger = Ledger(database)
            wait_for(lambda: len(server.requests) >= 200, 30, "200 messages sent")

            assert cli("pause", run_id).returncode == 0
            time.sleep(1.5)  # in-flight sends finish; the pause reaches the worker within a second
            frozen = len(server.requests)
            time.sleep(2.0)
            assert len(server.requests) == frozen < rows
            status = json.loads(cli("status", run_id, "--json").stdout)
            assert status["state"] == "paused"

            assert cli("resume", run_id).returncode == 0
            wait_for(lambda: len(server.requests) >= frozen + 200, 30, "sending to resume")
            running = json.loads(cli("status", run_id, "--json").stdout)
            assert running["state"] == "running"
            assert running["rate_per_s"] > 0 and running["eta_s"] >= 0  # pace and time left while it runs
            cancelled = cli("cancel", run_id)
            assert cancelled.returncode == 0
            time.sleep(2.0)
            counts = {s.value: n for (_, s), n in ledger.counts(run_id).items()}
            assert set(counts) == {"sent", "cancelled"}
            assert counts["sent"] + counts["cancelled"] == rows  # nothing lost
            assert counts["sent"] == len(server.accepted_per_key())
            assert max(server.accepted_per_key().values()) == 1  # nothing sent twice
            assert json.loads(cli("status", run_id, "--json").stdout)["state"] == "cancelled"
            ledger.close()
        finally:
            workers.stop_all()
