"""Priorities: an urgent campaign is not held up by a bulk run that fills every worker thread.

A bulk run keeps every worker thread busy with segments longer than what is left of it; then an
urgent campaign of a few recipients is launched on another provider account. Its messages must all be
sent while the bulk run is still far from done: without priorities they would wait for a bulk segment
to finish or to use up its 30 s slice. Embedded (stub broker, SQLite, one thread) and on real servers
(two `smartpush worker` processes, Redis broker, PostgreSQL ledger).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import smartpush_exe
from servers import flushed_redis, needs_services, throwaway_database
from test_distributed import Workers, wait_for

from smartpush.config import load_config
from smartpush.engine import Engine
from smartpush.launch import launch
from smartpush.ledger import Ledger, Status
from smartpush.loading import load_campaign
from smartpush.queueing import ACTOR_PRIORITY, Backlog
from smartpush.testing import FakeProviderServer

REDIS_DB = 12  # tests/test_distributed.py uses 9, the benchmarks 10

#: The bulk run: 4 segments of 4,000 for the 4 worker threads; at about 100 messages/s a thread
#: (concurrency 10 a process, 50 ms a request) each segment outlasts its 30 s slice.
BULK_ROWS = 16_000
BULK_SEGMENT = 4_000
URGENT_ROWS = 5


needs_servers = needs_services(REDIS_DB)


@pytest.fixture
def database() -> Iterator[str]:
    with throwaway_database("sp_prio") as url:
        yield url


@pytest.fixture
def redis_url() -> Iterator[str]:
    with flushed_redis(REDIS_DB) as url:
        yield url


def _project(
    root: Path,
    settings: str,
    bulk_url: str,
    urgent_url: str,
    *,
    bulk_rows: int,
    bulk_segment: int,
    priorities: tuple[str, str] = ("bulk", "urgent"),
    bulk_rate: str | None = None,
) -> Path:
    """smartpush.yaml (``settings`` + a slow bulk account, an alert account), bulk.yaml, urgent.yaml.

    ``priorities``: those of bulk.yaml and urgent.yaml.
    """
    config = root / "smartpush.yaml"
    config.write_text(
        f"{settings}providers:\n"
        f"  bulk-sms:\n    type: webhook\n    sender: MAIRIE\n    base_url: {bulk_url}\n    concurrency: 10\n"
        + (f"    rate: {bulk_rate}\n" if bulk_rate else "")
        + f"  alert-sms:\n    type: webhook\n    sender: PREFET\n    base_url: {urgent_url}\n",
        encoding="utf-8",
    )
    for name, rows, segment, account, priority in (
        ("bulk", bulk_rows, bulk_segment, "bulk-sms", priorities[0]),
        ("urgent", URGENT_ROWS, 100, "alert-sms", priorities[1]),
    ):
        (root / f"{name}.csv").write_text(
            "id;phone\n" + "".join(f"{i};061{i:07d}\n" for i in range(rows)), encoding="utf-8"
        )
        (root / f"{name}.yaml").write_text(
            f"name: {name}\ncategory: service\npriority: {priority}\n"
            f"audience: {{source: {name}.csv, id: id}}\nsegments: {{size: {segment}}}\n"
            f"channels:\n  - {{channel: sms, provider: {account}, body: Message {name}.}}\n",
            encoding="utf-8",
        )
    return config


def _report(
    capsys: pytest.CaptureFixture[str],
    where: str,
    first_s: float,
    done_s: float,
    bulk: str,
    priorities: tuple[str, str] = ("bulk", "urgent"),
) -> None:
    low, high = priorities
    with capsys.disabled():
        print(
            f"\n{where}: the {high} run's first message at the provider {first_s:.2f} s after its launch, "
            f"all {URGENT_ROWS} sent after {done_s:.2f} s; the {low} run had then sent {bulk}"
        )


def test_actor_priorities_follow_campaign_priorities() -> None:
    assert ACTOR_PRIORITY["urgent"] < ACTOR_PRIORITY["normal"] < ACTOR_PRIORITY["bulk"]


def test_nothing_waits_outside_a_worker() -> None:
    from dramatiq.brokers.stub import StubBroker

    backlog = Backlog(StubBroker())
    assert not any(backlog.waiting_before(priority) for priority in ACTOR_PRIORITY)


@pytest.mark.parametrize(("low", "high"), [("bulk", "urgent"), ("bulk", "normal"), ("normal", "urgent")])
def test_embedded_higher_priority_overtakes_a_running_segment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], low: str, high: str
) -> None:
    rows = 2_000  # one segment, about 4 s at 10 requests of 20 ms in flight: 10 batches of 200
    with FakeProviderServer(delay_s=0.02) as bulk_server, FakeProviderServer() as urgent_server:
        config = load_config(
            _project(
                tmp_path,
                f"database: sqlite:///{tmp_path / 'ledger.db'}\n",
                bulk_server.url,
                urgent_server.url,
                bulk_rows=rows,
                bulk_segment=rows,
                priorities=(low, high),
            ),
            env={},
        )
        engine = Engine(config)
        worker = engine.worker(threads=1)  # one thread, and the bulk segment holds it
        try:
            ledger = engine.rt.ledger
            bulk = launch(engine.rt, load_campaign(tmp_path / "bulk.yaml", config), enqueue=engine.enqueue)
            wait_for(lambda: len(bulk_server.requests) >= 200, 30, "the bulk run to be sending")
            launched_at = time.monotonic()
            urgent = launch(
                engine.rt, load_campaign(tmp_path / "urgent.yaml", config), enqueue=engine.enqueue
            )
            wait_for(
                lambda: ledger.counts(urgent.run.id).get(("sms", Status.SENT), 0) == URGENT_ROWS,
                30,
                "the urgent run to be sent",
            )
            done = time.monotonic() - launched_at
            bulk_sent = ledger.counts(bulk.run.id).get(("sms", Status.SENT), 0)
            first = min(r.received_at for r in urgent_server.requests) - launched_at
            _report(capsys, "embedded", first, done, f"{bulk_sent:,}/{rows:,}", (low, high))
            assert bulk_sent < rows // 2  # without priorities: all of it, the segment holds the thread
            wait_for(lambda: ledger.counts(bulk.run.id) == {("sms", Status.SENT): rows}, 60, "the bulk run")
            assert max(bulk_server.requests_per_key().values()) == 1  # yielding sends nothing twice
        finally:
            worker.stop()
            engine.close()


def test_a_bulk_batch_held_by_a_slow_rate_hands_its_thread_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = 400  # one segment on an account at 50/s: a batch of 200 takes 4 s
    with FakeProviderServer() as bulk_server, FakeProviderServer() as urgent_server:
        config = load_config(
            _project(
                tmp_path,
                f"database: sqlite:///{tmp_path / 'ledger.db'}\n",
                bulk_server.url,
                urgent_server.url,
                bulk_rows=rows,
                bulk_segment=rows,
                bulk_rate="50/s",
            ),
            env={},
        )
        engine = Engine(config)
        worker = engine.worker(threads=1)
        try:
            ledger = engine.rt.ledger
            bulk = launch(engine.rt, load_campaign(tmp_path / "bulk.yaml", config), enqueue=engine.enqueue)
            wait_for(lambda: len(bulk_server.requests) >= 20, 30, "the bulk run to be sending")
            launched_at = time.monotonic()
            urgent = launch(
                engine.rt, load_campaign(tmp_path / "urgent.yaml", config), enqueue=engine.enqueue
            )
            wait_for(
                lambda: ledger.counts(urgent.run.id).get(("sms", Status.SENT), 0) == URGENT_ROWS,
                30,
                "the urgent run to be sent",
            )
            done = time.monotonic() - launched_at
            bulk_sent = len(bulk_server.requests)
            first = min(r.received_at for r in urgent_server.requests) - launched_at
            _report(capsys, "embedded, bulk at 50/s", first, done, f"{bulk_sent:,}/{rows:,}")
            assert bulk_sent < 200  # the first bulk batch gave its places up, it did not run to its end
            wait_for(lambda: ledger.counts(bulk.run.id) == {("sms", Status.SENT): rows}, 60, "the bulk run")
            assert max(bulk_server.requests_per_key().values()) == 1  # handed back, then sent once
        finally:
            worker.stop()
            engine.close()


def _send(root: Path, campaign: str) -> str:
    launched = subprocess.run(
        [smartpush_exe(), "send", campaign, "--yes", "--detach", "--json"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert launched.returncode == 0, launched.stderr
    return str(json.loads(launched.stdout)["run_id"])


@needs_servers
def test_urgent_overtakes_a_bulk_run_on_every_worker(
    tmp_path: Path, database: str, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeProviderServer(delay_s=0.05) as bulk_server, FakeProviderServer() as urgent_server:
        config = _project(
            tmp_path,
            f"broker: {redis_url}\ndatabase: {database}\n",
            bulk_server.url,
            urgent_server.url,
            bulk_rows=BULK_ROWS,
            bulk_segment=BULK_SEGMENT,
        )
        workers = Workers(config)
        ledger = Ledger(database)
        try:
            workers.start(threads=2)
            workers.start(threads=2)
            bulk = _send(tmp_path, "bulk.yaml")
            # Every worker thread holds a bulk segment once the first batches of all four are out.
            wait_for(lambda: len(bulk_server.requests) >= 4 * 200, 60, "the bulk run to be sending")

            launched_at = time.monotonic()
            urgent = _send(tmp_path, "urgent.yaml")

            def urgent_sent() -> int:
                return ledger.counts(urgent).get(("sms", Status.SENT), 0)

            wait_for(lambda: urgent_sent() == URGENT_ROWS, 120, "the urgent run to be sent")
            done_after = time.monotonic() - launched_at
            bulk_sent = ledger.counts(bulk).get(("sms", Status.SENT), 0)
            first = min(r.received_at for r in urgent_server.requests) - launched_at
            _report(capsys, "2 worker processes", first, done_after, f"{bulk_sent:,}/{BULK_ROWS:,}")
            assert bulk_sent < BULK_ROWS // 2  # generous: ~5 % expected, ~75 % without priorities

            cancelled = subprocess.run(
                [smartpush_exe(), "cancel", bulk, "--config", str(config)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert cancelled.returncode == 0, cancelled.stderr
            assert len(urgent_server.accepted_per_key()) == URGENT_ROWS
        finally:
            ledger.close()
            workers.stop_all()
