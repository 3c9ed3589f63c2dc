"""`smartpush serve` through real HTTP: the app served by uvicorn on a free port, httpx as the client.

Health and metrics, the unsubscribe page and RFC 8058 one-click exactly as Gmail sends it, forged
tokens, oversized and garbage bodies, errors without detail, an access log without tokens, and the
`smartpush serve` command started, asked and stopped as a process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from conftest import smartpush_exe
from sqlalchemy import create_engine, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from smartpush.config import Config, load_config
from smartpush.ledger import Ledger
from smartpush.ledger_schema import suppressions
from smartpush.serve import create_app
from smartpush.serve.limits import MAX_BODY_BYTES
from smartpush.unsubscribe import make_token, recipient_hash

GMAIL_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}
GMAIL_BODY = b"List-Unsubscribe=One-Click"
ADDRESS = "jeanne.martin@example.fr"


# -- helpers ------------------------------------------------------------------------------------------


@contextmanager
def served(app: Starlette) -> Iterator[str]:
    """``app`` served by uvicorn on 127.0.0.1 and a free port, in a thread; yields its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_project(directory: Path, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "smartpush.yaml"
    path.write_text(
        f"database: sqlite:///{directory / 'ledger.db'}\n"
        "public_url: https://notifications.example.org\n"
        "providers:\n  outbox:\n    type: outbox\n    path: outbox\n" + extra,
        encoding="utf-8",
    )
    return path


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(write_project(tmp_path / "site"))


@pytest.fixture
def ledger(config: Config) -> Iterator[Ledger]:
    ledger = Ledger(f"sqlite:///{config.project_dir / 'ledger.db'}")
    ledger.migrate()
    yield ledger
    ledger.close()


@pytest.fixture
def base(config: Config, ledger: Ledger) -> Iterator[str]:
    with served(create_app(config, ledger=ledger)) as url:
        yield url


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def token_for(
    config: Config, channel: str = "email", address: str = ADDRESS, campaign: str = "rappel"
) -> str:
    key = config.secret_key()
    return make_token(
        key, campaign=campaign, channel=channel, address_hash=recipient_hash(key, channel, address)
    )


def entries(config: Config) -> list[tuple[str, str, str, str]]:
    """The suppression list as (channel, address_hash, reason, source), read straight from the table."""
    engine = create_engine(f"sqlite:///{config.project_dir / 'ledger.db'}")
    try:
        with engine.connect() as conn:
            c = suppressions.c
            rows = conn.execute(select(c.channel, c.address_hash, c.reason, c.source)).all()
    finally:
        engine.dispose()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def assert_security_headers(response: httpx.Response) -> None:
    h = response.headers
    assert "default-src 'none'" in h["content-security-policy"]
    assert "script-src" not in h["content-security-policy"]
    assert h["x-content-type-options"] == "nosniff"
    assert h["referrer-policy"] == "no-referrer"
    assert h["x-frame-options"] == "DENY"
    assert h["cache-control"] == "no-store"
    assert "set-cookie" not in h


# -- /healthz and /metrics ----------------------------------------------------------------------------


def test_healthz_ok_when_embedded(base: str, client: httpx.Client) -> None:
    r = client.get(f"{base}/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "ledger": "ok", "broker": "embedded"}
    assert_security_headers(r)


def test_healthz_503_names_the_broker_without_its_address(
    tmp_path: Path, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there
    config = load_config(write_project(tmp_path / "p", f"broker: redis://:hunter2@127.0.0.1:{port}/0\n"))
    with served(create_app(config)) as base:
        r = client.get(f"{base}/healthz")
    assert r.status_code == 503
    assert r.json() == {"status": "unavailable", "ledger": "ok", "broker": "unreachable"}
    for text in (r.text, caplog.text):
        assert "hunter2" not in text and str(port) not in text
    assert "healthz: the broker does not answer" in caplog.text


def test_healthz_503_names_the_ledger_without_its_address(
    config: Config, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    ledger = Ledger(f"postgresql://smartpush:s3cret@127.0.0.1:{port}/nothing")  # never reachable
    with served(create_app(config, ledger=ledger)) as base:
        r = client.get(f"{base}/healthz")
    assert r.status_code == 503
    assert r.json() == {"status": "unavailable", "ledger": "unreachable", "broker": "embedded"}
    for text in (r.text, caplog.text):
        assert "s3cret" not in text and str(port) not in text


def test_healthz_ok_with_a_live_redis(tmp_path: Path, client: httpx.Client) -> None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=0.5).close()
    except OSError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    config = load_config(write_project(tmp_path / "p", "broker: redis://127.0.0.1:6379/0\n"))
    with served(create_app(config)) as base:
        r = client.get(f"{base}/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "ledger": "ok", "broker": "ok"}


def test_metrics_is_prometheus_text(base: str, client: httpx.Client) -> None:
    import smartpush.metrics  # noqa: F401 - registers smartpush's metrics in the default registry

    r = client.get(f"{base}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert re.search(r"^# TYPE smartpush_rate_limit_wait_seconds(_total)? counter$", r.text, re.M)


def test_metrics_shows_every_process_in_multiprocess_mode(
    tmp_path: Path, config: Config, ledger: Ledger, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "prom"
    folder.mkdir()
    other = (
        "from prometheus_client import Counter\n"
        "Counter('smartpush_messages', 'test', ['campaign', 'status']).labels('rappel', 'sent').inc(7)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    subprocess.run([sys.executable, "-c", other], env=env, check=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    with served(create_app(config, ledger=ledger)) as base:
        r = client.get(f"{base}/metrics")
    assert r.status_code == 200
    assert 'smartpush_messages_total{campaign="rappel",status="sent"} 7.0' in r.text


# -- /unsubscribe/{token}: the page --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "word"), [("email", "e-mail"), ("sms", "SMS"), ("push", "notifications")]
)
def test_the_page_is_accessible_french_and_changes_nothing(
    base: str, client: httpx.Client, config: Config, channel: str, word: str
) -> None:
    r = client.get(f"{base}/unsubscribe/{token_for(config, channel, campaign='rappel-grippe')}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert_security_headers(r)
    page = r.text
    assert re.search(r'<html lang="fr">', page)
    assert re.search(r'<form method="post">', page)
    assert re.search(r'<button type="submit"[^>]*>Me désabonner</button>', page)
    assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in page
    assert "« rappel-grippe »" in page and word in page
    assert "<script" not in page.lower() and "javascript:" not in page.lower()
    assert not re.search(r"(src|href)=", page)  # nothing to load: works offline, without CSS too
    assert "<title>" in page and "<h1>" in page and "<main>" in page
    # The inline style sheet is the only one the policy allows, by its hash.
    assert re.search(r"style-src 'sha256-[A-Za-z0-9+/=]+'", r.headers["content-security-policy"])
    assert client.head(f"{base}/unsubscribe/{token_for(config, channel)}").status_code == 200
    assert entries(config) == []  # a GET (a link scanner) unsubscribes nobody


def test_the_pages_own_form_unsubscribes(base: str, client: httpx.Client, config: Config) -> None:
    url = f"{base}/unsubscribe/{token_for(config, 'sms', '+33612345678')}"
    page = client.get(url).text
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]+)">', page))
    r = client.post(url, data=fields)  # what a browser sends for the form: urlencoded, same URL
    assert r.status_code == 200
    assert "Votre désabonnement est enregistré" in r.text and "Ce numéro de téléphone" in r.text
    key = config.secret_key()
    assert entries(config) == [
        ("sms", recipient_hash(key, "sms", "+33612345678"), "opt-out", "unsubscribe:rappel")
    ]


# -- /unsubscribe/{token}: RFC 8058 one-click ------------------------------------------------------------


def test_one_click_exactly_as_gmail_sends_it(base: str, config: Config) -> None:
    token = token_for(config, campaign="rappel-vaccination-grippe")
    # A bare client: no cookie jar, no redirects followed, only the headers Gmail sends.
    with httpx.Client(timeout=10, follow_redirects=False) as gmail:
        r = gmail.post(f"{base}/unsubscribe/{token}", headers=GMAIL_HEADERS, content=GMAIL_BODY)
        assert r.status_code == 200
        assert "set-cookie" not in r.headers and "location" not in r.headers
        assert_security_headers(r)
        expected = [
            (
                "email",
                recipient_hash(config.secret_key(), "email", ADDRESS),
                "opt-out",
                "unsubscribe:rappel-vaccination-grippe",
            )
        ]
        assert entries(config) == expected
        again = gmail.post(f"{base}/unsubscribe/{token}", headers=GMAIL_HEADERS, content=GMAIL_BODY)
        assert again.status_code == 200  # idempotent
        assert entries(config) == expected


def test_one_click_as_multipart_form_data(base: str, client: httpx.Client, config: Config) -> None:
    r = client.post(
        f"{base}/unsubscribe/{token_for(config, 'push', 'fcm-token-123')}",
        files={"List-Unsubscribe": (None, "One-Click")},
    )
    assert r.status_code == 200
    assert [e[0] for e in entries(config)] == ["push"]


def test_the_token_keeps_working_on_an_empty_ledger(tmp_path: Path, client: httpx.Client) -> None:
    """The token carries channel, hash and campaign: no run, message or recipient needs to exist."""
    config = load_config(write_project(tmp_path / "purged"))
    with served(create_app(config)) as base:
        r = client.post(f"{base}/unsubscribe/{token_for(config)}", headers=GMAIL_HEADERS, content=GMAIL_BODY)
    assert r.status_code == 200
    assert len(entries(config)) == 1


def _tampered(token: str) -> list[str]:
    payload, _, signature = token.partition(".")
    flip = {"A": "B"}.get(signature[0], "A")
    other = "eyJjIjoicmFwcGVsIiwiY2giOiJlbWFpbCIsImgiOiIwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMCJ9"
    return [
        f"{payload}.{flip}{signature[1:]}",  # signature changed
        f"{other}.{signature}",  # payload swapped (another address hash), signature kept
        payload,  # no signature
        "abc",
        "x" * 600,
    ]


def test_forged_and_damaged_tokens_are_a_plain_404(base: str, client: httpx.Client, config: Config) -> None:
    good = token_for(config)
    stranger = make_token(b"another-key", campaign="rappel", channel="email", address_hash="0" * 32)
    bodies = set()
    for token in [*_tampered(good), stranger]:
        for r in (
            client.get(f"{base}/unsubscribe/{token}"),
            client.post(f"{base}/unsubscribe/{token}", headers=GMAIL_HEADERS, content=GMAIL_BODY),
        ):
            assert r.status_code == 404, token
            assert '<html lang="fr">' in r.text and "Ce lien n’est pas valide" in r.text
            assert_security_headers(r)
            bodies.add(r.text)
    assert len(bodies) == 1  # the same page whatever was wrong: nothing to learn from it
    assert entries(config) == []


def test_a_token_with_an_unknown_channel_is_refused(base: str, client: httpx.Client, config: Config) -> None:
    key = config.secret_key()
    token = make_token(key, campaign="rappel", channel="fax", address_hash="0" * 32)
    assert client.get(f"{base}/unsubscribe/{token}").status_code == 404


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({}, b""),
        (GMAIL_HEADERS, b""),
        (GMAIL_HEADERS, b"List-Unsubscribe=Maybe"),
        (GMAIL_HEADERS, b"\xff\xfe\x00garbage=%%%&&=="),
        ({"Content-Type": "application/json"}, b'{"List-Unsubscribe": "One-Click"}'),
        ({"Content-Type": "text/plain"}, GMAIL_BODY),
        ({"Content-Type": "multipart/form-data"}, b"--x\r\nnot multipart at all"),
        ({"Content-Type": "multipart/form-data; boundary=x"}, b"--x\r\ngarbage\x00\xff"),
    ],
    ids=[
        "empty",
        "empty-form",
        "wrong-value",
        "garbage-form",
        "json",
        "text",
        "no-boundary",
        "bad-multipart",
    ],
)
def test_malformed_posts_are_400(
    base: str, client: httpx.Client, config: Config, headers: dict[str, str], body: bytes
) -> None:
    r = client.post(f"{base}/unsubscribe/{token_for(config)}", headers=headers, content=body)
    assert r.status_code == 400
    assert '<html lang="fr">' in r.text and "Traceback" not in r.text
    assert_security_headers(r)
    assert entries(config) == []


def test_a_file_in_the_form_is_400(base: str, client: httpx.Client, config: Config) -> None:
    r = client.post(
        f"{base}/unsubscribe/{token_for(config)}",
        data={"List-Unsubscribe": "One-Click"},
        files={"f": ("a.txt", b"hello", "text/plain")},
    )
    assert r.status_code == 400
    assert entries(config) == []


# -- request limits --------------------------------------------------------------------------------------


def test_a_declared_body_over_the_cap_is_413_before_reading(
    base: str, client: httpx.Client, config: Config
) -> None:
    big = b"List-Unsubscribe=One-Click&pad=" + b"x" * MAX_BODY_BYTES
    for path in (f"/unsubscribe/{token_for(config)}", "/webhooks/outbox", "/inbound/outbox"):
        r = client.post(f"{base}{path}", headers=GMAIL_HEADERS, content=big)
        assert r.status_code == 413, path
        assert "Traceback" not in r.text
        assert_security_headers(r)
    assert entries(config) == []


def test_a_chunked_body_growing_past_the_cap_is_413(base: str, client: httpx.Client, config: Config) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"List-Unsubscribe=One-Click&pad="
        for _ in range(MAX_BODY_BYTES // 4096 + 2):
            yield b"x" * 4096

    r = client.post(f"{base}/unsubscribe/{token_for(config)}", headers=GMAIL_HEADERS, content=chunks())
    assert r.status_code == 413
    assert entries(config) == []
    # Just under the cap, chunked, is fine.
    r = client.post(
        f"{base}/unsubscribe/{token_for(config)}", headers=GMAIL_HEADERS, content=iter([GMAIL_BODY])
    )
    assert r.status_code == 200


def test_methods_not_routed_are_405(base: str, client: httpx.Client, config: Config) -> None:
    assert client.delete(f"{base}/unsubscribe/{token_for(config)}").status_code == 405
    assert client.put(f"{base}/healthz").status_code == 405
    assert client.post(f"{base}/metrics").status_code == 405
    assert client.get(f"{base}/nothing-here").status_code == 404


def test_garbage_http_is_400(base: str) -> None:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        answer = s.recv(1024)
    assert answer.startswith(b"HTTP/1.1 400")


def test_an_unhandled_exception_is_a_generic_500_logged_without_detail(
    config: Config, ledger: Ledger, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(request: Request) -> Response:
        raise ValueError(f"cannot reach {request.path_params['who']}")

    app = create_app(config, ledger=ledger)
    app.router.routes.append(Route("/boom/{who}", boom, methods=["GET"]))
    caplog.set_level(logging.INFO, logger="smartpush")
    with served(app) as base:
        r = client.get(f"{base}/boom/jeanne.martin@example.fr")
    assert r.status_code == 500
    assert r.text == "Internal Server Error\n"
    assert_security_headers(r)
    assert "GET /boom/{who} failed: ValueError (answered 500)" in caplog.text
    assert "jeanne" not in caplog.text and "Traceback" not in caplog.text


def test_the_access_log_names_routes_never_tokens(
    config: Config, ledger: Ledger, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smartpush")
    token = token_for(config)
    with served(create_app(config, ledger=ledger)) as base:
        client.get(f"{base}/unsubscribe/{token}")
        client.post(f"{base}/unsubscribe/{token}", headers=GMAIL_HEADERS, content=GMAIL_BODY)
        client.post(f"{base}/webhooks/outbox?token=webhook-secret-xyz", json={"reference": "r1"})
        client.get(f"{base}/unsubscribe/{token}x/extra?address={ADDRESS}")
    access = [r.getMessage() for r in caplog.records if r.name == "smartpush.serve.access"]
    assert any(re.fullmatch(r"GET /unsubscribe/\{token\} 200 [\d.]+ ms", line) for line in access), access
    assert any(re.fullmatch(r"POST /unsubscribe/\{token\} 200 [\d.]+ ms", line) for line in access), access
    assert any(line.startswith("POST /webhooks/{account} ") for line in access), access
    assert any(line.startswith("GET (no route) 404 ") for line in access), access
    for secret in (token, token[:40], "webhook-secret-xyz", ADDRESS, "jeanne"):
        assert secret not in caplog.text
    assert "unsubscribe: email opt-out recorded (campaign rappel)" in caplog.text


# -- the command -------------------------------------------------------------------------------------------


def _start(project: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [smartpush_exe(), "serve", *args],
        cwd=project,
        # The access-log assertions read text lines (standard error is not a terminal: JSON otherwise).
        env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "SMARTPUSH_LOG_FORMAT": "text"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _wait_healthy(url: str, proc: subprocess.Popen[str]) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            return httpx.get(f"{url}/healthz", timeout=2)
        except httpx.TransportError:
            assert time.monotonic() < deadline, "smartpush serve did not answer"
            time.sleep(0.1)


def test_the_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    project = tmp_path / "p"
    write_project(project)
    port = free_port()
    proc = _start(project, "--port", str(port))
    try:
        r = _wait_healthy(f"http://127.0.0.1:{port}", proc)
        assert r.status_code == 200 and r.json()["ledger"] == "ok"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert f"listening on http://127.0.0.1:{port}" in stderr
    assert re.search(r"smartpush\.serve\.access: GET /healthz 200 [\d.]+ ms", stderr)
    assert "Traceback" not in stderr


def test_the_command_on_any_port_with_json_stops_on_sigint(tmp_path: Path) -> None:
    project = tmp_path / "p"
    write_project(project)
    proc = _start(project, "--port", "0", "--json")
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        assert started["ok"] is True and started["url"].startswith("http://127.0.0.1:")
        assert started["public_url"] == "https://notifications.example.org"
        assert _wait_healthy(started["url"], proc).status_code == 200
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert stdout == ""  # --json: the one JSON line, nothing else on stdout
    assert "Traceback" not in stderr


def test_the_command_says_when_the_port_is_taken(tmp_path: Path) -> None:
    project = tmp_path / "p"
    write_project(project)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _start(project, "--port", str(port))
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 4
    assert f"cannot listen on 127.0.0.1:{port}" in stderr and "pick another --port" in stderr


def test_the_help_says_how_to_expose_it() -> None:
    result = subprocess.run([smartpush_exe(), "serve", "--help"], capture_output=True, text=True, check=True)
    text = " ".join(result.stdout.split())
    assert "127.0.0.1" in text and "reverse proxy" in text and "TLS" in text and "public_url" in text
