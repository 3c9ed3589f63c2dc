"""How well smartpush holds a provider account's `rate` across worker processes (issue 5).

    .venv/bin/python bench/rate_accuracy.py [--rates 200,1000] [--seconds 30] [--workers 4] [--threads 4]
        [--concurrency 500] [--segment-size N] [--timeout S] [--json] [--check] [--out bench/RESULTS.md]

Per rate N, on this machine: a fresh PostgreSQL database, Redis db 10 (flushed before and after), a
project whose smartpush.yaml has `broker: redis://127.0.0.1:6379/10` and one `webhook` account with
`rate: N/s` and a high `concurrency`, pointed at an HTTP sink (a separate process, started by this
script) that answers 200 at once and records each request's arrival time (`time.monotonic()` in the sink
when the request's bytes are read) and its `Idempotency-Key`. The audience is N × seconds people from
bench/gen_audience.py, each given a phone, and the campaign one SMS channel: N × seconds messages.
`--workers` `smartpush worker --processes 1 --threads T` are started and awaited (each one has
heartbeated in Redis), then `smartpush send --detach`, then the ledger is polled until every message is
in a final status (`--timeout`, default 3 × seconds + 60 s, else a clear error and exit 1). Segments are
small enough that every worker thread has work for the whole run (about 4 segments per thread).

Measures, per rate:

- steady part: from the first arrival at the sink to the last, t_last − t_first; nothing else is left out.
  mean rate = (arrivals − 1) / (t_last − t_first): arrivals after the first, over that span. The mean
  error is (mean rate / N − 1) × 100 (signed: positive is too fast). The bucket starts full, so its
  initial burst (at most N/10 messages) is inside the span.
- worst 1-second window: the largest number of arrivals in any window [t, t + 1 s) (it is enough to try
  windows starting at an arrival), against the ceiling N + max(1, N/10) of SPEC.md (the bucket may burst
  a tenth of a second's worth).
- Redis commands per message, from `INFO commandstats` just before `smartpush send` and just after the
  last message became final (the bench's own INFO call taken out): every command the server ran in that
  time, Dramatiq's own broker traffic included, and so are commands run *inside* Lua scripts
  (commandstats counts those). It is server-wide: another user of this Redis server adds to it. Also the
  eval/evalsha calls per message (eval, evalsha and their _ro forms).
- the same window seen through `MONITOR` (off with `--no-monitor`), db 10 only, so other databases'
  traffic is out: client round trips per message, and the scripts split by SHA: Dramatiq's (`dispatch`
  runs every broker enqueue, fetch and ack) apart from the others (the rate limiter's, in distributed
  mode), plus the commands those scripts run inside Redis. MONITOR costs Redis a little per command;
  at these rates (thousands of commands a second) that is noise.

`--check` exits 3 when a rate's worst window is over its ceiling or its mean error is over 5 %.
`--out FILE` appends a section (machine, date, one row per rate) to FILE, e.g. bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import importlib.util
import json
import os
import platform
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import redis

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
PG = "postgresql://postgres@127.0.0.1:5432"
REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 10
NAMESPACE = "smartpush"  # Dramatiq's namespace in smartpush.queueing.make_broker
SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")
MAX_ERROR_PCT = 5.0


def log(text: str) -> None:
    sys.stderr.write(f"[rate_accuracy] {text}\n")
    sys.stderr.flush()


# --- the sink: a separate process, so its clock and loop never wait on this one -----------------------

OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 46\r\n"
    b"Connection: keep-alive\r\n\r\n" + b'{"id": "00000000-0000-0000-0000-000000000000"}'
)
DUMP_PATH = b"/__arrivals"


class RecordingSink(asyncio.Protocol):
    """Answers every request 200 at once; keeps each request's arrival time and Idempotency-Key."""

    arrivals: ClassVar[list[float]] = []
    keys: ClassVar[set[bytes]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            size = 0
            i = head.find(b"content-length:")
            if i >= 0:
                j = head.find(b"\r\n", i)
                size = int(head[i + 15 : j if j > 0 else None])
            if len(self.buffer) < end + 4 + size:
                return
            self.buffer = self.buffer[end + 4 + size :]
            line = head[: head.find(b"\r\n")]
            if DUMP_PATH in line:
                body = json.dumps({"arrivals": self.arrivals, "unique_keys": len(self.keys)}).encode()
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
                )
                self.transport.close()
                return
            self.arrivals.append(now)
            k = head.find(b"idempotency-key:")
            if k >= 0:
                e = head.find(b"\r\n", k)
                self.keys.add(head[k + 16 : e if e > 0 else None].strip())
            self.transport.write(OK)


async def serve_sink() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RecordingSink, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def fetch_arrivals(port: int) -> tuple[list[float], int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{DUMP_PATH.decode()}", timeout=30) as answer:
        data = json.loads(answer.read())
    return sorted(data["arrivals"]), int(data["unique_keys"])


# --- Redis: INFO commandstats, and MONITOR on db 10 ---------------------------------------------------


def command_calls(client: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def dramatiq_scripts() -> dict[str, str]:
    """SHA1 -> name of Dramatiq's broker scripts (``dispatch`` runs every enqueue, fetch and ack)."""
    try:
        from dramatiq.brokers import redis as dramatiq_redis

        scripts = dict(dramatiq_redis._scripts)
    except Exception:
        return {}
    return {
        hashlib.sha1(body if isinstance(body, bytes) else body.encode()).hexdigest(): name
        for name, body in scripts.items()
    }


class Monitor(threading.Thread):
    """Counts the commands of one database between two ECHO markers, from a raw MONITOR connection.

    Lines look like ``+1764000000.123456 [10 127.0.0.1:40000] "evalsha" "3f2a..." "1" ...``; commands
    run by a Lua script show ``[10 lua]``.
    """

    def __init__(self, db: int, start: str, stop: str, ignore_addr: str) -> None:
        super().__init__(daemon=True, name="redis-monitor")
        self.db, self.start_marker, self.stop_marker, self.ignore = db, start, stop, ignore_addr
        self.clients: Counter[str] = Counter()  # round trips by command
        self.in_scripts: Counter[str] = Counter()  # commands run by Lua scripts
        self.by_sha: Counter[str] = Counter()
        self.started = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.sock = socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=5)
        self.sock.sendall(b"MONITOR\r\n")
        reply = self.sock.recv(64)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"MONITOR refused: {reply!r}")
        self.sock.settimeout(None)
        self.rest = reply[reply.find(b"\r\n") + 2 :]

    def run(self) -> None:
        try:
            self._read()
        except OSError as exc:
            if not self.done.is_set():
                self.error = exc
        finally:
            self.started.set()
            self.done.set()

    def _read(self) -> None:
        prefix = f"[{self.db} ".encode()
        counting = False
        buf = self.rest
        while not self.done.is_set():
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise OSError("MONITOR connection closed")
            buf += chunk
            lines = buf.split(b"\r\n")
            buf = lines.pop()
            for line in lines:
                i = line.find(b" [")
                if i < 0 or not line.startswith(prefix, i + 1):
                    continue
                j = line.find(b"] ", i)
                addr = line[i + 1 + len(prefix) : j].decode()
                rest = line[j + 2 :]
                q = rest.find(b'"', 1)
                name = rest[1:q].decode().lower()
                if addr == self.ignore:
                    if name == "echo":
                        marker = rest[q + 3 : rest.find(b'"', q + 3)].decode()
                        if marker == self.start_marker:
                            counting = True
                            self.started.set()
                        elif marker == self.stop_marker:
                            self.done.set()
                            return
                    continue
                if not counting:
                    continue
                if addr == "lua":
                    self.in_scripts[name] += 1
                    continue
                self.clients[name] += 1
                if name in ("evalsha", "evalsha_ro"):
                    self.by_sha[rest[q + 3 : q + 43].decode()] += 1
                elif name in ("eval", "eval_ro"):
                    self.by_sha["(eval: script body sent)"] += 1

    def close(self) -> None:
        self.done.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


# --- processes ------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("SMARTPUSH_BROKER_URL", "SMARTPUSH_DATABASE_URL", "SMARTPUSH_CONFIG"):
        env.pop(name, None)  # they would override the bench's smartpush.yaml
    return env


def stop_groups(procs: list[subprocess.Popen[Any]], grace_s: float = 20.0) -> None:
    """SIGTERM each process group at once (a worker and the process Dramatiq forks), SIGKILL after grace_s.

    Dramatiq lets segments in progress finish on SIGTERM; whatever is still there at the deadline, or
    when this wait is itself interrupted, is killed.
    """

    def signal_all(signum: int) -> None:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signum)

    signal_all(signal.SIGTERM)
    try:
        deadline = time.monotonic() + grace_s
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
    finally:
        signal_all(signal.SIGKILL)  # stragglers, and any forked child that outlived its parent
        for proc in procs:
            proc.wait()


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + ln for ln in text[-lines:]) or "    (empty)"


class BenchError(Exception):
    pass


# --- one scenario ---------------------------------------------------------------------------------


@dataclass
class Result:
    rate: int
    messages: int
    counts: dict[str, int]
    arrivals: int
    duplicates: int
    span_s: float
    mean_rate: float
    error_pct: float
    worst_window: int
    worst_window_at_s: float
    ceiling: int
    within_ceiling: bool
    redis_window_s: float
    redis_commands_per_message: float
    redis_scripts_per_message: float
    monitor: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def worst_window(times: list[float], width: float = 1.0) -> tuple[int, float]:
    """Most arrivals in any [t, t + width), and its t; ``times`` sorted."""
    best, at, j = 0, times[0] if times else 0.0, 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + width:
            j += 1
        if j - i > best:
            best, at = j - i, start
    return best, at


def write_project(root: Path, rate: int, rows: int, port: int, db: str, args: argparse.Namespace) -> int:
    spec = importlib.util.spec_from_file_location("gen_audience", HERE / "gen_audience.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rng = random.Random(rate)
    columns = ["numero_assure", "prenom", "nom", "age", "phone", "email", "push_token", "date_limite"]
    with (root / "people.csv").open("w", encoding="utf-8", newline="") as f:
        f.write(";".join(columns) + "\n")
        for i in range(rows):
            r = gen.row(i, rng, 0.0)
            if not r["phone"]:  # gen_audience leaves 15 % without a phone: every row sends here
                r["phone"] = gen.phone(rng)
            f.write(";".join(r[c] for c in columns) + "\n")
    segment = args.segment_size or min(500, max(5, rows // (args.workers * args.threads * 4)))
    (root / "smartpush.yaml").write_text(
        f"broker: redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}\n"
        f"database: {PG}/{db}\n"
        "providers:\n"
        "  hook:\n"
        "    type: webhook\n"
        f"    base_url: http://127.0.0.1:{port}\n"
        "    path: /sms\n"
        "    sender: MAIRIE\n"
        f"    rate: {rate}/s\n"
        f"    concurrency: {args.concurrency}\n"
        "    timeout: 30s\n"
    )
    (root / "c.yaml").write_text(
        "name: rate-accuracy\ncategory: service\n"
        "audience: {source: people.csv, id: numero_assure}\n"
        f"segments: {{size: {segment}}}\n"
        "channels:\n"
        "  - channel: sms\n"
        "    provider: hook\n"
        "    body: 'Bonjour {{ prenom }}, rappel avant le {{ date_limite }}.'\n"
    )
    return segment


def scenario(rate: int, args: argparse.Namespace, stack: contextlib.ExitStack) -> Result:
    rows = rate * args.seconds
    db = f"sp_rate_{secrets.token_hex(3)}"
    smartpush = str(BIN / "smartpush")
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")

    def drop_db() -> None:
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")

    stack.callback(drop_db)
    control = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB, single_connection_client=True)
    stack.callback(control.close)
    control.flushdb()
    stack.callback(control.flushdb)  # runs before close (LIFO): no queued segment outlives the bench

    sink = subprocess.Popen(
        [sys.executable, __file__, "--serve-sink"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    stack.callback(stop_groups, [sink], 5.0)
    assert sink.stdout is not None
    first = sink.stdout.readline()
    if not first.strip().isdigit():
        raise BenchError(f"the sink did not start (it printed {first!r})")
    port = int(first)

    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rate_accuracy_")))
    segment = write_project(root, rate, rows, port, db, args)
    config = root / "smartpush.yaml"
    log(f"{rate}/s: {rows:,} recipients, segments of {segment}, database {db}, sink on port {port}")

    env = child_env()
    workers: list[tuple[subprocess.Popen[bytes], Path]] = []
    stack.callback(lambda: stop_groups([proc for proc, _ in workers]))
    for k in range(args.workers):
        path = root / f"worker{k}.log"
        out = stack.enter_context(path.open("wb"))
        proc = subprocess.Popen(
            [
                smartpush,
                "worker",
                "--config",
                str(config),
                "--processes",
                "1",
                "--threads",
                str(args.threads),
            ],
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        workers.append((proc, path))

    def check_workers() -> None:
        for k, (proc, path) in enumerate(workers):
            if proc.poll() is not None:
                raise BenchError(f"worker {k} exited with code {proc.returncode}; its log:\n{tail(path)}")

    heartbeats = f"{NAMESPACE}:__heartbeats__"
    deadline = time.monotonic() + 60
    while int(control.zcard(heartbeats)) < args.workers:  # each worker's broker fetches: it is consuming
        check_workers()
        if time.monotonic() > deadline:
            logs = "\n".join(f"  worker {k}:\n{tail(p)}" for k, (_, p) in enumerate(workers))
            raise BenchError(f"the workers were not consuming after 60 s:\n{logs}")
        time.sleep(0.1)

    monitor: Monitor | None = None
    start, stop = f"ratebench:start:{secrets.token_hex(4)}", f"ratebench:stop:{secrets.token_hex(4)}"
    if args.monitor:
        monitor = Monitor(REDIS_DB, start, stop, ignore_addr=str(control.client_info()["addr"]))
        stack.callback(monitor.close)
        monitor.start()
    control.echo(start)
    if monitor is not None and (not monitor.started.wait(10) or monitor.error is not None):
        raise BenchError(f"MONITOR saw no start marker within 10 s ({monitor.error or 'no error'})")
    before = command_calls(control)
    t_before = time.monotonic()

    launched = subprocess.run(
        [smartpush, "send", "c.yaml", "--config", str(config), "--yes", "--detach", "--json"],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=max(120, rows / 1000),
    )
    if launched.returncode != 0:
        raise BenchError(f"smartpush send exited {launched.returncode}:\n{launched.stderr}{launched.stdout}")
    run_id = json.loads(launched.stdout)["run_id"]

    from smartpush.ledger import FINAL, Ledger

    ledger = Ledger(f"{PG}/{db}")
    stack.callback(ledger.close)
    timeout = args.timeout or 3 * args.seconds + 60
    deadline, shown = time.monotonic() + timeout, time.monotonic()
    while True:
        raw = ledger.counts(run_id)
        counts = {f"{c}:{s.value}": n for (c, s), n in raw.items()}
        final = sum(n for (_, s), n in raw.items() if s in FINAL)
        total = sum(counts.values())
        if total >= rows and final == total:
            break
        check_workers()
        if time.monotonic() > deadline:
            logs = "\n".join(f"  worker {k}:\n{tail(p, 8)}" for k, (_, p) in enumerate(workers))
            raise BenchError(
                f"timed out after {timeout:.0f} s (--timeout): {final:,} of {rows:,} messages final, "
                f"counts {counts}; at {rate}/s they need about {args.seconds} s. Worker logs:\n{logs}"
            )
        if time.monotonic() - shown > 5:
            log(f"{rate}/s: {final:,} of {rows:,} messages final")
            shown = time.monotonic()
        time.sleep(0.2)
    after = command_calls(control)
    redis_window_s = time.monotonic() - t_before
    control.echo(stop)
    after["info"] = after.get("info", 0) - 1  # the bench's own INFO call for `before`
    if monitor is not None and (not monitor.done.wait(30) or monitor.error is not None):
        raise BenchError(f"MONITOR did not reach the stop marker ({monitor.error or 'still reading'})")

    arrivals, unique = fetch_arrivals(port)
    sent = sum(n for k, n in counts.items() if k.endswith((":sent", ":delivered")))
    if len(arrivals) < 2:
        raise BenchError(f"the sink saw {len(arrivals)} requests: nothing to measure (counts {counts})")
    span = arrivals[-1] - arrivals[0]
    mean = (len(arrivals) - 1) / span
    worst, worst_at = worst_window(arrivals)
    ceiling = rate + max(1, rate // 10)
    diff = {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0) > 0}
    scripts = sum(diff.get(k, 0) for k in SCRIPT_COMMANDS)
    per = max(1, sent)
    mon: dict[str, Any] | None = None
    if monitor is not None:
        ours = dramatiq_scripts()
        broker_scripts = sum(n for sha, n in monitor.by_sha.items() if sha in ours)
        other_scripts = sum(monitor.by_sha.values()) - broker_scripts
        mon = {
            "round_trips_per_message": sum(monitor.clients.values()) / per,
            "broker_script_calls_per_message": broker_scripts / per,
            "other_script_calls_per_message": other_scripts / per,
            "commands_inside_scripts_per_message": sum(monitor.in_scripts.values()) / per,
            "round_trips": dict(monitor.clients.most_common()),
            "script_calls_by_sha": {
                (f"dramatiq {ours[sha]} " if sha in ours else "") + sha: n
                for sha, n in monitor.by_sha.items()
            },
            "inside_scripts": dict(monitor.in_scripts.most_common()),
        }
    return Result(
        rate=rate,
        messages=sent,
        counts=counts,
        arrivals=len(arrivals),
        duplicates=len(arrivals) - unique,
        span_s=span,
        mean_rate=mean,
        error_pct=(mean / rate - 1) * 100,
        worst_window=worst,
        worst_window_at_s=worst_at - arrivals[0],
        ceiling=ceiling,
        within_ceiling=worst <= ceiling,
        redis_window_s=redis_window_s,
        redis_commands_per_message=sum(diff.values()) / per,
        redis_scripts_per_message=scripts / per,
        monitor=mon,
        settings={"recipients": rows, "segment_size": segment, "commandstats_delta": diff},
    )


# --- report ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": cores, "cpu": cpu, "python": platform.python_version(), "date": str(dt.date.today())}


def table(results: list[Result], args: argparse.Namespace, where: dict[str, Any]) -> str:
    title = (
        f"### rate accuracy, one webhook account, Redis + PostgreSQL + {args.workers} worker processes × "
        f"{args.threads} threads, {args.seconds} s per rate — {where['date']} — {where['cores']} cores, "
        f"{where['cpu']}, Python {where['python']}"
    )
    head = [
        (
            "| rate/s | messages | steady s | mean rate/s | mean error | worst 1-s window (ceiling) "
            "| Redis commands/msg | eval+evalsha/msg | db 10 round trips/msg | limiter scripts/msg |"
        ),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = []
    for r in results:
        m = r.monitor
        seen = (
            f"{m['round_trips_per_message']:.2f} | {m['other_script_calls_per_message']:.2f}"
            if m
            else "– | –"
        )
        rows.append(
            f"| {r.rate:,} | {r.messages:,} | {r.span_s:.1f} | {r.mean_rate:,.1f} | {r.error_pct:+.1f} % "
            f"| {r.worst_window:,} ({r.ceiling:,}){'' if r.within_ceiling else ' — over'} "
            f"| {r.redis_commands_per_message:.2f} | {r.redis_scripts_per_message:.2f} | {seen} |"
        )
    notes = [
        "",
        (
            "- steady s: first to last arrival at the sink; mean rate = (arrivals − 1) / steady s;"
            " mean error = mean rate / target − 1; worst window: most arrivals in any [t, t + 1 s),"
            " ceiling N + max(1, N/10)."
        ),
        (
            "- Redis commands/msg and eval+evalsha/msg: `INFO commandstats` from just before `send`"
            " to the last message final, server-wide, Dramatiq's broker and commands run inside Lua"
            " included; db 10 round trips and limiter scripts (evalsha/eval other than Dramatiq's own"
            " script): MONITOR on db 10 over the same window."
        ),
    ]
    for r in results:
        if r.duplicates or r.arrivals != r.messages:
            notes.append(
                f"- {r.rate}/s: {r.arrivals:,} arrivals for {r.messages:,} sent ({r.duplicates} duplicates)"
            )
    return "\n".join([title, "", *head, *rows, *notes, ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="200,1000", help="comma-separated messages per second")
    ap.add_argument("--seconds", type=int, default=30, help="each rate sends rate × seconds messages")
    ap.add_argument("--workers", type=int, default=4, help="`smartpush worker --processes 1` to start")
    ap.add_argument("--threads", type=int, default=4, help="threads per worker process")
    ap.add_argument("--concurrency", type=int, default=500, help="the account's requests in flight")
    ap.add_argument("--segment-size", type=int, help="default: about 4 segments per worker thread, ≤ 500")
    ap.add_argument("--timeout", type=float, help="seconds to wait for a run (default 3 × seconds + 60)")
    ap.add_argument("--no-monitor", dest="monitor", action="store_false", help="skip the MONITOR breakdown")
    ap.add_argument("--json", action="store_true", help="print only JSON on standard output")
    ap.add_argument("--check", action="store_true", help="exit 3 if a window or the mean error is off")
    ap.add_argument("--out", type=Path, help="append a results section to this file")
    args = ap.parse_args()
    try:
        rates = [int(r.strip().removesuffix("/s")) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--rates: whole numbers separated by commas, such as 200,1000 (not {args.rates!r})")
    if not rates or min(rates) < 1 or args.seconds < 1 or args.workers < 1 or args.threads < 1:
        ap.error("--rates, --seconds, --workers and --threads must be at least 1")

    def terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    results: list[Result] = []
    try:
        for rate in rates:
            with contextlib.ExitStack() as stack:  # workers, sink, MONITOR, Redis db 10, database: undone
                results.append(scenario(rate, args, stack))
                log(f"{rate}/s: done, cleaning up")
    except BenchError as exc:
        log(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        log("interrupted: workers and sink stopped, database dropped, Redis db 10 flushed")
        return 130

    where = machine()
    text = table(results, args, where)
    if args.json:
        settings = vars(args) | {"rates": rates, "out": str(args.out) if args.out else None}
        print(
            json.dumps(
                {"machine": where, "settings": settings, "results": [asdict(r) for r in results]}, indent=2
            )
        )
    else:
        print(text)
    if args.out:
        with args.out.open("a", encoding="utf-8") as f:
            f.write("\n" + text)
    off = [r for r in results if not r.within_ceiling or abs(r.error_pct) > MAX_ERROR_PCT]
    return 3 if args.check and off else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-sink"]:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_sink())
    else:
        sys.exit(main())
