"""Benchmark: how long an urgent campaign waits while a bulk run of 1,000,000 recipients fills every worker.

    .venv/bin/python bench/priority_latency.py [--rows 1000000] [--repeats 3] [--segment-size 10000]
        [--threads 8] [--delay-ms 50] [--out bench/RESULTS.md]

On this machine, as bench/send_100k.py (whose HTTP sink and settings it reuses): Redis db 10 (flushed
before and after; `--redis-db` picks another while a second benchmark uses that one),
a fresh PostgreSQL database, bench/sink.py standing in for the SMS provider (two accounts on it, `bulk`
and `alert`, each with its own limits), and `smartpush worker --processes 2`. The bulk audience comes
from bench/gen_audience.py (85 % of its rows have a phone); the urgent campaign has 10 recipients.

1. With idle workers, the urgent campaign is launched `--repeats` times (the floor).
2. The bulk campaign (`priority: bulk`, segments of `--segment-size`) is launched; once its split is
   done and every worker thread holds one of its segments, the urgent campaign is launched `--repeats`
   times more, a few seconds apart, while the bulk run goes on.

Measured for each urgent launch: from starting `smartpush send --detach` to the first `sent_at` of the
urgent run in the ledger (time to first send) and to its last (time to all sent); the `send` command's
own time (Python start-up, split, queueing), which is part of both. Also how far the bulk run got, and
how many times a bulk segment gave its thread up (the workers' "yields its thread" log lines). The bulk
run is cancelled at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import redis
from send_100k import BIN, HERE, PG, REDIS_DB, start_sink

from smartpush.ledger import Ledger, RunState, Status

URGENT_ROWS = 10
#: Between two urgent launches under load: the previous one's segment is acked and the bulk run settles.
PAUSE_S = 5.0


def log(text: str) -> None:
    sys.stderr.write(f"[priority_latency] {text}\n")


def write_project(root: Path, database: str, port: int, args: argparse.Namespace) -> Path:
    """smartpush.yaml (the accounts `bulk` and `alert` on the sink), bulk.yaml and urgent.yaml."""
    config = root / "smartpush.yaml"
    accounts = "".join(
        f"  {name}:\n    type: webhook\n    base_url: http://127.0.0.1:{port}\n    path: /sms\n"
        f"    sender: {sender}\n    concurrency: {args.concurrency}\n    timeout: 60s\n"
        for name, sender in (("bulk", "MAIRIE"), ("alert", "PREFET"))
    )
    config.write_text(
        f"broker: redis://127.0.0.1:6379/{args.redis_db}\ndatabase: {database}\nproviders:\n{accounts}",
        encoding="utf-8",
    )
    for name, rows, seed, segment in (
        ("bulk", args.rows, 1, args.segment_size),
        ("urgent", URGENT_ROWS, 2, 100),
    ):
        subprocess.run(
            [
                sys.executable,
                str(HERE / "gen_audience.py"),
                str(rows),
                str(root / f"{name}.csv"),
                "--seed",
                str(seed),
            ],
            check=True,
        )
        (root / f"{name}.yaml").write_text(
            f"name: {name}\ncategory: service\npriority: {name}\n"
            f"audience: {{source: {name}.csv, id: numero_assure}}\nsegments: {{size: {segment}}}\n"
            f"channels:\n  - {{channel: sms, provider: {'alert' if name == 'urgent' else 'bulk'}, "
            f"body: 'Bonjour {{{{ prenom }}}}, message {name}.'}}\n",
            encoding="utf-8",
        )
    return config


def send(root: Path, campaign: str) -> tuple[str, float]:
    """`smartpush send CAMPAIGN --detach`: the run id and the command's own time."""
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "smartpush"), "send", campaign, "--yes", "--detach", "--json"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)["run_id"], time.monotonic() - started


def urgent_once(root: Path, ledger: Ledger) -> tuple[float, float, float, float]:
    """Launch the urgent campaign and wait for it.

    Returns seconds: the send command, launch → first sent, launch → all sent, queued → first sent.
    """
    launched = dt.datetime.now(dt.UTC)
    run_id, command_s = send(root, "urgent.yaml")
    deadline = time.monotonic() + 300
    while (run := ledger.get_run(run_id)) is None or run.state is not RunState.FINISHED:
        if time.monotonic() > deadline:
            raise SystemExit(f"the urgent run {run_id} is not done after 300 s: {ledger.counts(run_id)}")
        time.sleep(0.05)
    sent = [m.sent_at for m in ledger.messages(run_id, statuses=[Status.SENT]) if m.sent_at is not None]
    if not sent:
        raise SystemExit(f"the urgent run {run_id} sent nothing: {ledger.counts(run_id)}")
    first, last = (min(sent) - launched).total_seconds(), (max(sent) - launched).total_seconds()
    assert run.started_at is not None  # the split is done, then its segment is queued
    waited = (min(sent) - run.started_at).total_seconds()
    log(f"urgent run {run_id}: send {command_s:.2f} s, first sent {first:.2f} s (queued → {waited:.2f} s)")
    return command_s, first, last, waited


def bulk_sent(ledger: Ledger, run_id: str) -> int:
    return ledger.counts(run_id).get(("sms", Status.SENT), 0)


def machine() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{dt.date.today()} — {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="bulk audience rows")
    ap.add_argument("--repeats", type=int, default=3, help="urgent launches, idle and under load")
    ap.add_argument("--segment-size", type=int, default=10_000, help="bulk segments (10,000: the largest)")
    ap.add_argument("--threads", type=int, default=8, help="threads per worker process (2 processes)")
    ap.add_argument("--delay-ms", type=float, default=50.0, help="provider answer time")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight per account and process")
    ap.add_argument("--redis-db", type=int, default=REDIS_DB, help="the Redis database used and flushed")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (workers, sink, database) first
    broker = redis.Redis(host="127.0.0.1", port=6379, db=args.redis_db)

    name = f"sp_bench_{secrets.token_hex(3)}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    broker.flushdb()
    sink, port = start_sink(args.delay_ms)
    worker: subprocess.Popen[bytes] | None = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            config = write_project(root, f"{PG}/{name}", port, args)
            worker_log = root / "worker.log"
            with worker_log.open("wb") as out:
                worker = subprocess.Popen(
                    [
                        *(str(BIN / "smartpush"), "worker", "--config", str(config)),
                        *("--processes", "2", "--threads", str(args.threads)),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            ledger = Ledger(f"{PG}/{name}")
            idle = [urgent_once(root, ledger) for _ in range(args.repeats)]

            log(f"launching the bulk run of {args.rows:,} rows (the split takes a while)")
            bulk, bulk_launch_s = send(root, "bulk.yaml")
            busy_at = 2 * args.threads * 200  # a first batch from every thread, at least
            while bulk_sent(ledger, bulk) < busy_at:
                time.sleep(0.5)
            loaded = []
            for _ in range(args.repeats):
                time.sleep(PAUSE_S)
                loaded.append(urgent_once(root, ledger))
            sent_then = bulk_sent(ledger, bulk)
            total = sum(ledger.counts(bulk).values())
            subprocess.run(
                [str(BIN / "smartpush"), "cancel", bulk, "--config", str(config)],
                capture_output=True,
                check=True,
            )
            ledger.close()
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=120)
            worker = None
            yields = worker_log.read_text(errors="replace").count("yields its thread")
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        sink.terminate()
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        broker.flushdb()

    title = (
        f"### urgent campaign ({URGENT_ROWS} SMS) behind a bulk run of {args.rows:,} recipients, Redis + "
        f"PostgreSQL + 2 worker processes × {args.threads} threads, bulk segments of {args.segment_size:,}, "
        f"provider delay {args.delay_ms:g} ms — {machine()}"
    )
    lines = [
        title,
        "",
        (
            "| urgent launch | workers | `send --detach` s | launch → first sent s | launch → all sent s "
            "| queued → first sent s |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for label, results in (("idle", idle), ("busy with the bulk run", loaded)):
        lines += [
            f"| {i} | {label} | {c:.2f} | {f:.2f} | {a:.2f} | {w:.2f} |"
            for i, (c, f, a, w) in enumerate(results, 1)
        ]
    medians = [statistics.median(r[1] for r in results) for results in (idle, loaded)]
    lines += [
        "",
        f"- median time to first send: {medians[0]:.2f} s idle, {medians[1]:.2f} s behind the bulk run",
        (
            f"- bulk run: {total:,} messages ({args.rows:,} rows; rows without a phone are skipped), "
            f"{sent_then:,} sent when the last urgent run was done, then cancelled; its launch took "
            f"{bulk_launch_s:.0f} s"
        ),
        f"- bulk segments that gave their thread up to the urgent one: {yields}",
        "",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with args.out.open("a", encoding="utf-8") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
