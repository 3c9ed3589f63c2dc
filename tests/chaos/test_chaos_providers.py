"""Provider faults (issue 10, part 2): what each message ends as, and how many attempts it took.

A local programmable provider (``FakeProviderServer``, honouring ``Idempotency-Key`` like a real one)
answers 500s for a stretch, 429 with and without ``Retry-After``, later than the account's timeout,
with a connection cut mid-answer, never a receipt; a TLS endpoint whose certificate no client trusts
fails every handshake. The campaign runs in the embedded engine (SQLite ledger, in-process worker
threads), the same code path as the distributed one. SPEC "Message lifecycle": 5xx, timeouts and
connection errors are retried with backoff up to ``max_attempts`` and each counts as an attempt;
throttling waits (``Retry-After`` honoured) and does not; a failing account hands its messages to the
next account of the channel.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from smartpush.config import load_config
from smartpush.engine import Engine
from smartpush.launch import launch
from smartpush.ledger import MessageRecord, RunState, Status
from smartpush.loading import load_campaign
from smartpush.testing import FakeProviderServer, RecordedRequest, Reply

MAX_ATTEMPTS = 4
#: Skip a failing account after 3 failures, for the rest of the test.
QUICK_BREAKER = "{errors: 3, within: 60s, cooldown: 1h}"


@dataclass
class Outcome:
    messages: list[MessageRecord]
    took_s: float

    def by_id(self) -> dict[str, MessageRecord]:
        return {m.id: m for m in self.messages}

    def statuses(self) -> set[Status]:
        return {m.status for m in self.messages}


def account(name: str, url: str, extra: str = "") -> str:
    head = f"  {name}:\n    type: webhook\n    base_url: {url}\n"
    return f"{head}    sender: MAIRIE\n    concurrency: 20\n{extra}"


def run_campaign(
    tmp_path: Path, accounts: str, providers: str, rows: int, failover: str = "{}", timeout_s: float = 60
) -> Outcome:
    """Runs one campaign of ``rows`` SMS to the end in an embedded engine; its messages as stored.

    ``failover`` defaults to smartpush's (50 failures within 60 s skip an account for 5 min)."""
    (tmp_path / "smartpush.yaml").write_text(
        f"database: sqlite:///{tmp_path / 'ledger.db'}\nfailover: {failover}\nproviders:\n{accounts}",
        encoding="utf-8",
    )
    (tmp_path / "p.csv").write_text(
        "id;phone\n" + "".join(f"{i};06{i:08d}\n" for i in range(rows)), encoding="utf-8"
    )
    (tmp_path / "c.yaml").write_text(
        "name: fautes\ncategory: service\naudience: {source: p.csv, id: id}\n"
        f"channels:\n  - {{channel: sms, provider: {providers}, body: Bonjour.}}\n"
        f"retry: {{max_attempts: {MAX_ATTEMPTS}, backoff: {{min: 50ms, max: 200ms}}}}\n",
        encoding="utf-8",
    )
    config = load_config(tmp_path / "smartpush.yaml", env={})
    engine = Engine(config)
    worker = engine.worker(2)
    try:
        began = time.monotonic()
        run = launch(engine.rt, load_campaign(tmp_path / "c.yaml", config), enqueue=engine.enqueue).run
        deadline = time.monotonic() + timeout_s
        while (current := engine.rt.ledger.get_run(run.id)) is None or current.state is not RunState.FINISHED:
            assert time.monotonic() < deadline, engine.rt.ledger.counts(run.id)
            time.sleep(0.05)
        took = time.monotonic() - began
        messages = list(engine.rt.ledger.messages(run.id))
    finally:
        worker.stop()
        engine.close()
    assert len(messages) == rows  # counts add up: one message per recipient, every one final
    return Outcome(messages, took)


def assert_once_each(outcome: Outcome, *servers: FakeProviderServer) -> None:
    """Every message was delivered by exactly one provider, exactly once."""
    delivered: dict[str, int] = {}
    for server in servers:
        for key, n in server.delivered_per_key().items():
            delivered[key] = delivered.get(key, 0) + n
    assert delivered == {m.id: 1 for m in outcome.messages}


def test_500s_for_a_stretch_then_recovery(tmp_path: Path) -> None:
    rows, stretch = 40, 45  # fewer than the 50 failures that would make the breaker skip the account
    with FakeProviderServer(idempotent=True) as server:
        failures = iter(range(stretch))
        server.responder = lambda r: Reply(500) if next(failures, None) is not None else None
        outcome = run_campaign(tmp_path, account("sms", server.url), "sms", rows)
        requests = server.requests_per_key()
    assert outcome.statuses() == {Status.SENT}
    # Each 500 was an attempt and the one 2xx too: attempts are what the provider saw, no more.
    assert {m.id: m.attempts for m in outcome.messages} == dict(requests)
    assert sum(requests.values()) == rows + stretch
    assert max(m.attempts for m in outcome.messages) <= MAX_ATTEMPTS
    assert_once_each(outcome, server)


def test_500s_past_max_attempts_end_as_temporary_failures(tmp_path: Path) -> None:
    rows = 10
    with FakeProviderServer(idempotent=True) as server:
        server.responder = lambda r: Reply(500)
        outcome = run_campaign(tmp_path, account("sms", server.url), "sms", rows)
        requests = server.requests_per_key()
    assert outcome.statuses() == {Status.TEMPORARY_FAILURE}
    assert all(m.attempts == MAX_ATTEMPTS and requests[m.id] == MAX_ATTEMPTS for m in outcome.messages)
    assert not server.delivered_per_key()


def test_500s_fail_over_to_the_second_provider(tmp_path: Path) -> None:
    rows = 30
    with FakeProviderServer(idempotent=True) as main, FakeProviderServer(idempotent=True) as backup:
        main.responder = lambda r: Reply(503)
        accounts = account("main", main.url) + account("backup", backup.url)
        outcome = run_campaign(tmp_path, accounts, "[main, backup]", rows, QUICK_BREAKER)
        tried_main = main.requests_per_key()
    assert outcome.statuses() == {Status.SENT}
    assert {m.provider for m in outcome.messages} == {"backup"}
    for m in outcome.messages:  # a failed try on main is an attempt; then one on backup
        assert m.attempts == tried_main[m.id] + 1
    # The breaker opened after 3 failures: main saw the first batch's messages at most, once each.
    assert 3 <= sum(tried_main.values()) <= rows and max(tried_main.values()) == 1
    assert_once_each(outcome, main, backup)


@pytest.mark.parametrize("retry_after", ["1", None], ids=["with-retry-after", "without-retry-after"])
def test_429_waits_and_spends_no_attempt(tmp_path: Path, retry_after: str | None) -> None:
    rows, throttled = 20, 5
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    with FakeProviderServer(idempotent=True) as server:
        server.script([Reply(429, headers=headers)] * throttled)
        outcome = run_campaign(tmp_path, account("sms", server.url), "sms", rows)
        requests = server.requests
    assert outcome.statuses() == {Status.SENT}
    assert all(m.attempts == 1 for m in outcome.messages)  # throttled tries are not attempts
    first_tries = requests[:rows]
    refused = {r.idempotency_key for r in first_tries[:throttled]}
    again = [r for r in requests[rows:] if r.idempotency_key in refused]
    assert len(requests) == rows + throttled and len(again) == throttled
    # The account paused: Retry-After's 1 s, or smartpush's default wait of 1 s without one.
    last_429 = max(r.received_at for r in first_tries[:throttled])
    assert min(r.received_at for r in again) - last_429 >= 0.9
    assert_once_each(outcome, server)


def test_answers_slower_than_the_timeout_are_retried_and_delivered_once(tmp_path: Path) -> None:
    rows, slow = 20, 5
    with FakeProviderServer(idempotent=True) as server:
        server.script([Reply(delay_s=1.5)] * slow)  # accepted, but answered after the 0.3 s timeout
        outcome = run_campaign(tmp_path, account("sms", server.url, "    timeout: 300ms\n"), "sms", rows)
        requests = server.requests_per_key()
        replayed = server.replayed_per_key()
    assert outcome.statuses() == {Status.SENT}
    late = {k for k, n in requests.items() if n > 1}
    assert len(late) == slow
    for m in outcome.messages:  # the timed-out try was an attempt; the repeat, same key, was not sent
        assert m.attempts == (2 if m.id in late else 1) == requests[m.id]
    assert set(replayed) == late  # a provider ignoring the key would have sent these twice
    assert_once_each(outcome, server)


def test_connections_reset_mid_answer_are_retried(tmp_path: Path) -> None:
    rows, cut = 20, 5
    with FakeProviderServer(idempotent=True) as server:
        server.script([Reply(reset=True)] * cut)
        outcome = run_campaign(tmp_path, account("sms", server.url), "sms", rows)
        requests = server.requests_per_key()
    assert outcome.statuses() == {Status.SENT}
    reset = {k for k, n in requests.items() if n > 1}
    assert len(reset) == cut
    assert all(m.attempts == requests[m.id] == (2 if m.id in reset else 1) for m in outcome.messages)
    assert_once_each(outcome, server)


class UntrustedTls:
    """A TLS endpoint whose certificate no client trusts: every handshake fails; they are counted."""

    def __init__(self) -> None:
        cert = trustme.CA().issue_cert("127.0.0.1")
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.context)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        self.handshakes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.handshakes += 1
            conn.settimeout(2)
            try:
                with self.context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate: the failure under test
            finally:
                conn.close()

    @contextmanager
    def running(self) -> Iterator[UntrustedTls]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.sock.close()


def test_tls_handshake_failures_fail_over_to_the_second_provider(tmp_path: Path) -> None:
    rows = 20
    with UntrustedTls().running() as main, FakeProviderServer(idempotent=True) as backup:
        accounts = account("main", main.url) + account("backup", backup.url)
        outcome = run_campaign(tmp_path, accounts, "[main, backup]", rows, QUICK_BREAKER)
        handshakes = main.handshakes
    assert outcome.statuses() == {Status.SENT}
    assert {m.provider for m in outcome.messages} == {"backup"}
    # A refused handshake is a technical failure of that account: an attempt, then the next account.
    assert sum(m.attempts - 1 for m in outcome.messages) == handshakes >= 3
    assert all(m.attempts <= 2 for m in outcome.messages)
    assert_once_each(outcome, backup)


def test_tls_handshake_failures_without_a_second_provider_are_technical_failures(tmp_path: Path) -> None:
    rows = 5
    with UntrustedTls().running() as main:
        outcome = run_campaign(tmp_path, account("main", main.url), "main", rows)
        handshakes = main.handshakes
    assert outcome.statuses() == {Status.TECHNICAL_FAILURE}  # our side: no retry, no blame on recipients
    assert all(m.attempts == 1 and m.error_code == "tls" for m in outcome.messages)
    assert handshakes == rows


def test_a_provider_that_accepts_and_never_sends_a_receipt(tmp_path: Path) -> None:
    rows = 20
    with FakeProviderServer(idempotent=True) as server:

        def reference(request: RecordedRequest) -> Reply:
            return Reply(json={"id": f"ref-{request.idempotency_key}"})

        server.responder = reference
        outcome = run_campaign(tmp_path, account("sms", server.url), "sms", rows)
        time.sleep(1.0)  # nothing comes back, however long one waits: nothing is sent again either
        requests = server.requests_per_key()
    # Accepted is `sent`, with the provider's reference for a receipt that may come later; never
    # `delivered` without one, never sent again while waiting, and the run is finished all the same.
    assert outcome.statuses() == {Status.SENT}
    for m in outcome.messages:
        assert m.provider_reference == f"ref-{m.id}" and m.sent_at is not None and m.delivered_at is None
        assert m.attempts == 1 == requests[m.id]
    assert_once_each(outcome, server)
