"""Process faults during a 20,000-message distributed run (issue 10, part 1).

Real ``smartpush worker`` processes, a Redis broker and a PostgreSQL ledger of this module's own (see
chaoslib), a webhook SMS account pointed at a local provider that honours ``Idempotency-Key`` and
counts what it delivers. Each scenario breaks one thing in the middle of the run, then checks what a
user would: every message in a final status, counts adding up (one message per recipient, all of them
``sent``), and each message delivered by the provider exactly once. The figures of the at-least-once
window (requests the provider saw again for an already-delivered message, and answered without a
second delivery because it honours the key) are printed, and bounded.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chaoslib import (
    SMARTPUSH,
    PrivatePostgres,
    PrivateRedis,
    Workers,
    assert_exactly_once,
    launch,
    make_project,
    private_postgres,
    private_redis,
    run_finished,
    send,
    services_available,
    snapshot_sent,
    wait_for,
)

from smartpush.ledger import Ledger, Status
from smartpush.testing import FakeProviderServer

__all__ = ["private_postgres", "private_redis"]  # fixtures, used by name

pytestmark = pytest.mark.skipif(
    not services_available(), reason="needs redis-server, initdb/pg_ctl and root (to run them as postgres)"
)

ROWS = 20_000
#: Requests in flight per worker process (the account's ``concurrency``).
CONCURRENCY = 50
#: The provider's answer time: requests are in flight when a fault strikes.
LATENCY_S = 0.01
#: The most messages one kill -9 may leave ambiguous (handed to the provider, not yet recorded): the
#: requests in flight plus about RECORD_EVERY_S of answers (~2,000/s here), with room for a slow moment.
KILL_WINDOW = 2 * CONCURRENCY + 100


class Chaos:
    """One scenario's world: a fresh database and Redis, a sink, a project, workers, a ledger."""

    def __init__(self, folder: Path, redis: PrivateRedis, database: str, sink: FakeProviderServer) -> None:
        self.folder = folder
        self.redis = redis
        self.database = database
        self.sink = sink
        self.config = make_project(
            folder,
            ROWS,
            broker=redis.url,
            database=database,
            account=f"base_url: {sink.url}\n    concurrency: {CONCURRENCY}\n    timeout: 5s",
        )
        self.workers = Workers(self.config)
        self.ledger = Ledger(database)
        self.ledger.migrate()

    def sent(self, run_id: str) -> int:
        counts = self.ledger.counts(run_id)
        return counts.get(("sms", Status.SENT), 0)


@pytest.fixture
def chaos(tmp_path: Path, private_redis: PrivateRedis, private_postgres: PrivatePostgres) -> Iterator[Chaos]:
    if not private_redis.ping():  # a scenario before may have left it down
        private_redis.start()
    private_redis.flush()
    database = private_postgres.create_database(f"chaos_{secrets.token_hex(4)}")
    with FakeProviderServer(delay_s=LATENCY_S, idempotent=True) as sink:
        world = Chaos(tmp_path, private_redis, database, sink)
        try:
            yield world
        finally:
            world.workers.stop_all()
            world.ledger.close()


def _report(name: str, figures: dict[str, int], took: float) -> None:
    print(f"\n[chaos] {name}: {ROWS} messages in {took:.1f} s; {figures}")


def test_kill_9_a_worker_twice(chaos: Chaos) -> None:
    rng = random.Random()
    for _ in range(3):
        chaos.workers.start()
    began = time.monotonic()
    run_id = launch(chaos.folder, "kill-9")
    sent_before: list[dict[str, int]] = []
    for _ in range(2):  # at a random point of the run, a random worker
        target = rng.randint(int(ROWS * 0.1), int(ROWS * 0.45)) + chaos.sent(run_id)
        wait_for(lambda t=target: chaos.sent(run_id) >= min(t, ROWS - 2000), 120, "sending to progress")
        chaos.workers.kill(rng.choice(chaos.workers.alive()))
        sent_before.append(snapshot_sent(chaos.ledger, run_id, chaos.sink))
        chaos.workers.start()  # a replacement, as systemd or Kubernetes would start one
    wait_for(lambda: run_finished(chaos.ledger, run_id), 180, "the run to finish")
    # The killed workers' messages in flight went out again, with the same key: each kill may repeat
    # what one worker process has in flight (CONCURRENCY) and what it received in the last moments
    # before its results were written (RECORD_EVERY_S). Recording only at the end of each 200-message
    # batch repeated ~800 a kill.
    figures = assert_exactly_once(
        chaos.ledger, run_id, ROWS, chaos.sink, sent_before, max_replayed=2 * KILL_WINDOW
    )
    _report("kill -9 a worker twice", figures, time.monotonic() - began)


def test_redis_crashes_and_restarts_with_its_aof(chaos: Chaos) -> None:
    for _ in range(2):
        chaos.workers.start()
    began = time.monotonic()
    run_id = launch(chaos.folder, "redis-restart")
    wait_for(lambda: chaos.sent(run_id) >= ROWS // 4, 120, "a quarter of the run sent")
    chaos.redis.crash()  # SIGKILL: the last second of writes may be lost (appendfsync everysec)
    sent_before = [snapshot_sent(chaos.ledger, run_id, chaos.sink)]
    time.sleep(2.0)
    chaos.redis.start()  # same folder, same port: the queues come back from the AOF
    wait_for(lambda: run_finished(chaos.ledger, run_id), 180, "the run to finish")
    assert all(p.poll() is None for p in chaos.workers.procs), "a worker died with Redis"
    figures = assert_exactly_once(chaos.ledger, run_id, ROWS, chaos.sink, sent_before)
    _report("Redis crash and restart", figures, time.monotonic() - began)


def test_postgresql_crashes_and_restarts(chaos: Chaos, private_postgres: PrivatePostgres) -> None:
    # A message is declared stuck only after an outage could have ended: results held by a worker
    # while the database is away are written when it is back, not raced by the sweeper's resend.
    text = chaos.config.read_text(encoding="utf-8")
    chaos.config.write_text(text.replace("stuck_after: 3s", "stuck_after: 20s"), encoding="utf-8")
    for _ in range(2):
        chaos.workers.start()
    began = time.monotonic()
    run_id = launch(chaos.folder, "pg-restart")
    wait_for(lambda: chaos.sent(run_id) >= ROWS // 4, 120, "a quarter of the run sent")
    sent_before = [snapshot_sent(chaos.ledger, run_id, chaos.sink)]
    private_postgres.crash()  # every connection dropped mid-transaction, no checkpoint
    time.sleep(2.0)
    private_postgres.start()
    wait_for(lambda: run_finished(chaos.ledger, run_id), 180, "the run to finish")
    assert all(p.poll() is None for p in chaos.workers.procs), "a worker died with PostgreSQL"
    figures = assert_exactly_once(chaos.ledger, run_id, ROWS, chaos.sink, sent_before)
    _report("PostgreSQL crash and restart", figures, time.monotonic() - began)


def test_the_launcher_is_killed_mid_split_and_relaunched_with_its_key(chaos: Chaos) -> None:
    for _ in range(2):
        chaos.workers.start()
    began = time.monotonic()
    launcher = subprocess.Popen(
        [SMARTPUSH, "send", "c.yaml", "--yes", "--detach", "--json", "--key", "split-1"],
        cwd=chaos.folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def splitting() -> bool:
            runs = chaos.ledger.list_runs()
            return bool(runs) and runs[0].recipients >= 2000

        wait_for(splitting, 60, "the split to store its first segments", every=0.02)
        assert launcher.poll() is None, "the launch ended before it could be killed"
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    (cut,) = chaos.ledger.list_runs()
    assert not cut.split_complete and cut.recipients < ROWS, "the launcher was not killed mid-split"
    relaunched = send(chaos.folder, "split-1")
    assert relaunched.returncode == 0, relaunched.stderr[-2000:]
    run_id = json.loads(relaunched.stdout)["run_id"]
    assert run_id == cut.id  # same key, same run: resumed, not started again
    wait_for(lambda: run_finished(chaos.ledger, run_id), 180, "the run to finish")
    assert len(chaos.ledger.list_runs()) == 1
    figures = assert_exactly_once(chaos.ledger, run_id, ROWS, chaos.sink)
    _report(f"launcher killed at {cut.recipients} recipients, relaunched", figures, time.monotonic() - began)
