"""No phone, email, push token or first name reaches a log line or a metric (SPEC.md "Personal data").

A real campaign goes through the `smartpush` command, with DEBUG logs as JSON, to an audience whose
every address and first name is distinctive, through providers that fail in every way they can and
echo the request back in their answers: HTTP 400 (with the number as the error code), 401, 429, 500,
422 "unregistered", a dropped connection, a 2xx that is not JSON, and an SMTP server that rejects
recipients quoting the address. Then every line of standard error (and of a `smartpush worker`'s log
in distributed mode), every metric of the processes that sent, and `status --json` / `runs --json`
are searched for each person's data in every form it could take.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from conftest import smartpush_exe
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from servers import services_up, throwaway_database

from smartpush.testing import FakeProviderServer, RecordedRequest, Reply

REDIS_DB = 7
#: First names no log line could contain by chance.
NAMES = (
    "Zéphyrine",
    "Anatolius",
    "Hermengarde",
    "Sigismonde",
    "Gondebaud",
    "Radegonde",
    "Frédégonde",
    "Childebertine",
    "Eulogius",
    "Brunehilde",
    "Théodulphe",
    "Ermentrude",
    "Wilfriedane",
    "Aldegonde",
    "Pépinette",
    "Carlomanne",
)
#: What each provider does with a person, by index modulo 8 (see the module docstring).
BEHAVIOURS = ("ok", "400-echo", "500", "429-once", "401", "2xx-not-json", "unregistered", "reset")


@dataclass(frozen=True)
class Person:
    index: int
    name: str
    national: str  # 06 12 34 56 78, as the audience file writes it
    e164: str
    email: str
    token: str

    @property
    def behaviour(self) -> str:
        return BEHAVIOURS[self.index % len(BEHAVIOURS)]

    def forms(self) -> list[str]:
        """Every way this person's data could be written: none may appear."""
        digits = self.e164[1:]
        local = self.email.split("@")[0]
        return [
            self.name,
            self.name.upper(),
            self.e164,
            digits,
            "0" + digits[2:],
            self.national,
            self.email,
            local,
            self.token,
            self.token[:24],
        ]


def people() -> list[Person]:
    found = []
    for i, name in enumerate(NAMES):
        seed = hashlib.sha256(name.encode()).hexdigest()
        eight = "".join(str(int(c, 16) % 10) for c in seed[:8])
        national = "06 " + " ".join(eight[k : k + 2] for k in range(0, 8, 2))
        ascii_name = name.encode("ascii", "ignore").decode().lower()
        found.append(
            Person(
                index=i,
                name=name,
                national=national,
                e164="+336" + eight,
                email=f"{ascii_name}.k{seed[8:13]}@courriel-prive.example",
                token=f"pt{i:02d}{seed[13:21]}:APA91b{seed[21:61]}",
            )
        )
    return found


PEOPLE = people()
BY_ADDRESS = {a: p for p in PEOPLE for a in (p.e164, p.token)}


def forbidden() -> list[str]:
    return [form for p in PEOPLE for form in p.forms()]


def leaks(text: str) -> list[str]:
    """The personal data found in ``text`` (and in its JSON lines once their escapes are decoded)."""
    decoded = [text]
    for line in text.splitlines():
        if line.startswith(("{", "[")):
            with contextlib.suppress(ValueError):
                decoded.append(json.dumps(json.loads(line), ensure_ascii=False))
    if text.lstrip().startswith(("{", "[")):
        with contextlib.suppress(ValueError):
            decoded.append(json.dumps(json.loads(text), ensure_ascii=False))
    everything = "\n".join(decoded).casefold()
    return sorted({form for form in forbidden() if form.casefold() in everything})


# -- providers that fail in every way ----------------------------------------------------------------


class Responder:
    """A webhook provider's answers by person, each echoing the request it answers.

    ``backup`` (the second SMS account) takes what the first one failed, except the 500s; ``push``
    accepts the people the SMS accounts answer 500 or drop: a single account that failed too often
    would be skipped by the failover breaker, and its messages would wait for it (slow, not wrong).
    """

    def __init__(self, *, backup: bool = False, push: bool = False) -> None:
        self.backup = backup
        self.push = push
        self.throttled: set[str] = set()

    def __call__(self, request: RecordedRequest) -> Reply:
        sent: Any = request.json or {}
        person = BY_ADDRESS.get(str(sent.get("to")))
        echo = {"echo": sent, "raw": request.body.decode("utf-8", "replace")}
        what = person.behaviour if person is not None else "ok"
        if self.backup:
            what = "500" if what == "500" else "ok"
        if self.push and what in ("500", "reset"):
            what = "ok"
        if what == "400-echo":
            to = sent.get("to")
            return Reply(400, json={"error": {"code": to, "message": f"invalid number {to}"}, **echo})
        if what == "500":
            return Reply(500, json={"error": {"code": "INTERNAL", "message": json.dumps(sent)}, **echo})
        if what == "429-once" and request.idempotency_key not in self.throttled:
            self.throttled.add(request.idempotency_key or "")
            return Reply(
                429, json={"error": {"code": "RATE", "message": str(sent)}}, headers={"Retry-After": "1"}
            )
        if what == "401":
            return Reply(401, json={"error": {"code": "AUTH", "message": f"no account for {sent}"}, **echo})
        if what == "2xx-not-json":
            return Reply(200, body=b"OK, sent to " + request.body)
        if what == "unregistered":
            return Reply(422, json={"error": {"code": "UNKNOWN_SUBSCRIBER", "to": sent.get("to")}, **echo})
        if what == "reset":
            return Reply(200, json={"id": "x", **echo}, reset=True)
        return Reply(200, json={"id": secrets.token_hex(8), **echo})


class RefusingSmtp:
    """An SMTP server whose refusals quote the recipient, the way real servers do."""

    def __init__(self) -> None:
        self.throttled: set[str] = set()
        self.delayed: set[str] = set()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        person = next((p for p in PEOPLE if p.email == address), None)
        what = person.behaviour if person is not None else "ok"
        if what in ("400-echo", "unregistered"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown in virtual table"
        if what == "500" and address not in self.delayed:
            self.delayed.add(address)
            return f"451 4.3.0 <{address}>: Temporary lookup failure"
        if what == "429-once" and address not in self.throttled:
            self.throttled.add(address)
            return f"450 4.7.1 <{address}>: too many messages, slow down"
        if what == "401":
            return f"550 5.7.1 <{address}>: relay access denied by policy"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(0)
        return f"250 2.0.0 queued for {', '.join(envelope.rcpt_tos)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Providers:
    sms_a: FakeProviderServer
    sms_b: FakeProviderServer
    push: FakeProviderServer
    smtp_port: int


@pytest.fixture
def providers() -> Iterator[Providers]:
    port = free_port()
    controller = Controller(RefusingSmtp(), hostname="127.0.0.1", port=port)
    controller.start()
    with (
        FakeProviderServer(responder=Responder()) as sms_a,
        FakeProviderServer(responder=Responder(backup=True)) as sms_b,
        FakeProviderServer(responder=Responder(push=True)) as push,
    ):
        try:
            yield Providers(sms_a, sms_b, push, port)
        finally:
            controller.stop()


CAMPAIGN = """\
name: rappel-prive
category: information
audience: {source: people.csv, id: id}
segments: {size: 5}
strategy: all
retry: {max_attempts: 3, backoff: {min: 100ms, max: 300ms}}
channels:
  - channel: sms
    provider: [sms-a, sms-b]
    body: "Bonjour {{ prenom }}, votre rendez-vous est le 3 mars."
  - channel: email
    provider: mail
    from: "Mairie <ne-pas-repondre@mairie.example>"
    subject: "{{ prenom }}, votre rendez-vous"
    text: "Bonjour {{ prenom }}, à bientôt."
  - channel: push
    provider: push
    title: "{{ prenom }}"
    body: "Votre rendez-vous, {{ prenom }}"
"""


def make_project(folder: Path, servers: Providers, settings: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    hook = "type: webhook\n    unregistered_codes: [UNKNOWN_SUBSCRIBER]\n    timeout: 5s"
    (folder / "smartpush.yaml").write_text(
        f"{settings}"
        "secret_key: ${SMARTPUSH_SECRET_KEY}\n"
        "public_url: https://notifications.mairie.example\n"
        "failover: {errors: 5, within: 60s, cooldown: 2s}\n"
        "providers:\n"
        f"  sms-a:\n    {hook}\n    base_url: {servers.sms_a.url}\n    sender: MAIRIE\n"
        f"  sms-b:\n    {hook}\n    base_url: {servers.sms_b.url}\n    sender: MAIRIE\n"
        f"  push:\n    {hook}\n    base_url: {servers.push.url}\n"
        f"  mail:\n    type: smtp\n    host: 127.0.0.1\n    port: {servers.smtp_port}\n"
        "    starttls: false\n    connections: 2\n",
        encoding="utf-8",
    )
    rows = ["id;prenom;phone;email;push_token"]
    rows += [f"P{p.index:03d};{p.name};{p.national};{p.email};{p.token}" for p in PEOPLE]
    (folder / "people.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "c.yaml").write_text(CAMPAIGN, encoding="utf-8")
    return folder


def env_for(metrics: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTPUSH_", "PROMETHEUS_"))}
    return {
        **env,
        "SMARTPUSH_SECRET_KEY": "k" * 32,
        "SMARTPUSH_LOG_LEVEL": "debug",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        "NO_COLOR": "1",
        "COLUMNS": "200",
        **extra,
    }


def run(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [smartpush_exe(), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def metrics_text(folder: Path) -> str:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
    return generate_latest(registry).decode()


def json_records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def assert_the_log_was_telling(records: list[dict[str, Any]]) -> None:
    """The search means something only if the log said a lot: per-message DEBUG lines, every
    failure, retries, throttling, failover, the codes providers echoed, the run's end."""
    debug = [r for r in records if r["level"] == "debug" and "message_id" in r]
    assert debug and all(len(str(r["recipient"])) == 16 for r in debug)  # the keyed hash
    statuses = {r.get("status") for r in debug}
    assert {"sent", "permanent-failure", "temporary-failure", "technical-failure", "created"} <= statuses
    assert any(r["status"] == "created" and r.get("retry_in_s") is not None and r.get("code") for r in debug)
    assert any(r.get("code") == "<redacted>" for r in debug)  # the number a provider gave as its code
    outcomes = {r.get("outcome") for r in records}
    assert {"launched", "split", "started", "finished", "throttled", "failover"} <= outcomes
    assert any(r["level"] == "warning" and r.get("status") == "technical-failure" for r in records)
    ended = [r for r in records if r.get("outcome") == "finished" and "counts" in r]
    assert ended and ended[-1]["messages"] == len(PEOPLE) * 3


# -- embedded ----------------------------------------------------------------------------------------


def test_an_embedded_run_logs_no_personal_data(tmp_path: Path, providers: Providers) -> None:
    project = make_project(tmp_path / "p", providers, f"database: sqlite:///{tmp_path / 'ledger.db'}\n")
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    env = env_for(metrics, SMARTPUSH_LOG_FORMAT="json")

    sent = run(["send", "c.yaml", "--yes"], project, env)

    assert sent.returncode == 3, sent.stderr[-3000:]  # some messages failed, as scripted
    received = [r.body.decode() for s in (providers.sms_a, providers.push) for r in s.requests]
    assert any(p.e164 in body for body in received for p in PEOPLE)  # the data really went out
    records = json_records(sent.stderr)
    for line in sent.stderr.splitlines():
        if line.startswith("{"):
            assert isinstance(json.loads(line), dict)
    assert_the_log_was_telling(records)
    assert leaks(sent.stderr) == []
    assert leaks(sent.stdout) == []

    exposed = metrics_text(metrics)
    assert "smartpush_" in exposed
    assert leaks(exposed) == []

    run_id = next(r["run_id"] for r in records if r.get("outcome") == "launched")
    status = run(["status", run_id, "--json"], project, env)
    listed = run(["runs", "--json"], project, env)
    assert status.returncode == 0 and listed.returncode == 0, status.stderr + listed.stderr
    assert run_id in status.stdout and run_id in listed.stdout
    assert leaks(status.stdout + status.stderr) == []
    assert leaks(listed.stdout + listed.stderr) == []


# -- distributed: a `smartpush worker` subprocess ----------------------------------------------------


def _services_up() -> bool:
    return services_up(REDIS_DB)


@pytest.fixture
def database() -> Iterator[str]:
    with throwaway_database("sp_privacy") as url:
        yield url


@pytest.fixture
def broker() -> str:
    import redis

    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    return f"redis://127.0.0.1:6379/{REDIS_DB}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.skipif(
    not _services_up(), reason="needs Redis and PostgreSQL on 127.0.0.1 (.ci/run starts them)"
)
def test_a_distributed_run_logs_no_personal_data(
    tmp_path: Path, providers: Providers, database: str, broker: str
) -> None:
    project = make_project(tmp_path / "p", providers, f"broker: {broker}\ndatabase: {database}\n")
    worker_metrics, send_metrics = tmp_path / "worker-metrics", tmp_path / "send-metrics"
    worker_metrics.mkdir()
    send_metrics.mkdir()
    log_path = tmp_path / "worker.log"
    # No SMARTPUSH_LOG_FORMAT: the worker sees a file, not a terminal, and picks JSON for itself and
    # for the Dramatiq processes it starts.
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [smartpush_exe(), "worker", "--processes", "1", "--threads", "2"],
            cwd=project,
            env=env_for(worker_metrics),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for(lambda: b"ready for action" in log_path.read_bytes(), 60, "the worker to start")
            sent = run(["send", "c.yaml", "--yes"], project, env_for(send_metrics))
            assert sent.returncode == 3, sent.stderr[-3000:]
        finally:
            stop(worker)
    text = log_path.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    for line in lines:  # everything the worker wrote is a JSON object: ops ship it as it is
        assert isinstance(json.loads(line), dict), line
    records = json_records(text)
    assert len({r["pid"] for r in records}) >= 2  # Dramatiq's parent and its worker process
    assert_the_log_was_telling(records + json_records(sent.stderr))
    assert leaks(text) == []
    assert leaks(sent.stderr) == []
    assert leaks(sent.stdout) == []
    assert leaks(metrics_text(worker_metrics)) == []
    assert leaks(metrics_text(send_metrics)) == []
