"""Metrics, in process: an embedded campaign through the engine, then the default registry's samples.

The provider is a real HTTP server on loopback (FakeProviderServer) that throttles, fails and refuses
some requests. Every counter is read as a difference (before/after) or under a campaign name of its
own, since the registry is shared by the whole test session.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest
from dramatiq.brokers.stub import StubBroker
from prometheus_client import REGISTRY, generate_latest

from smartpush import metrics, workerboot
from smartpush.config import load_config
from smartpush.engine import Engine
from smartpush.errors import ConfigError, InfrastructureError
from smartpush.launch import launch
from smartpush.ledger import FINAL, Ledger, RunState, Status
from smartpush.loading import load_campaign
from smartpush.queueing import Dispatcher
from smartpush.sms import analyse
from smartpush.testing import FakeProviderServer, RecordedRequest, Reply

ROWS = 30
THROTTLED = 3  # the first SMS requests are answered 429

CAMPAIGN = """\
name: {name}
category: service
audience:
  source: people.csv
  id: id
segments:
  size: 8
channels:
  - channel: sms
    provider: sms
    body: "Bonjour {{{{ prenom }}}}, votre rendez-vous est confirmé."
  - channel: email
    provider: mail
    from: "Service <noreply@example.fr>"
    subject: "Rendez-vous"
    text: "Bonjour {{{{ prenom }}}}"
strategy: first-reachable
retry:
  max_attempts: 2
  backoff: {{min: 20ms, max: 50ms}}
"""


def person(i: int) -> tuple[str, str, str]:
    """(first name, phone, email) of row ``i``: some names need UCS-2, row 28 has a bad phone, 29 none."""
    name = f"Łucja{i}" if i % 5 == 4 else f"Zoé{i}"
    phone = "12" if i == ROWS - 2 else "" if i == ROWS - 1 else f"06{12345600 + i:08d}"
    return name, phone, f"p{i}@example.fr"


def make_project(tmp_path: Path, server: FakeProviderServer, name: str) -> Path:
    (tmp_path / "smartpush.yaml").write_text(
        f"database: sqlite:///{tmp_path / 'ledger.db'}\n"
        f"providers:\n"
        f"  sms:\n    type: webhook\n    base_url: {server.url}\n    path: /sms\n    sender: MAIRIE\n"
        f"  mail:\n    type: webhook\n    base_url: {server.url}\n    path: /mail\n",
        encoding="utf-8",
    )
    lines = ["id;prenom;phone;email", *(";".join((str(i), *person(i))) for i in range(ROWS))]
    (tmp_path / "people.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = tmp_path / "campaign.yaml"
    path.write_text(CAMPAIGN.format(name=name), encoding="utf-8")
    return path


class Provider:
    """Answers and counts: the first SMS requests throttled, +33612345601 refused (400), +33612345602
    always failing (500), everything else accepted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.replies: Counter[tuple[str, int]] = Counter()
        self.accepted_sms: list[str] = []

    def __call__(self, request: RecordedRequest) -> Reply:
        body = request.json or {}
        to = str(body.get("to", ""))
        with self.lock:
            if request.path == "/sms" and self.replies[("/sms", 429)] < THROTTLED:
                status = 429
            elif request.path == "/sms" and to.endswith("01"):
                status = 400
            elif request.path == "/sms" and to.endswith("02"):
                status = 500
            else:
                status = 200
            self.replies[(request.path, status)] += 1
            if status == 200 and request.path == "/sms":
                self.accepted_sms.append(str(body.get("body", "")))
        headers = {"Retry-After": "0"} if status == 429 else {}
        return Reply(status, headers=headers)


def samples(name: str, **match: str) -> dict[tuple[str, ...], float]:
    """The registry's samples called ``name`` whose labels include ``match``: labels (sorted) → value."""
    found: dict[tuple[str, ...], float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in match.items()):
                found[tuple(f"{k}={v}" for k, v in sorted(sample.labels.items()))] = sample.value
    return found


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def server() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as s:
        yield s


def wait_finished(ledger: Ledger, run_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = ledger.get_run(run_id)
        if run is not None and run.state is RunState.FINISHED:
            return
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} did not finish: {ledger.counts(run_id)}")


REQUEST_KEYS = [
    ("sms", "ok"),
    ("sms", "throttled"),
    ("sms", "transient"),
    ("sms", "permanent"),
    ("mail", "ok"),
]


def snapshot() -> dict[str, float]:
    out = {
        f"req:{p}:{o}": value("smartpush_provider_requests_total", provider=p, outcome=o)
        for p, o in REQUEST_KEYS
    }
    for provider, channel in (("sms", "sms"), ("mail", "email")):
        out[f"lat:{provider}"] = value(
            "smartpush_provider_latency_seconds_count", provider=provider, channel=channel
        )
        out[f"ttp:{channel}"] = value("smartpush_time_to_provider_seconds_count", channel=channel)
    for encoding in ("GSM-7", "UCS-2"):
        out[f"parts:{encoding}"] = value("smartpush_sms_parts_total", provider="sms", encoding=encoding)
    return out


def test_an_embedded_campaign_is_counted(tmp_path: Path, server: FakeProviderServer) -> None:
    name = f"metrics-{secrets.token_hex(3)}"
    provider = Provider()
    server.responder = provider
    campaign = make_project(tmp_path, server, name)
    config = load_config(tmp_path / "smartpush.yaml", env={})
    engine = Engine(config)
    worker = engine.worker(2)
    before = snapshot()
    try:
        run_id = launch(engine.rt, load_campaign(campaign, config), enqueue=engine.enqueue).run.id
        wait_finished(engine.rt.ledger, run_id)
        counts = engine.rt.ledger.counts(run_id)
        live = list(metrics.LiveCollector(engine.rt.ledger, engine.broker).collect())
    finally:
        worker.stop()
        engine.close()
    after = snapshot()
    delta = {k: after[k] - before[k] for k in after}

    # The ledger as the test expects it: 400 and 500 fall back to email, bad and missing phones too.
    by_status = Counter({(ch, st.value): n for (ch, st), n in counts.items()})
    assert by_status == {
        ("sms", "sent"): ROWS - 4,
        ("sms", "permanent-failure"): 1,
        ("sms", "temporary-failure"): 1,
        ("sms", "invalid"): 1,
        ("sms", "skipped"): 1,
        ("email", "sent"): 4,
        ("email", "skipped"): ROWS - 4,
    }

    # smartpush_messages_total: each message once in its final status, exactly as the ledger has it…
    counted = {
        (dict(k)["channel"], dict(k)["status"]): v
        for k, v in (
            (dict(s.split("=", 1) for s in key), v)
            for key, v in samples("smartpush_messages_total", campaign=name).items()
        )
    }
    finals = {k: v for k, v in counted.items() if Status(k[1]) in FINAL}
    assert finals == {k: float(n) for k, n in by_status.items()}
    assert sum(finals.values()) == ROWS * 2  # every message, once
    # …and once at launch in the status it was stored in (the final ones above included).
    assert counted[("sms", "created")] == ROWS - 2
    assert counted[("email", "waiting")] == ROWS - 2
    assert counted[("email", "created")] == 2
    every_label = {
        dict(s.split("=", 1) for s in key)["provider"]
        for key in samples("smartpush_messages_total", campaign=name)
    }
    assert every_label == {"sms", "mail"}

    # smartpush_provider_requests_total: one per request, by outcome.
    replies = provider.replies
    assert delta["req:sms:ok"] == replies[("/sms", 200)] == ROWS - 4
    assert delta["req:sms:throttled"] == replies[("/sms", 429)] == THROTTLED
    assert delta["req:sms:transient"] == replies[("/sms", 500)] == 2  # max_attempts 2
    assert delta["req:sms:permanent"] == replies[("/sms", 400)] == 1
    assert delta["req:mail:ok"] == replies[("/mail", 200)] == 4
    # The latency of every request, whatever its outcome.
    assert delta["lat:sms"] == sum(n for (path, _), n in replies.items() if path == "/sms")
    assert delta["lat:mail"] == 4
    # Creation → acceptance, for each message sent.
    assert delta["ttp:sms"] == ROWS - 4 and delta["ttp:email"] == 4

    # SMS parts of the accepted SMS, by encoding.
    parts: Counter[str] = Counter()
    for body in provider.accepted_sms:
        info = analyse(body)
        parts[str(info.encoding)] += info.parts
    assert parts["UCS-2"] > 0 and parts["GSM-7"] > 0
    assert delta["parts:GSM-7"] == parts["GSM-7"]
    assert delta["parts:UCS-2"] == parts["UCS-2"]

    # The live gauges: the run just ended (shown for a while), by status, the queues empty.
    gauges = {f.name: f for f in live}
    run_values = {
        s.labels["status"]: s.value
        for s in gauges["smartpush_run_messages"].samples
        if s.labels["run"] == run_id
    }
    assert set(run_values) == {s.value for s in Status}
    assert run_values["sent"] == ROWS - 4 + 4 and run_values["skipped"] == ROWS - 4 + 1
    assert sum(run_values.values()) == ROWS * 2
    queues = {
        (s.labels["queue"], s.labels["state"]): s.value for s in gauges["smartpush_queue_messages"].samples
    }
    assert set(queues) == {
        (f"smartpush-{p}", state) for p in ("urgent", "normal", "bulk") for state in ("waiting", "delayed")
    }

    # No personal data in any label, nor anywhere in the exposition.
    text = generate_latest(REGISTRY).decode()
    labels = {v for family in REGISTRY.collect() for sample in family.samples for v in sample.labels.values()}
    for i in range(ROWS):
        first_name, phone, email = person(i)
        for secret in (first_name, email, phone[2:] if len(phone) > 2 else None):
            if secret:
                assert secret not in text, secret
                assert not any(secret in label for label in labels), secret


def test_bulk_closes_are_counted_by_account(tmp_path: Path, server: FakeProviderServer) -> None:
    """``expire`` and ``cancel_unsent`` give only a total: the accounts come from the unsent counts."""
    name = f"metrics-{secrets.token_hex(3)}"
    campaign = make_project(tmp_path, server, name)
    config = load_config(tmp_path / "smartpush.yaml", env={})
    engine = Engine(config)  # no worker thread: the messages stay unsent
    try:
        prepared = load_campaign(campaign, config)
        run_id = launch(engine.rt, prepared, enqueue=lambda run, segment: None).run.id
        ledger = engine.rt.ledger
        expire = partial(ledger.expire, run_id, created_before=None, now=datetime.now(UTC), reason="test")
        moved = metrics.count_closed(ledger, run_id, prepared, Status.EXPIRED, expire)
        assert moved == ROWS * 2 - 2  # all but the invalid and the skipped SMS
        expired = {
            (s.labels["channel"], s.labels["provider"]): s.value
            for f in REGISTRY.collect()
            for s in f.samples
            if s.name == "smartpush_messages_total"
            and s.labels.get("campaign") == name
            and s.labels.get("status") == "expired"
        }
        assert expired == {("sms", "sms"): ROWS - 2, ("email", "mail"): ROWS}
        # Nothing left to close: no second read of the ledger, nothing counted.
        again = partial(ledger.cancel_unsent, run_id, datetime.now(UTC))
        assert metrics.count_closed(ledger, run_id, prepared, Status.CANCELLED, again) == 0
        assert (
            value(
                "smartpush_messages_total", campaign=name, channel="sms", provider="sms", status="cancelled"
            )
            == 0
        )
    finally:
        engine.close()


def test_apportion_shares_a_total_out_in_whole_numbers() -> None:
    assert metrics._apportion(Counter({1: 3, 2: 3}), 6) == {1: 3, 2: 3}  # exact
    assert metrics._apportion(Counter({1: 4, 2: 2}), 3) == {1: 2, 2: 1}
    assert sum(metrics._apportion(Counter({1: 5, 2: 3, 3: 1}), 7).values()) == 7
    assert metrics._apportion(Counter(), 3) == {}
    assert metrics._apportion(Counter({1: 2}), 0) == {}


def test_request_outcomes() -> None:
    from smartpush.errors import PermanentError, TechnicalError, ThrottledError, TransientError

    account = f"acct-{secrets.token_hex(3)}"
    errors: list[BaseException | None] = [
        None,
        ThrottledError("slow down"),
        TransientError("503"),
        PermanentError("bad number"),
        TechnicalError("401"),  # our side: counted as permanent (SPEC's four outcomes)
        ValueError("driver bug"),
        KeyboardInterrupt(),  # no answer at all: not counted
    ]
    for error in errors:
        metrics.count_request(account, "sms", 0.01, error)
    got = {
        o: value("smartpush_provider_requests_total", provider=account, outcome=o)
        for o in ("ok", "throttled", "transient", "permanent")
    }
    assert got == {"ok": 1, "throttled": 1, "transient": 1, "permanent": 3}
    assert value("smartpush_provider_latency_seconds_count", provider=account, channel="sms") == 6


def test_queue_lengths_of_the_stub_broker(tmp_path: Path, server: FakeProviderServer) -> None:
    make_project(tmp_path, server, "queues")
    config = load_config(tmp_path / "smartpush.yaml", env={})
    broker = StubBroker()
    dispatcher = Dispatcher(config, lambda run, segment: None, broker)
    dispatcher.enqueue("r1", 0, "normal")
    dispatcher.enqueue("r1", 1, "normal")
    dispatcher.enqueue("r2", 0, "bulk", delay_ms=60_000)
    found = metrics.LiveCollector(None, broker).queue_messages()
    assert ("smartpush-normal", "waiting", 2) in found
    assert ("smartpush-bulk", "delayed", 1) in found
    assert ("smartpush-urgent", "waiting", 0) in found


def test_queue_lengths_from_redis() -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, db=15, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("needs Redis on 127.0.0.1:6379 (.ci/run starts it)")
    client.delete("smartpush:smartpush-urgent", "smartpush:smartpush-bulk.DQ")
    client.rpush("smartpush:smartpush-urgent", "a", "b", "c")
    client.rpush("smartpush:smartpush-bulk.DQ", "d")
    collector = metrics.LiveCollector(None, "redis://127.0.0.1:6379/15")
    try:
        found = collector.queue_messages()
    finally:
        collector.close()
        client.delete("smartpush:smartpush-urgent", "smartpush:smartpush-bulk.DQ")
        client.close()
    assert ("smartpush-urgent", "waiting", 3) in found
    assert ("smartpush-bulk", "delayed", 1) in found
    assert ("smartpush-normal", "waiting", 0) in found


def test_an_unreachable_broker_leaves_the_queues_out(caplog: pytest.LogCaptureFixture) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    collector = metrics.LiveCollector(None, f"redis://:secret@127.0.0.1:{port}/0")
    assert list(collector.collect()) == []
    collector.close()
    assert "ConnectionError" in caplog.text and "secret" not in caplog.text


def test_endpoint_registry_adds_the_live_gauges(tmp_path: Path, server: FakeProviderServer) -> None:
    make_project(tmp_path, server, "endpoint")
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.migrate()
    metrics.count_sms_parts("endpoint-sms", "GSM-7", 2)
    text = generate_latest(metrics.endpoint_registry(ledger, StubBroker())).decode()
    assert 'smartpush_sms_parts_total{encoding="GSM-7",provider="endpoint-sms"} 2.0' in text
    assert "# TYPE smartpush_run_messages gauge" in text
    assert 'smartpush_queue_messages{queue="smartpush-normal",state="waiting"} 0.0' in text
    ledger.close()


# -- the worker's multiprocess folder ------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (
        "PROMETHEUS_MULTIPROC_DIR",
        "prometheus_multiproc_dir",
        "dramatiq_prom_db",
        "dramatiq_prom_port",
        "dramatiq_prom_host",
        workerboot.PORT_ENV,
    ):
        monkeypatch.setenv(name, "")  # recorded, so that whatever the test sets is undone after it
        monkeypatch.delenv(name)
    return monkeypatch


def dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(proc.stdout)


def test_wipe_keeps_the_files_of_running_processes(tmp_path: Path) -> None:
    folder = tmp_path / "prom"
    folder.mkdir()
    gone = dead_pid()
    for name in (f"counter_{gone}.db", f"gauge_livesum_{gone}.db", f"counter_{os.getpid()}.db", "notes.txt"):
        (folder / name).write_text("x")
    assert workerboot.wipe_metrics(folder) == 2
    assert sorted(p.name for p in folder.iterdir()) == [f"counter_{os.getpid()}.db", "notes.txt"]


def test_metrics_environment(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    assert workerboot.metrics_environment(None) is None  # nothing asked: nothing changes
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ

    folder = tmp_path / "prom"
    folder.mkdir()
    (folder / f"counter_{dead_pid()}.db").write_text("x")
    clean_env.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    assert workerboot.metrics_environment(None) is None  # the folder is the user's: not removed at exit
    assert os.environ[workerboot.DRAMATIQ_DB_ENV] == str(folder) and list(folder.iterdir()) == []

    clean_env.setenv("dramatiq_prom_db", str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="different folders"):
        workerboot.metrics_environment(None)


def test_metrics_port_without_a_folder_makes_a_private_one(clean_env: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    clean_env.setenv("dramatiq_prom_host", "127.0.0.1")
    made = workerboot.metrics_environment(port)
    try:
        assert made is not None and made.is_dir()
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == os.environ[workerboot.DRAMATIQ_DB_ENV] == str(made)
        assert os.environ[workerboot.PORT_ENV] == str(port)
    finally:
        if made is not None:
            made.rmdir()


def test_a_taken_metrics_port_is_refused(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        clean_env.setenv("dramatiq_prom_host", "127.0.0.1")
        with pytest.raises(InfrastructureError, match="pick another --metrics-port"):
            workerboot.metrics_environment(port)
        result = run_cli(
            "worker", "--metrics-port", str(port), cwd=tmp_path, env={"dramatiq_prom_host": "127.0.0.1"}
        )
    assert result.returncode == 4, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr and "--metrics-port" in result.stderr
