"""Failover between a channel's accounts, and the breaker that skips a failing account."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from smartpush.failover import Breaker, choose_account
from smartpush.testing import FakeProviderServer, Reply


def test_breaker_opens_after_the_threshold_and_closes_after_the_cooldown() -> None:
    breaker = Breaker(errors=3, within_s=10, cooldown_s=0.3)
    for _ in range(2):
        breaker.failed("a")
    assert not breaker.is_open("a")
    breaker.failed("a")
    assert breaker.is_open("a") and not breaker.is_open("b")
    time.sleep(0.35)
    assert not breaker.is_open("a")


def test_choose_account_moves_on_after_a_failure_and_skips_open_ones() -> None:
    breaker = Breaker(errors=1, within_s=10, cooldown_s=60)
    accounts = ["main", "backup", "third"]
    assert choose_account(breaker, accounts, "main", failed_last=False) == "main"
    assert choose_account(breaker, accounts, "main", failed_last=True) == "backup"
    assert choose_account(breaker, accounts, "third", failed_last=True) == "main"  # wraps around
    breaker.failed("main")
    assert choose_account(breaker, accounts, None, failed_last=False) == "backup"
    breaker.failed("backup")
    breaker.failed("third")
    assert choose_account(breaker, accounts, None, failed_last=False) is None
    assert choose_account(breaker, ["only"], "only", failed_last=True) == "only"


def _redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis(host="127.0.0.1", port=6379, db=11, socket_timeout=2).ping())
    except Exception:
        return False


@pytest.mark.skipif(not _redis_up(), reason="needs Redis on 127.0.0.1 (.ci/run starts it)")
def test_the_breaker_is_shared_through_redis() -> None:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=11).flushdb()
    url = "redis://127.0.0.1:6379/11"
    worker_a = Breaker(errors=3, within_s=60, cooldown_s=30, redis_url=url)
    worker_b = Breaker(errors=3, within_s=60, cooldown_s=30, redis_url=url)
    worker_a.failed("sms-main")
    worker_b.failed("sms-main")
    assert not worker_a.is_open("sms-main")
    time.sleep(1.1)  # past the local cache of the reading above
    worker_b.failed("sms-main")
    assert worker_a.is_open("sms-main") and worker_b.is_open("sms-main")
    assert not worker_a.is_open("sms-backup")


def test_a_failing_account_hands_its_messages_to_the_backup(tmp_path: Path) -> None:
    from smartpush.config import load_config
    from smartpush.engine import Engine
    from smartpush.launch import launch
    from smartpush.ledger import RunState, Status
    from smartpush.loading import load_campaign

    with FakeProviderServer() as server:
        server.responder = lambda r: Reply(503) if r.path == "/main" else Reply(200)
        (tmp_path / "smartpush.yaml").write_text(
            f"database: sqlite:///{tmp_path / 'l.db'}\nfailover: {{errors: 3, within: 60s, cooldown: 1h}}\n"
            f"providers:\n"
            f"  main:\n    type: webhook\n    base_url: {server.url}\n    path: /main\n    sender: MAIRIE\n"
            f"  backup:\n    type: webhook\n    base_url: {server.url}\n    path: /backup\n"
            "    sender: MAIRIE\n"
        )
        (tmp_path / "p.csv").write_text("id;phone\n" + "".join(f"{i};061234560{i}\n" for i in range(8)))
        (tmp_path / "c.yaml").write_text(
            "name: t\ncategory: service\naudience: {source: p.csv, id: id}\n"
            "channels:\n  - {channel: sms, provider: [main, backup], body: Bonjour.}\n"
            "retry: {max_attempts: 3, backoff: {min: 10ms, max: 20ms}}\n"
        )
        config = load_config(tmp_path / "smartpush.yaml", env={})
        engine = Engine(config)
        worker = engine.worker(1)
        try:
            prepared = load_campaign(tmp_path / "c.yaml", config)

            def run_once() -> list[object]:
                run = launch(engine.rt, prepared, enqueue=engine.enqueue).run
                deadline = time.monotonic() + 20
                while engine.rt.ledger.get_run(run.id).state is not RunState.FINISHED:  # type: ignore[union-attr]
                    assert time.monotonic() < deadline, engine.rt.ledger.counts(run.id)
                    time.sleep(0.05)
                return list(engine.rt.ledger.messages(run.id))

            first = run_once()
            tried_main = sum(1 for r in server.requests if r.path == "/main")
            second = run_once()
        finally:
            worker.stop()
            engine.close()
    for messages in (first, second):
        assert {m.status for m in messages} == {Status.SENT}  # type: ignore[attr-defined]
        assert {m.provider for m in messages} == {"backup"}  # type: ignore[attr-defined]
    # The first batch tried `main` once a message (in flight together); then its breaker opened and
    # the second run never touched it.
    assert 3 <= tried_main <= 8
    assert sum(1 for r in server.requests if r.path == "/main") == tried_main
    assert sum(1 for r in server.requests if r.path == "/backup") == 16
