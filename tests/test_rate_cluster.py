"""Rate limits across worker processes, on real servers: Redis, PostgreSQL, `smartpush worker`.

The provider is a local HTTP server that records when each request arrives. Three workers share one
account's `rate: 50/s`: no sliding one-second window may see more than 55 requests (SPEC: burst at
most a tenth of a second's worth), and the mean must be within 5 % of 50/s. A 429 seen by one worker
pauses the account for all of them; a daily quota stops every worker; two campaigns share the rate.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import smartpush_exe
from test_distributed import (  # the fixtures and helpers of the distributed tests
    Workers,
    _services_up,
    database,
    make_project,
    redis_url,
    wait_for,
)

from smartpush.ledger import Ledger, Status
from smartpush.ratelimit import DAILY_QUOTA_CODE
from smartpush.testing import FakeProviderServer, RecordedRequest, Reply

__all__ = ["database", "redis_url"]  # imported fixtures, used by name

pytestmark = pytest.mark.skipif(
    not _services_up(), reason="needs Redis and PostgreSQL on 127.0.0.1 (.ci/run starts them)"
)


def worst_window(stamps: list[float], width: float = 1.0) -> int:
    """The most arrivals in any window [t, t + width)."""
    stamps = sorted(stamps)
    worst = j = 0
    for i, t in enumerate(stamps):
        while stamps[j] <= t - width:
            j += 1
        worst = max(worst, i - j + 1)
    return worst


def launch(cwd: Path, campaign: str = "c.yaml", key: str = "k1") -> str:
    done = subprocess.run(
        [smartpush_exe(), "send", campaign, "--yes", "--detach", "--json", "--key", key],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["run_id"])


def settings(redis_url: str, database: str) -> str:
    return f"broker: {redis_url}\ndatabase: {database}\nstuck_after: 30s\nsweep_every: 5s\n"


def test_three_workers_hold_50_per_second_together(tmp_path: Path, database: str, redis_url: str) -> None:
    rows = 600  # 12 s at 50/s
    with FakeProviderServer() as server:
        config = make_project(
            tmp_path,
            rows,
            settings(redis_url, database),
            f"base_url: {server.url}\n    rate: 50/s\n    concurrency: 40",
        )
        workers = Workers(config)
        ledger = Ledger(database)  # built before the sends start: this process also runs the sink
        ledger.migrate()
        try:
            for _ in range(3):
                workers.start()
            run_id = launch(tmp_path)
            wait_for(lambda: ledger.get_run(run_id).state.value == "finished", 120, "the run to finish")
            assert ledger.counts(run_id) == {("sms", Status.SENT): rows}
            ledger.close()
        finally:
            workers.stop_all()
        stamps = sorted(r.received_at for r in server.requests)
    assert len(stamps) == rows
    assert worst_window(stamps) <= 55
    mean = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    print(f"3 workers at rate 50/s: mean {mean:.2f}/s, worst 1-s window {worst_window(stamps)}")
    assert mean == pytest.approx(50, rel=0.05)


def test_a_429_pauses_the_account_in_every_worker(tmp_path: Path, database: str, redis_url: str) -> None:
    rows = 300
    throttled: list[float] = []

    def responder(request: RecordedRequest) -> Reply | None:
        if not throttled and len(server.requests) >= 60:
            throttled.append(request.received_at)
            return Reply(status=429, headers={"Retry-After": "3"}, json={"error": "slow down"})
        return None

    with FakeProviderServer(responder=responder) as server:
        config = make_project(
            tmp_path,
            rows,
            settings(redis_url, database),
            f"base_url: {server.url}\n    rate: 50/s\n    concurrency: 40",
        )
        workers = Workers(config)
        try:
            for _ in range(3):
                workers.start()
            run_id = launch(tmp_path)
            ledger = Ledger(database)
            wait_for(lambda: ledger.get_run(run_id).state.value == "finished", 120, "the run to finish")
            assert ledger.counts(run_id) == {("sms", Status.SENT): rows}
            # the throttled message was sent later, and its throttled try is not counted as an attempt
            assert all(m.attempts == 1 for m in ledger.messages(run_id))
            ledger.close()
        finally:
            workers.stop_all()
        stamps = sorted(r.received_at for r in server.requests)
    assert throttled and len(stamps) == rows + 1
    t429 = throttled[0]
    # Requests already on their way may still arrive; after that, nobody sends for Retry-After.
    during = [t for t in stamps if t429 + 0.3 < t < t429 + 2.9]
    assert during == []
    assert any(t >= t429 + 3.0 for t in stamps)


def test_a_daily_quota_stops_every_worker_and_leaves_the_rest_due_tomorrow(
    tmp_path: Path, database: str, redis_url: str
) -> None:
    rows = 250
    with FakeProviderServer() as server:
        config = make_project(
            tmp_path,
            rows,
            settings(redis_url, database),
            f"base_url: {server.url}\n    rate: 200/s\n    daily_quota: 100",
        )
        workers = Workers(config)
        try:
            workers.start()
            workers.start()
            run_id = launch(tmp_path)
            ledger = Ledger(database)

            def settled() -> bool:
                counts = ledger.counts(run_id)
                return counts.get(("sms", Status.SENT), 0) == 100 and ("sms", Status.SENDING) not in counts

            wait_for(settled, 60, "the quota to be used up")
            waiting = list(ledger.messages(run_id, statuses=[Status.CREATED]))
            assert len(waiting) == rows - 100
            assert {m.error_code for m in waiting} == {DAILY_QUOTA_CODE}
            assert all(m.attempts == 0 for m in waiting)
            assert ledger.get_run(run_id).state.value == "running"  # not finished, not failed: waiting
            ledger.close()
        finally:
            workers.stop_all()
        assert len(server.requests) == 100


def test_two_campaigns_sharing_an_account_share_its_rate(
    tmp_path: Path, database: str, redis_url: str
) -> None:
    rows = 400
    with FakeProviderServer() as server:
        config = make_project(
            tmp_path,
            rows,
            settings(redis_url, database),
            f"base_url: {server.url}\n    rate: 40/s\n    concurrency: 40",
        )
        text = (tmp_path / "c.yaml").read_text(encoding="utf-8")
        (tmp_path / "d.yaml").write_text(text.replace("name: alerte", "name: rappel"), encoding="utf-8")
        workers = Workers(config)
        try:
            workers.start()
            workers.start()
            first = launch(tmp_path, "c.yaml", "c-1")
            second = launch(tmp_path, "d.yaml", "d-1")
            ledger = Ledger(database)
            wait_for(
                lambda: all(ledger.get_run(r).state.value == "finished" for r in (first, second)),
                120,
                "both runs to finish",
            )
            owner = {m.id: r for r in (first, second) for m in ledger.messages(r)}
            ledger.close()
        finally:
            workers.stop_all()
        arrivals = sorted((r.received_at, owner[r.idempotency_key or ""]) for r in server.requests)
    # While both runs were sending, each got about half of the 40/s.
    last_first = max(t for t, r in arrivals if r == first)
    last_second = max(t for t, r in arrivals if r == second)
    start_second = min(t for t, r in arrivals if r == second)
    overlap = [r for t, r in arrivals if start_second <= t <= min(last_first, last_second)]
    share = overlap.count(first) / len(overlap)
    print(f"two runs on one account: first run's share while both sent = {share:.2f} of {len(overlap)}")
    assert len(overlap) >= 200
    assert 0.35 <= share <= 0.65
