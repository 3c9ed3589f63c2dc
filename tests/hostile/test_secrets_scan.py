"""No secret and no personal data in anything smartpush prints, logs, exposes or keeps anonymous.

tests/test_no_personal_data.py already runs an embedded ``send`` (JSON logs) and a distributed
``worker`` against providers that fail in every way and echo what they were sent, and searches their
logs, metrics, ``status --json`` and ``runs --json`` for the audience's data. This file reuses its
audience, fake providers and search, and adds what it does not cover:

* **secrets** in the environment (the secret key, each provider account's API token and webhook
  secret, a Twilio auth token, an SMTP password, a database password) searched for everywhere, with
  a provider that echoes our Authorization header back in its error answers;
* the other commands: ``init``, ``plan``, ``validate``, ``report`` in every format, ``status --json``,
  ``runs``;
* both log formats (``SMARTPUSH_LOG_FORMAT=json`` and ``text``);
* ``serve``: its log, ``/metrics``, ``/healthz`` and the answers to genuine, forged and STOP webhooks;
* the ledger's anonymous columns: every column of ``runs``, ``receipts`` and ``suppressions``, and
  the error, code and reference columns of ``messages``;
* a ``smartpush worker`` in distributed mode (Redis db 6, a throwaway PostgreSQL database whose URL
  carries a password).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from conftest import smartpush_exe
from servers import flushed_redis, needs_services, throwaway_database
from test_no_personal_data import (
    PEOPLE,
    Providers,
    Responder,
    env_for,
    free_port,
    leaks,
    make_project,
    metrics_text,
    providers,
    run,
    stop,
    wait_for,
)

from smartpush.testing import RecordedRequest, Reply

__all__ = ["providers"]  # the fixture, imported so that pytest finds it here

REDIS_DB = 6
SECRETS = {
    "SMARTPUSH_SECRET_KEY": "sk-Kq7vWz3mXy9pR2tL8nB4cD6fG1hJ5",
    "SMS_TOKEN": "tok-Hj4kL9mN2pQ7rS1tV6wX3yZ8aB5cD0",
    "HOOK_SECRET": "whs-Fe2Gh7Jk1Lm6Np3Qr8St4Uv9Wx5Yz0",
    "TWILIO_AUTH_TOKEN": "twl-9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a",
    "SMTP_PASSWORD": "smtp-Pw-Zx8Cv7Bn6Mq5Wd4Ef3Rt2Yu1Io0",
}
PG_PASSWORD = "pg-Pw-Aa1Bb2Cc3Dd4Ee5Ff6Gg7Hh8"


def secrets_in(text: str) -> list[str]:
    everything = [text]
    for line in text.splitlines():
        if line.startswith(("{", "[")):
            with contextlib.suppress(ValueError):
                everything.append(json.dumps(json.loads(line)))
    joined = "\n".join(everything)
    values = [*SECRETS.values(), PG_PASSWORD]
    return [v for v in values if v in joined or v[4:20] in joined]


def assert_clean(what: str, text: str) -> None:
    assert secrets_in(text) == [], f"a secret in {what}"
    assert leaks(text) == [], f"personal data in {what}: {leaks(text)[:5]}"


def authorization(request: RecordedRequest) -> str | None:
    return next((v for k, v in request.headers.items() if k.lower() == "authorization"), None)


class EchoingAuth(Responder):
    """The fake SMS account, also echoing the Authorization header it got in its error answers."""

    def __call__(self, request: RecordedRequest) -> Reply:
        reply = super().__call__(request)
        if reply.status >= 400 and reply.json is not None:
            reply = Reply(
                reply.status,
                json={**reply.json, "auth": authorization(request)},
                headers=reply.headers,
            )
        return reply


SECRET_ACCOUNTS = (
    "  twilio-sms:\n    type: twilio\n    account_sid: AC" + "1" * 32 + "\n"
    "    auth_token: ${TWILIO_AUTH_TOKEN}\n    sender: MAIRIE\n"
    "  smtp-relay:\n    type: smtp\n    host: 127.0.0.1\n    port: 9\n    username: mairie\n"
    "    password: ${SMTP_PASSWORD}\n"
)


def secret_project(folder: Path, servers: Providers, settings: str) -> Path:
    """test_no_personal_data's project, with every account's credentials read from the environment."""
    project = make_project(folder, servers, settings)
    config = project / "smartpush.yaml"
    text = config.read_text(encoding="utf-8").replace(
        "    timeout: 5s\n",
        "    timeout: 5s\n    auth_token: ${SMS_TOKEN}\n    webhook_secret: ${HOOK_SECRET}\n",
    )
    config.write_text(text + SECRET_ACCOUNTS, encoding="utf-8")
    return project


def ledger_anonymous_text(db: Path) -> str:
    """Every value of the columns meant to hold no personal data, as text."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows: list[Any] = []
        for table in ("runs", "receipts", "suppressions"):
            rows += conn.execute(f"SELECT * FROM {table}").fetchall()
        rows += conn.execute(
            "SELECT id, run_id, recipient_id, provider, status, provider_reference, error_code, error_text "
            "FROM messages"
        ).fetchall()
        suppressed = conn.execute("SELECT count(*) FROM suppressions").fetchone()[0]
    assert rows and suppressed, "the ledger holds runs, messages and suppressions to search"
    return "\n".join(" ".join(map(str, row)) for row in rows)


@contextlib.contextmanager
def serving(project: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [smartpush_exe(), "serve", "--port", str(port)],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:

            def up() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
                return False

            wait_for(up, 60, "serve to answer")
            yield base
        finally:
            stop(proc)


def test_an_embedded_project_shows_no_secret_and_no_personal_data(
    tmp_path: Path, providers: Providers
) -> None:
    providers.sms_a.responder = EchoingAuth()
    db = tmp_path / "ledger.db"
    project = secret_project(tmp_path / "p", providers, f"database: sqlite:///{db}\n")
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    json_env = env_for(metrics, SMARTPUSH_LOG_FORMAT="json", **SECRETS)
    text_env = env_for(metrics, SMARTPUSH_LOG_FORMAT="text", **SECRETS)
    seen: dict[str, str] = {}

    def command(args: list[str], env: dict[str, str], codes: tuple[int, ...] = (0,)) -> str:
        done = run(args, project, env)
        name = " ".join(args) + f" ({env['SMARTPUSH_LOG_FORMAT']})"
        assert done.returncode in codes, f"{name}: {done.returncode}\n{done.stderr[-2000:]}"
        seen[name] = done.stdout + "\n" + done.stderr
        return done.stdout

    command(["init", str(tmp_path / "demo")], text_env)
    command(["validate", "c.yaml"], text_env)
    command(["plan", "c.yaml"], json_env)
    command(["plan", "c.yaml", "--json"], text_env)
    sent = json.loads(command(["send", "c.yaml", "--yes", "--json"], json_env, codes=(3,)))
    run_id = sent["run_id"]
    # the secrets really went out, so that their absence below means something
    assert any(authorization(r) == SECRETS["SMS_TOKEN"] for r in providers.sms_a.requests)
    assert any(p.e164 in r.body.decode() for r in providers.sms_a.requests for p in PEOPLE)

    for fmt in ("table", "csv", "json", "html"):
        command(["report", run_id, "--format", fmt], text_env)
    command(["status", run_id, "--json"], json_env)
    command(["status", run_id], text_env)
    command(["runs", "--json"], json_env)
    command(["runs"], text_env)
    assert "P000" in seen[f"report {run_id} --format csv (text)"]  # the report is really there

    # serve: /metrics, /healthz, a genuine receipt, a forged one, a STOP reply
    person = PEOPLE[0]
    reference = _a_reference(db)
    with serving(project, text_env, tmp_path / "serve.log") as base:
        auth = {"Authorization": f"Bearer {SECRETS['HOOK_SECRET']}"}
        answers = [
            httpx.get(f"{base}/metrics", timeout=10),
            httpx.get(f"{base}/healthz", timeout=10),
            httpx.post(
                f"{base}/webhooks/sms-a", json={"reference": reference, "status": "delivered"}, headers=auth
            ),
            httpx.post(
                f"{base}/webhooks/sms-a", json={"reference": reference, "status": "delivered"}, headers=auth
            ),
            httpx.post(f"{base}/webhooks/sms-a", json={"reference": reference, "status": "failed"}),
            httpx.post(f"{base}/inbound/sms-a", json={"from": person.e164, "text": "STOP"}, headers=auth),
            httpx.post(f"{base}/inbound/sms-a", json={"from": person.e164, "text": "STOP"}),
            httpx.post(f"{base}/webhooks/twilio-sms", data={"MessageSid": "SM1", "To": person.e164}),
        ]
        codes = [a.status_code for a in answers]
        assert codes == [200, 200, 200, 200, 403, 200, 403, 403], codes
        assert answers[2].json()["applied"] == 1 and answers[3].json()["applied"] == 0
        for answer in answers:
            assert_clean(f"serve's answer {answer.request.url.path}", answer.text)
        assert "smartpush_messages_total" in answers[0].text
    seen["serve log"] = (tmp_path / "serve.log").read_text(encoding="utf-8")
    assert "/webhooks/{account}" in seen["serve log"]  # the access log is there, with route templates

    seen["metrics"] = metrics_text(metrics)
    seen["ledger"] = ledger_anonymous_text(db)
    # both log formats really spoke: send's JSON lines, serve's text lines
    assert sum(line.startswith('{"') for line in seen["send c.yaml --yes --json (json)"].splitlines()) > 20
    assert not any(line.startswith("{") for line in seen["serve log"].splitlines())
    for name, text in seen.items():
        assert_clean(name, text)


def _a_reference(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute(
            "SELECT provider_reference FROM messages WHERE provider = 'sms-a' AND status = 'sent' "
            "AND provider_reference IS NOT NULL LIMIT 1"
        ).fetchone()
    assert row is not None, "a message sent through sms-a"
    return str(row[0])


@needs_services(REDIS_DB)
def test_a_distributed_worker_shows_no_secret(tmp_path: Path, providers: Providers) -> None:
    with throwaway_database("sp_secrets") as url, flushed_redis(REDIS_DB) as broker:
        database = url.replace("postgres@", f"postgres:{PG_PASSWORD}@")  # trust auth: the password is unused
        project = secret_project(tmp_path / "p", providers, "")
        metrics = tmp_path / "metrics"
        metrics.mkdir()
        env = env_for(
            metrics,
            SMARTPUSH_BROKER_URL=broker,
            SMARTPUSH_DATABASE_URL=database,
            SMARTPUSH_LOG_FORMAT="text",
            **SECRETS,
        )
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [smartpush_exe(), "worker", "--processes", "1", "--threads", "2"],
                cwd=project,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                wait_for(lambda: b"ready for action" in log.read_bytes(), 60, "the worker to start")
                sent = run(
                    ["send", "c.yaml", "--yes", "--json"], project, {**env, "SMARTPUSH_LOG_FORMAT": "json"}
                )
                assert sent.returncode == 3, sent.stderr[-3000:]
                status = run(["status", json.loads(sent.stdout)["run_id"], "--json"], project, env)
                assert status.returncode == 0, status.stderr
            finally:
                stop(worker)
        worker_log = log.read_text(encoding="utf-8")
        assert "ready for action" in worker_log and len(worker_log.splitlines()) > 20  # it spoke
        for name, text in [
            ("worker log", worker_log),
            ("send", sent.stdout + sent.stderr),
            ("status --json", status.stdout + status.stderr),
            ("metrics", metrics_text(metrics)),
        ]:
            assert_clean(name, text)
