"""How many delivery receipts per second ``smartpush serve`` absorbs into a PostgreSQL ledger (issue 6).

    .venv/bin/python bench/receipts.py [--messages 100000] [--seconds 30] [--concurrency 64]
        [--provider webhook|twilio] [--json] [--check] [--out bench/RESULTS.md]

On this machine: a fresh PostgreSQL database, pre-filled (COPY) with one run of ``--messages`` SMS in
status ``sent``, each with a provider reference. Then two more processes:

- **serve**: the app of :func:`smartpush.serve.create_app` under uvicorn, one process, one event loop,
  on a free loopback port, as ``smartpush serve`` runs it (access log off: the app's own access line
  goes to its logger). One provider account, ``webhook`` (JSON receipts, bearer secret) or ``twilio``
  (form-encoded status callbacks signed with ``X-Twilio-Signature``, checked against ``public_url``).
- **load**: an aiohttp client keeping ``--concurrency`` requests in flight, each one receipt
  (``delivered``) for the next message, until every message has had one or ``--seconds`` passed.

Measures: receipts/s = receipts answered 200 / the load's wall time (first request sent to last
answer); latency p50/p99 of those answers (send to answer, as the client sees it: the receipt is
committed when the answer comes); serve's CPU seconds (user + system, from ``wait4``) per 1,000
receipts; and, at the end, that every receipt answered 200 is in the ledger: as many ``receipts`` rows
and as many ``delivered`` messages as 200 answers (``all applied``), else exit 1.

``--check`` exits 3 when receipts/s is under ``--target`` (default 2,000). ``--out FILE`` appends a
section (machine, date, one row per run) to FILE, e.g. bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg

HERE = Path(__file__).resolve().parent
PG = "postgresql://postgres@127.0.0.1:5432"
ACCOUNT = "sms-main"
PUBLIC = "https://hooks.example.org"
SECRET = "bench-webhook-secret-" + "x" * 16
TWILIO_TOKEN = "bench-twilio-token-" + "y" * 13
SID = "AC" + "2" * 32


def log(text: str) -> None:
    sys.stderr.write(f"[receipts] {text}\n")
    sys.stderr.flush()


def reference(i: int) -> str:
    return f"SM{i:032x}"


# --- the database ----------------------------------------------------------------------------------


def create_database() -> str:
    name = f"bench_receipts_{secrets.token_hex(4)}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def prefill(url: str, messages: int) -> str:
    """A run of ``messages`` SMS, all ``sent`` with a reference; returns the run id."""
    from smartpush.ledger import Ledger, RunRecord, RunState

    ledger = Ledger(url)
    ledger.migrate()
    run, _ = ledger.create_run(
        RunRecord(
            id=f"bench{secrets.token_hex(8)}",
            campaign="bench-receipts",
            campaign_file="/srv/bench.yaml",
            config_file=None,
            channels=["sms"],
            state=RunState.RUNNING,
        )
    )
    ledger.close()
    sent_at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    with psycopg.connect(url) as conn, conn.cursor() as cursor:
        with cursor.copy("COPY recipients (run_id, recipient_id, segment, line, context) FROM STDIN") as copy:
            for i in range(messages):
                copy.write_row((run.id, f"p{i}", i // 500, i + 2, "{}"))
        columns = (
            "id, run_id, recipient_id, segment, channel, channel_index, provider, status, attempts, address, "
            "provider_reference, created_at, sending_at, sent_at, final_at, updated_at"
        )
        with cursor.copy(f"COPY messages ({columns}) FROM STDIN") as copy:
            for i in range(messages):
                copy.write_row(
                    (
                        f"m{i:010d}{run.id}",
                        run.id,
                        f"p{i}",
                        i // 500,
                        "sms",
                        0,
                        ACCOUNT,
                        "sent",
                        1,
                        f"+336{i % 100_000_000:08d}",
                        reference(i),
                        sent_at,
                        sent_at,
                        sent_at,
                        sent_at,
                        sent_at,
                    )
                )
        cursor.execute("ANALYZE messages")
    return run.id


def ledger_counts(url: str, run_id: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        statuses = dict(
            conn.execute(
                "SELECT status, count(*) FROM messages WHERE run_id = %s GROUP BY status", (run_id,)
            ).fetchall()
        )
        stored = conn.execute("SELECT count(*) FROM receipts").fetchone()
        applied = conn.execute("SELECT count(*) FROM receipts WHERE message_id IS NOT NULL").fetchone()
    return {
        "delivered": int(statuses.get("delivered", 0)),
        "sent": int(statuses.get("sent", 0)),
        "receipts": int(stored[0]) if stored else 0,
        "receipts_matched": int(applied[0]) if applied else 0,
    }


# --- serve: its own process ------------------------------------------------------------------------


def write_project(folder: Path, url: str, provider: str) -> Path:
    if provider == "twilio":
        account = (
            f"    type: twilio\n    account_sid: {SID}\n    auth_token: ${{BENCH_TWILIO_TOKEN}}\n"
            "    sender: MAIRIE\n"
        )
    else:
        account = (
            "    type: webhook\n    base_url: http://127.0.0.1:9\n    sender: MAIRIE\n"
            "    webhook_secret: ${BENCH_WEBHOOK_SECRET}\n"
        )
    path = folder / "smartpush.yaml"
    path.write_text(
        f"database: {url}\npublic_url: {PUBLIC}\nsecret_key: ${{BENCH_SECRET_KEY}}\n"
        f"providers:\n  {ACCOUNT}:\n{account}",
        encoding="utf-8",
    )
    return path


def child_env() -> dict[str, str]:
    return {
        **os.environ,
        "BENCH_TWILIO_TOKEN": TWILIO_TOKEN,
        "BENCH_WEBHOOK_SECRET": SECRET,
        "BENCH_SECRET_KEY": "k" * 48,
    }


def run_serve(config_path: str, http: str, loop: str) -> None:
    """The ``--role serve`` process: the app under uvicorn on a free port, printed once listening."""
    import uvicorn

    from smartpush.config import load_config
    from smartpush.serve import create_app

    config = load_config(Path(config_path))
    app = create_app(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            parser = "httptools" if "HttpTools" in self.config.http_protocol_class.__name__ else "h11"
            loop_kind = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
            print(port, parser, loop_kind, flush=True)

    server = Server(
        uvicorn.Config(
            app, lifespan="on", access_log=False, log_level="warning", backlog=4096, http=http, loop=loop
        )
    )
    server.run(sockets=[sock])


# --- load: its own process -------------------------------------------------------------------------


def run_load(port: int, provider: str, messages: int, seconds: float, concurrency: int) -> None:
    """The ``--role load`` process: prints one JSON line of results."""
    asyncio.run(_load(port, provider, messages, seconds, concurrency))


async def _load(port: int, provider: str, messages: int, seconds: float, concurrency: int) -> None:
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    path = f"/webhooks/{ACCOUNT}"
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    next_index = 0
    deadline = time.monotonic() + seconds

    def request(i: int) -> tuple[dict[str, str], Any, Any]:
        if provider == "twilio":
            form = {
                "MessageSid": reference(i),
                "MessageStatus": "delivered",
                "AccountSid": SID,
                "ErrorCode": "0",
            }
            data = PUBLIC + path + "".join(k + form[k] for k in sorted(form))
            digest = hmac.new(TWILIO_TOKEN.encode(), data.encode(), hashlib.sha1).digest()
            return {"X-Twilio-Signature": base64.b64encode(digest).decode()}, form, None
        return {"Authorization": f"Bearer {SECRET}"}, None, {"reference": reference(i), "status": "delivered"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < messages and time.monotonic() < deadline:
            i = next_index
            next_index += 1
            headers, form, document = request(i)
            started = time.perf_counter()
            try:
                async with session.post(base + path, headers=headers, data=form, json=document) as answer:
                    await answer.read()
                    status = answer.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        begin = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - begin
    latencies.sort()
    print(
        json.dumps(
            {
                "wall_s": wall,
                "ok": len(latencies),
                "statuses": statuses,
                "errors": errors,
                "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
                "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
                if latencies
                else None,
            }
        ),
        flush=True,
    )


# --- the orchestration -----------------------------------------------------------------------------


@dataclass
class Outcome:
    provider: str
    stack: str
    concurrency: int
    messages: int
    ok: int
    wall_s: float
    per_s: float
    p50_ms: float
    p99_ms: float
    serve_cpu_s: float
    serve_peak_rss_mib: float
    statuses: dict[str, int]
    ledger: dict[str, int]
    all_applied: bool


def own_peak_rss_mib(pid: int) -> float | None:
    """A running process's own peak RSS (``VmHWM``): ``wait4``'s ``ru_maxrss`` would be at least what
    this process (which wrote the messages) held when it started it."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        stdout=subprocess.PIPE,
        env=child_env(),
        text=True,
    )


def one_run(
    provider: str,
    messages: int,
    seconds: float,
    concurrency: int,
    folder: Path,
    http: str,
    loop: str,
    meter: Any = None,
) -> Outcome:
    """``meter`` (a bench.harness.Meter, as ``python -m bench`` passes it) is started with the load and
    stopped once serve is gone, on the run's database."""
    name = create_database()
    url = f"{PG}/{name}"
    try:
        started = time.monotonic()
        run_id = prefill(url, messages)
        log(f"{provider}: {messages:,} sent messages written in {time.monotonic() - started:.1f} s")
        config = write_project(folder, url, provider)
        serve = spawn(["--role", "serve", "--config", str(config), "--http", http, "--loop", loop])
        assert serve.stdout is not None
        port_text, parser, loop_kind = serve.stdout.readline().split()
        port = int(port_text)
        stack = f"uvicorn {parser} + {loop_kind}"
        log(f"{provider}: serve ({stack}) listens on 127.0.0.1:{port}; load with {concurrency} in flight")
        if meter is not None:
            meter.db_name = name
            meter.start()
        load = spawn(
            [
                "--role",
                "load",
                "--port",
                str(port),
                "--provider",
                provider,
                "--messages",
                str(messages),
                "--seconds",
                str(seconds),
                "--concurrency",
                str(concurrency),
            ]
        )
        out, _ = load.communicate(timeout=seconds + 120)
        result = json.loads(out.strip().splitlines()[-1])
        peak_mib = own_peak_rss_mib(serve.pid)  # before it exits: /proc has it while it runs
        serve.send_signal(signal.SIGTERM)  # as SIGINT, without the KeyboardInterrupt
        _, status, usage = os.wait4(serve.pid, 0)
        serve.returncode = os.waitstatus_to_exitcode(status)
        if meter is not None:
            meter.stop()
            meter.pg_after()
        counts = ledger_counts(url, run_id)
    finally:
        drop_database(name)
    ok = int(result["ok"])
    all_applied = counts["delivered"] == ok and counts["receipts"] == ok and counts["receipts_matched"] == ok
    return Outcome(
        provider=provider,
        stack=stack,
        concurrency=concurrency,
        messages=messages,
        ok=ok,
        wall_s=result["wall_s"],
        per_s=ok / result["wall_s"],
        p50_ms=result["p50_ms"] or 0.0,
        p99_ms=result["p99_ms"] or 0.0,
        serve_cpu_s=usage.ru_utime + usage.ru_stime,
        serve_peak_rss_mib=peak_mib if peak_mib is not None else usage.ru_maxrss / 1024,
        statuses={str(k): v for k, v in result["statuses"].items()}
        | {k: v for k, v in result["errors"].items()},
        ledger=counts,
        all_applied=all_applied,
    )


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def section(outcomes: list[Outcome], seconds: float, target: float) -> str:
    date = dt.date.today().isoformat()
    title = (
        "### receipts absorbed by `serve` (1 uvicorn process) into PostgreSQL, load from a second "
        f"process on loopback, up to {seconds:g} s — {date} — {machine()}"
    )
    head = (
        "| provider (auth) | serve's HTTP stack | in flight | receipts 200 | wall s | receipts/s "
        "| p50 ms | p99 ms | serve CPU s / 1,000 | all applied |"
    )
    lines = ["", title, "", head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    auth = {"webhook": "webhook (JSON, bearer secret)", "twilio": "twilio (form, X-Twilio-Signature)"}
    for o in outcomes:
        cells = [
            auth.get(o.provider, o.provider),
            o.stack,
            str(o.concurrency),
            f"{o.ok:,}",
            f"{o.wall_s:.1f}",
            f"{o.per_s:,.0f}",
            f"{o.p50_ms:.1f}",
            f"{o.p99_ms:.1f}",
            f"{1000 * o.serve_cpu_s / max(o.ok, 1):.2f}",
            (
                f"{'yes' if o.all_applied else 'NO'} ({o.ledger['delivered']:,} delivered, "
                f"{o.ledger['receipts']:,} stored)"
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        (
            f"target: ≥ {target:,.0f} receipts/s. Each request is one receipt for a distinct message, "
            "answered once it is committed; the writer commits whatever requests piled up while the previous "
            "transaction ran."
        ),
        (
            "the ledger held only the bench's messages (all `sent`, with references); the load and "
            "PostgreSQL share the machine's cores with serve. serve CPU s / 1,000: what 1,000 receipts "
            "cost serve's process whatever else runs; 1,000 / that is what one core of its own absorbs."
        ),
        (
            "Rerun: `.venv/bin/python bench/receipts.py --provider webhook,twilio --messages 150000 "
            "--seconds 30 --out bench/RESULTS.md`. The stack is uvicorn's `auto`: `httptools` and "
            "`uvloop` when importable (`pip install 'uvicorn[standard]'`), else `h11` and asyncio."
        ),
    ]
    lines += ["", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["bench", "serve", "load"], default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--provider", default="webhook", help="webhook, twilio, or both separated by a comma")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--target", type=float, default=2000.0)
    parser.add_argument("--http", default="auto", help="uvicorn's HTTP parser: auto, h11 or httptools")
    parser.add_argument("--loop", default="auto", help="uvicorn's event loop: auto, asyncio or uvloop")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.role == "serve":
        run_serve(args.config, args.http, args.loop)
        return 0
    if args.role == "load":
        run_load(args.port, args.provider, args.messages, args.seconds, args.concurrency)
        return 0
    import tempfile

    outcomes = []
    with tempfile.TemporaryDirectory(prefix="bench-receipts-") as tmp:
        for provider in args.provider.split(","):
            outcome = one_run(
                provider, args.messages, args.seconds, args.concurrency, Path(tmp), args.http, args.loop
            )
            log(
                f"{provider}: {outcome.ok:,} receipts in {outcome.wall_s:.1f} s = {outcome.per_s:,.0f}/s, "
                f"p50 {outcome.p50_ms:.1f} ms, p99 {outcome.p99_ms:.1f} ms, "
                f"all applied: {outcome.all_applied}"
            )
            outcomes.append(outcome)
    if args.json:
        print(json.dumps([asdict(o) for o in outcomes], indent=2))
    if args.out:
        with args.out.open("a", encoding="utf-8") as f:
            f.write(section(outcomes, args.seconds, args.target))
    if not all(o.all_applied for o in outcomes):
        log("some receipts answered 200 are missing from the ledger")
        return 1
    if args.check and any(o.per_s < args.target for o in outcomes):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
