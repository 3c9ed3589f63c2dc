"""The dispatch engine, embedded: real SQLite ledger, real webhook driver, real HTTP provider on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from smartpush.config import load_config
from smartpush.engine import Engine
from smartpush.launch import launch
from smartpush.ledger import RunState, Status
from smartpush.loading import load_campaign
from smartpush.testing import FakeProviderServer, Reply

CAMPAIGN = """\
name: essai
category: service
audience:
  source: people.csv
  id: id
segments:
  size: {size}
channels:
  - channel: sms
    provider: sms
    body: "Bonjour {{{{ prenom }}}}, votre rendez-vous est confirmé."
  - channel: email
    provider: mail
    from: "Service <noreply@example.fr>"
    subject: "Rendez-vous"
    text: "Bonjour {{{{ prenom }}}}"
strategy: {strategy}
retry:
  max_attempts: {attempts}
  backoff: {{min: 20ms, max: 100ms}}
  expire_after: {expire}
"""


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as s:
        yield s


def make_project(
    tmp_path: Path,
    server: FakeProviderServer,
    *,
    rows: int = 20,
    size: int = 7,
    strategy: str = "first-reachable",
    attempts: int = 4,
    expire: str = "24h",
    sms_rate: str = "",
) -> Path:
    rate = f"\n    rate: {sms_rate}" if sms_rate else ""
    (tmp_path / "smartpush.yaml").write_text(
        f"database: sqlite:///{tmp_path / 'ledger.db'}\n"
        f"providers:\n"
        f"  sms:\n    type: webhook\n    base_url: {server.url}\n    path: /sms\n    sender: MAIRIE{rate}\n"
        f"  mail:\n    type: webhook\n    base_url: {server.url}\n    path: /mail\n",
        encoding="utf-8",
    )
    lines = ["id;prenom;phone;email"]
    for i in range(rows):
        lines.append(f"{i};Zoé{i};06{12345600 + i:08d};p{i}@example.fr")
    (tmp_path / "people.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = tmp_path / "campaign.yaml"
    path.write_text(
        CAMPAIGN.format(size=size, strategy=strategy, attempts=attempts, expire=expire), encoding="utf-8"
    )
    return path


class Harness:
    def __init__(self, campaign: Path, threads: int = 2) -> None:
        self.config = load_config(campaign.parent / "smartpush.yaml", env={})
        self.prepared = load_campaign(campaign, self.config)
        self.engine = Engine(self.config)
        self.ledger = self.engine.rt.ledger
        self.worker = self.engine.worker(threads)

    def launch(self, key: str | None = None) -> str:
        return launch(self.engine.rt, self.prepared, enqueue=self.engine.enqueue, key=key).run.id

    def wait(
        self, run_id: str, states: tuple[RunState, ...] = (RunState.FINISHED,), timeout: float = 30
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.ledger.get_run(run_id)
            if run is not None and run.state in states:
                return
            time.sleep(0.05)
        raise AssertionError(f"run {run_id} did not reach {states}: {self.ledger.counts(run_id)}")

    def statuses(self, run_id: str) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (channel, status), n in self.ledger.counts(run_id).items():
            out.setdefault(channel, {})[status.value] = n
        return out

    def close(self) -> None:
        self.worker.stop()
        self.engine.close()


@pytest.fixture
def harness_factory() -> Iterator[list[Harness]]:
    made: list[Harness] = []
    yield made
    for h in made:
        h.close()


def start(made: list[Harness], campaign: Path, threads: int = 2) -> Harness:
    h = Harness(campaign, threads)
    made.append(h)
    return h


def test_every_recipient_gets_one_message_once(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    h = start(harness_factory, make_project(tmp_path, server, rows=50, size=7))
    run_id = h.launch()
    h.wait(run_id)
    assert h.statuses(run_id) == {"sms": {"sent": 50}, "email": {"skipped": 50}}
    keys = server.requests_per_key()
    assert len(keys) == 50 and set(keys.values()) == {1}
    run = h.ledger.get_run(run_id)
    assert run is not None and run.segments == 8 and run.recipients == 50
    bodies = [r.json["body"] for r in server.requests]
    assert "Bonjour Zoé7, votre rendez-vous est confirmé." in bodies
    refs = [m.provider_reference for m in h.ledger.messages(run_id) if m.channel == "sms"]
    assert all(refs)


def test_the_same_key_gives_the_same_run(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    h = start(harness_factory, make_project(tmp_path, server, rows=10))
    first = h.launch(key="rappel@2026-12-01T09:00")
    h.wait(first)
    again = h.launch(key="rappel@2026-12-01T09:00")
    assert again == first
    time.sleep(0.3)
    assert len(server.requests) == 10


def test_transient_errors_are_retried_and_counted(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    server.script([Reply(500), Reply(503), Reply(200)])
    h = start(harness_factory, make_project(tmp_path, server, rows=1))
    run_id = h.launch()
    h.wait(run_id)
    (sms,) = [m for m in h.ledger.messages(run_id) if m.channel == "sms"]
    assert sms.status is Status.SENT and sms.attempts == 3
    assert server.requests_per_key()[sms.id] == 3  # the same idempotency key every time


def test_throttling_does_not_spend_attempts(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    server.script([Reply(429, headers={"Retry-After": "0"})] * 5)
    h = start(harness_factory, make_project(tmp_path, server, rows=1, attempts=2))
    run_id = h.launch()
    h.wait(run_id)
    (sms,) = [m for m in h.ledger.messages(run_id) if m.channel == "sms"]
    assert sms.status is Status.SENT
    assert sms.attempts == 1  # five throttled answers, one real attempt
    assert len(server.requests) == 6


def test_exhausted_retries_end_in_temporary_failure(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    server.responder = lambda request: Reply(500) if request.path == "/sms" else Reply(200)
    h = start(harness_factory, make_project(tmp_path, server, rows=2, attempts=3))
    run_id = h.launch()
    h.wait(run_id)
    sms = [m for m in h.ledger.messages(run_id) if m.channel == "sms"]
    assert {m.status for m in sms} == {Status.TEMPORARY_FAILURE}
    assert {m.attempts for m in sms} == {3}
    # first-reachable: a failed channel hands the recipient to the next one
    assert h.statuses(run_id)["email"] == {"sent": 2}


def test_permanent_failure_falls_back_to_the_next_channel(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    def answer(request: object) -> Reply:
        body = getattr(request, "json", {}) or {}
        if getattr(request, "path", "") == "/sms" and body.get("to", "").endswith("03"):
            return Reply(400, json={"error": {"code": "INVALID_NUMBER"}})
        return Reply(200)

    server.responder = answer
    h = start(harness_factory, make_project(tmp_path, server, rows=6))
    run_id = h.launch()
    h.wait(run_id)
    assert h.statuses(run_id) == {
        "sms": {"sent": 5, "permanent-failure": 1},
        "email": {"sent": 1, "skipped": 5},
    }
    failed = [m for m in h.ledger.messages(run_id) if m.status is Status.PERMANENT_FAILURE]
    assert failed[0].error_code == "INVALID_NUMBER" and failed[0].attempts == 1


def test_a_segment_delivered_twice_sends_nothing_twice(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    server.delay_s = 0.02
    h = start(harness_factory, make_project(tmp_path, server, rows=30, size=30))
    h.worker.stop()  # drive the actor by hand: two deliveries of segment 0 at the same time
    run_id = launch(h.engine.rt, h.prepared, enqueue=lambda run, seg: None).run.id
    threads = [threading.Thread(target=h.engine.handle, args=(run_id, 0)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h.engine.handle(run_id, 0)  # and once more, after it is done
    assert server.requests_per_key().most_common(1)[0][1] == 1
    assert len(server.requests) == 30
    assert h.ledger.get_run(run_id).state is RunState.FINISHED  # type: ignore[union-attr]
    h.worker = h.engine.worker(1)


def test_pause_resume_and_cancel(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    server.delay_s = 0.01
    h = start(harness_factory, make_project(tmp_path, server, rows=300, size=50, sms_rate="100/s"))
    run_id = h.launch()
    time.sleep(0.5)
    assert h.ledger.set_run_state(run_id, RunState.PAUSED)
    time.sleep(1.0)  # in-flight batches finish; nothing more leaves
    frozen = len(server.requests)
    time.sleep(1.0)
    assert len(server.requests) == frozen
    assert 0 < frozen < 300
    assert h.ledger.set_run_state(run_id, RunState.RUNNING, only_from=frozenset({RunState.PAUSED}))
    h.engine.resume(run_id)
    time.sleep(0.5)
    assert h.ledger.set_run_state(run_id, RunState.CANCELLED)
    cancelled = h.ledger.cancel_unsent(run_id, datetime.now(UTC))
    time.sleep(1.5)  # batches in flight hand their unsent messages back, and they are cancelled too
    everything = h.statuses(run_id)
    counts, email = everything["sms"], everything["email"]
    assert cancelled > 0 and counts["cancelled"] + email["cancelled"] >= cancelled
    assert counts["sent"] == len(server.requests_per_key())
    assert counts["sent"] + counts["cancelled"] == 300
    # a fallback is skipped once its recipient is reached, or cancelled with the run (also when the
    # SMS in flight at the cancel went out afterwards)
    assert set(email) == {"skipped", "cancelled"} and email["skipped"] + email["cancelled"] == 300
    assert email["skipped"] <= counts["sent"]
    assert h.ledger.get_run(run_id).state is RunState.CANCELLED  # type: ignore[union-attr]


def test_expired_messages_are_never_sent_late(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    h = start(harness_factory, make_project(tmp_path, server, rows=5, expire="1ms"))
    h.worker.stop()
    run_id = launch(h.engine.rt, h.prepared, enqueue=lambda run, seg: None).run.id
    time.sleep(0.05)
    h.engine.handle(run_id, 0)
    assert server.requests == []
    assert h.statuses(run_id)["sms"] == {"expired": 5}
    h.worker = h.engine.worker(1)


def test_resume_after_a_split_that_died(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    h = start(harness_factory, make_project(tmp_path, server, rows=5000, size=100))
    h.worker.stop()

    class Died(Exception):
        pass

    def dying_rows() -> Iterator[object]:
        for i, row in enumerate(h.prepared.audience):
            if i == 3000:
                raise Died
            yield row

    with pytest.raises(Died):
        launch(h.engine.rt, h.prepared, enqueue=lambda run, seg: None, key="k", rows=dying_rows())  # type: ignore[arg-type]
    run = h.ledger.find_run("k")
    assert not run.split_complete and 2000 <= run.recipients <= 3000
    h.worker = h.engine.worker(2)
    again = launch(h.engine.rt, h.prepared, enqueue=h.engine.enqueue, key="k")
    assert again.run.id == run.id and again.resumed
    h.wait(run.id)
    assert h.statuses(run.id)["sms"] == {"sent": 5000}
    assert len(server.requests_per_key()) == 5000


def test_nothing_leaves_outside_the_send_window(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    from zoneinfo import ZoneInfo

    from smartpush.sending import process_segment

    hour = datetime.now(ZoneInfo("Europe/Paris")).hour
    closed = "13:00-14:00" if hour < 12 or hour > 14 else "02:00-03:00"
    campaign = make_project(tmp_path, server, rows=3)
    campaign.write_text(
        campaign.read_text() + f'schedule:\n  window: {{days: mon-sun, hours: "{closed}"}}\n',
        encoding="utf-8",
    )
    h = start(harness_factory, campaign)
    h.worker.stop()
    run_id = launch(h.engine.rt, h.prepared, enqueue=lambda run, seg: None).run.id
    later: list[int | None] = []
    outcome = process_segment(h.engine.rt, lambda run, seg, delay: later.append(delay), run_id, 0)
    assert server.requests == []
    assert h.statuses(run_id)["sms"] == {"created": 3}
    assert later and later[0] is not None and 0 < later[0] <= 24 * 3600 * 1000
    assert outcome.again_in_ms == later[0]
    h.worker = h.engine.worker(1)


def test_dead_addresses_go_on_the_suppression_list(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    from smartpush.unsubscribe import recipient_hash

    campaign = make_project(tmp_path, server, rows=4)
    config = tmp_path / "smartpush.yaml"
    config.write_text(
        config.read_text().replace(
            "sender: MAIRIE", "sender: MAIRIE\n    unregistered_codes: [UNREGISTERED]", 1
        )
    )

    def answer(request: object) -> Reply:
        body = getattr(request, "json", {}) or {}
        if body.get("to", "").endswith("02"):
            return Reply(404, json={"error": {"code": "UNREGISTERED"}})
        return Reply(200)

    server.responder = answer
    h = start(harness_factory, campaign)
    run_id = h.launch()
    h.wait(run_id)
    key = h.config.secret_key()
    dead = recipient_hash(key, "sms", "+33612345602")
    alive = recipient_hash(key, "sms", "+33612345601")
    assert h.ledger.suppressed("sms", {dead, alive}) == {dead}
    assert h.statuses(run_id)["sms"] == {"sent": 3, "permanent-failure": 1}


def test_time_spent_waiting_for_the_rate_is_counted_per_provider(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    from prometheus_client import REGISTRY

    def waited() -> float:
        value = REGISTRY.get_sample_value("smartpush_rate_limit_wait_seconds_total", {"provider": "sms"})
        return value or 0.0

    before = waited()
    h = start(harness_factory, make_project(tmp_path, server, rows=30, size=30, sms_rate="20/s"))
    run_id = h.launch()
    h.wait(run_id)
    # 30 messages at 20/s: two at once (the burst), then one every 50 ms (message k at (k - 1) * 50 ms).
    # The account's 10 connections make 10 senders: the first 10 messages wait from the start, each
    # later one from when its sender's previous message left, 10 units (500 ms) earlier.
    granted = [0.0] + [0.05 * (k - 1) for k in range(1, 30)]
    expected = sum(granted[:10]) + sum(granted[k] - granted[k - 10] for k in range(10, 30))
    assert waited() - before == pytest.approx(expected, rel=0.2)


def test_a_daily_quota_counts_what_an_earlier_process_sent_today(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    campaign = make_project(tmp_path, server, rows=10, size=10, sms_rate="1000/s\n    daily_quota: 15")
    first = start(harness_factory, campaign)
    first_run = first.launch(key="one")
    first.wait(first_run)
    first.close()
    harness_factory.remove(first)
    # A new process (embedded `send` again, the same day): its count starts from the ledger.
    second = start(harness_factory, campaign)
    run_id = second.launch(key="two")

    def settled() -> bool:
        held = [m for m in second.ledger.messages(run_id) if m.error_code == "daily-quota"]
        return len(held) + second.statuses(run_id)["sms"].get("sent", 0) == 10

    deadline = time.monotonic() + 20
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second.statuses(run_id)["sms"] == {"sent": 5, "created": 5}
    waiting = [m for m in second.ledger.messages(run_id) if m.status is Status.CREATED]
    assert {m.error_code for m in waiting} == {"daily-quota"}
    tomorrow = waiting[0].next_attempt_at
    assert tomorrow is not None and tomorrow > datetime.now(UTC)
    assert "daily quota of 15" in (waiting[0].error_text or "")
    assert len(server.requests) == 15


def test_a_background_run_state_read_that_fails_is_not_left_unretrieved(
    tmp_path: Path, server: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During a database outage the background read of a run's state fails while a cached state is
    served: the failure must not be logged as "Task exception was never retrieved" (hundreds of times)."""
    import asyncio
    import gc

    from smartpush import runtime
    from smartpush.errors import InfrastructureError

    config = load_config(make_project(tmp_path, server).parent / "smartpush.yaml", env={})
    rt = runtime.Runtime(config)
    unretrieved: list[str] = []

    def fail(run_id: str) -> bool:
        raise InfrastructureError("the ledger database is away")

    async def ask() -> bool:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unretrieved.append(ctx["message"]))
        # A state read a little too long ago: served as is while a fresh one is read in the background.
        rt._run_states["r"] = (time.monotonic() - runtime.RUN_STATE_TTL_S - 0.01, True)
        monkeypatch.setattr(rt, "sending_allowed", fail)
        answer = await rt.still_sending("r")
        await asyncio.sleep(0.2)  # the background read fails meanwhile
        gc.collect()
        return answer

    try:
        assert asyncio.run(ask()) is True
    finally:
        rt.close()
    assert unretrieved == []


def test_a_message_whose_sends_keep_being_interrupted_ends_at_max_attempts(
    tmp_path: Path, server: FakeProviderServer
) -> None:
    """A message that takes its worker down every time (the sweeper releasing it again and again) must
    not take worker after worker down: each interruption counts, and at max_attempts it ends."""
    from datetime import timedelta

    campaign = make_project(tmp_path, server, rows=3, size=10, attempts=4, strategy="all")
    config = load_config(campaign.parent / "smartpush.yaml", env={})
    engine = Engine(config)
    try:
        ledger = engine.rt.ledger
        run_id = launch(engine.rt, load_campaign(campaign, config), enqueue=lambda *_: None).run.id
        sms = [m.id for m in ledger.messages(run_id) if m.channel == "sms"]
        for _ in range(4):  # claimed by a worker that dies; released by the sweeper
            assert ledger.claim(sms, datetime.now(UTC)) == set(sms)
            later = datetime.now(UTC) + timedelta(seconds=1)
            ledger.unstick(run_id, 0, sending_before=later, now=datetime.now(UTC))
        engine.handle(run_id, 0)
        final = {m.id: m for m in ledger.messages(run_id)}
        assert {(final[i].status, final[i].attempts, final[i].error_code) for i in sms} == {
            (Status.TECHNICAL_FAILURE, 4, "interrupted")
        }
        assert all(r.path != "/sms" for r in server.requests)  # not handed to the provider again
        assert {m.status for m in final.values() if m.channel == "email"} == {Status.SENT}
    finally:
        engine.close()


def test_batches_are_sized_to_the_pace_of_the_provider() -> None:
    from smartpush.sending import BATCH_SIZE, BATCH_TARGET_S, MAX_BATCH, MIN_BATCH, next_batch_size

    # a fast provider: 200 sent in 0.4 s -> the next batch takes about BATCH_TARGET_S at that pace
    assert next_batch_size(200, 0.4) == min(MAX_BATCH, int(200 * BATCH_TARGET_S / 0.4))
    assert next_batch_size(200, 0.01) == MAX_BATCH  # bounded: a batch's memory and claim stay small
    # a rate-limited account (10 messages/s): small batches, so a closing window stops it in seconds
    assert next_batch_size(200, 20.0) == int(10 * BATCH_TARGET_S)
    assert next_batch_size(3, 60.0) == MIN_BATCH
    assert next_batch_size(0, 1.0) == BATCH_SIZE  # nothing sent (all handed back): start again


def test_a_runs_campaign_is_loaded_once_by_the_threads_that_need_it_together(
    tmp_path: Path,
    server: FakeProviderServer,
    harness_factory: list[Harness],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from smartpush import runtime

    h = start(harness_factory, make_project(tmp_path, server, rows=5))
    h.worker.stop()
    run = h.ledger.get_run(launch(h.engine.rt, h.prepared, enqueue=lambda run, seg: None).run.id)
    assert run is not None
    real = runtime.load_campaign
    loads: list[str] = []

    def slow_load(path: Path, config: object) -> object:
        loads.append(str(path))
        time.sleep(0.2)  # the others arrive while it loads
        return real(path, config)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime, "load_campaign", slow_load)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(h.engine.rt.campaign(run))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(got) == 8 and all(g is got[0] for g in got)


def test_a_batch_keeps_one_sender_per_connection_not_a_task_per_message(
    tmp_path: Path, server: FakeProviderServer, harness_factory: list[Harness]
) -> None:
    """300 messages through an account with 4 connections: every one sent once, with a handful of
    tasks alive on the worker's event loop, not one per message of the batch."""
    import asyncio

    campaign = make_project(tmp_path, server, rows=300, size=300)
    config = tmp_path / "smartpush.yaml"
    config.write_text(
        config.read_text(encoding="utf-8").replace("sender: MAIRIE", "sender: MAIRIE\n    concurrency: 4"),
        encoding="utf-8",
    )
    server.delay_s = 0.005
    h = start(harness_factory, campaign, threads=1)
    run_id = h.launch()
    most = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        loop = h.engine.rt._loop
        if loop is not None:
            most = max(most, len(asyncio.all_tasks(loop.loop)))
        run = h.ledger.get_run(run_id)
        if run is not None and run.state is RunState.FINISHED:
            break
        time.sleep(0.01)
    assert h.statuses(run_id) == {"sms": {"sent": 300}, "email": {"skipped": 300}}
    assert sorted(server.requests_per_key().values()) == [1] * 300
    # 4 senders, the batch itself, the results writer, a rate-limit pump, a run-state read: not 200+
    assert 4 <= most <= 12, most


def test_a_worker_process_warms_up_before_its_first_message(
    tmp_path: Path, server: FakeProviderServer
) -> None:
    """What the first message would import (the HTTP client) and start (the event loop
    thread) is ready once a worker process has set up: its first batch does not wait for imports."""
    import subprocess
    import sys

    make_project(tmp_path, server)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from smartpush.config import load_config\n"
        "from smartpush.runtime import Runtime\n"
        f"rt = Runtime(load_config(Path({str(tmp_path / 'smartpush.yaml')!r}), env={{}}))\n"
        "before = {m for m in ('aiohttp',) if m in sys.modules}\n"
        "rt.warm_up()\n"
        "after = {m for m in ('aiohttp',) if m in sys.modules}\n"
        "print(sorted(before), sorted(after), rt._loop is not None and rt._loop.thread.is_alive())\n"
        "rt.close()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split("\n")[0] == "[] ['aiohttp'] True", done.stderr


def test_a_segment_s_messages_use_the_run_state_the_segment_just_read(
    tmp_path: Path,
    server: FakeProviderServer,
    harness_factory: list[Harness],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The state a segment reads as it starts (running?) serves its first messages' check too: no
    second read of the run before the first message leaves."""
    h = start(harness_factory, make_project(tmp_path, server, rows=5, size=5), threads=1)
    h.worker.stop()
    run_id = launch(h.engine.rt, h.prepared, enqueue=lambda run, seg: None).run.id
    reads: list[str] = []
    real = h.ledger.get_run

    def counted(rid: str) -> object:
        reads.append(rid)
        return real(rid)

    monkeypatch.setattr(h.ledger, "get_run", counted)
    from smartpush.sending import process_segment

    process_segment(h.engine.rt, lambda run, seg, delay=None: None, run_id, 0)
    assert h.statuses(run_id)["sms"] == {"sent": 5}
    assert len(reads) == 2, reads  # the segment's start and its end (is the run finished?)
