"""Benchmark: a 100,000-recipient SMS campaign through Redis, 2 worker processes, the PostgreSQL ledger.

    .venv/bin/python bench/send_100k.py [--rows 100000] [--delay-ms 0] [--threads 8] [--out bench/RESULTS.md]

Everything runs on this machine: Redis and PostgreSQL (already running, as on the project's machines),
an HTTP sink (bench/sink.py) standing in for the SMS provider, and smartpush itself. It measures:

- launch: `smartpush send --detach` (split, ledger rows, segments queued) with no worker running,
  in recipients/s, for the whole command (Python start-up included) and for the split itself;
- send: from starting `smartpush worker --processes 2` to the run being finished, in messages/s;
- CPU seconds per 1,000 messages and peak RSS of the worker processes (wait4 rusage of the worker tree);
- the baseline in the same run: a bare aiohttp loop posting the same number of JSON SMS to the same sink
  at the same concurrency, with no ledger and no broker (the ceiling of the HTTP client alone).

Kept for the sections of bench/RESULTS.md it wrote; ``python -m bench --scenarios sms`` measures the
same thing and more (its sink and baseline are shared with this script).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script: the bench package is beside this file

from bench.baselines import aiohttp_loop  # noqa: E402
from bench.harness import BIN, PG, REDIS_DB, HttpSink  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--delay-ms", type=float, default=0.0, help="provider answer time")
    ap.add_argument("--threads", type=int, default=8, help="segments at once per worker process")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight per process")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    name = f"sp_bench_{secrets.token_hex(3)}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()
    sink = HttpSink(args.delay_ms)
    port = sink.port
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            config = root / "smartpush.yaml"
            config.write_text(
                f"broker: redis://127.0.0.1:6379/{REDIS_DB}\ndatabase: {PG}/{name}\n"
                f"providers:\n  sms:\n    type: webhook\n    base_url: http://127.0.0.1:{port}\n"
                f"    path: /sms\n    sender: MAIRIE\n    concurrency: {args.concurrency}\n    timeout: 60s\n"
            )
            with (root / "people.csv").open("w") as f:
                f.write("id;prenom;phone\n")
                for i in range(args.rows):
                    f.write(f"{i};Camille;06{10000000 + i:08d}\n")
            (root / "c.yaml").write_text(
                "name: bench\ncategory: service\naudience: {source: people.csv, id: id}\n"
                "segments: {size: 500}\nchannels:\n"
                "  - {channel: sms, provider: sms, body: 'Bonjour {{ prenom }}, ceci est un test.'}\n"
            )
            t0 = time.perf_counter()
            launched = subprocess.run(
                [str(BIN / "smartpush"), "send", "c.yaml", "--yes", "--detach", "--json"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            )
            launch_s = time.perf_counter() - t0
            run_id = json.loads(launched.stdout)["run_id"]

            from smartpush.ledger import Ledger, RunState

            ledger = Ledger(f"{PG}/{name}")
            split = ledger.get_run(run_id)
            assert split is not None and split.created_at and split.started_at
            split_s = (split.started_at - split.created_at).total_seconds()
            t1 = time.perf_counter()
            worker = subprocess.Popen(
                [
                    str(BIN / "smartpush"),
                    "worker",
                    "--config",
                    str(config),
                    "--processes",
                    "2",
                    "--threads",
                    str(args.threads),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            while True:
                run = ledger.get_run(run_id)
                if run is not None and run.state is RunState.FINISHED:
                    break
                time.sleep(0.2)
            send_s = time.perf_counter() - t1
            counts = {f"{c}:{s.value}": n for (c, s), n in ledger.counts(run_id).items()}
            ledger.close()
            os.killpg(worker.pid, signal.SIGTERM)
            _, _, usage = os.wait4(worker.pid, 0)
            cpu_s = usage.ru_utime + usage.ru_stime
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            del children
        bare_s, _ = asyncio.run(aiohttp_loop(f"{sink.url}/sms", args.rows, args.concurrency * 2, fcm=False))
    finally:
        sink.close()
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    send_rate = args.rows / send_s
    title = (
        f"### send {args.rows:,} SMS, Redis + PostgreSQL + 2 worker processes × {args.threads} threads, "
        f"provider delay {args.delay_ms:g} ms — {dt.date.today()} — {os.cpu_count()} cores, {cpu}, "
        f"Python {platform.python_version()}"
    )
    rows = [
        ("launch (split + ledger + queue), recipients/s", f"{args.rows / launch_s:,.0f} ({launch_s:.1f} s)"),
        (
            "of which the split itself (run created → running), recipients/s",
            f"{args.rows / split_s:,.0f} ({split_s:.1f} s)",
        ),
        ("send, messages/s", f"{send_rate:,.0f} ({send_s:.1f} s)"),
        ("worker CPU seconds per 1,000 messages", f"{cpu_s / args.rows * 1000:.2f}"),
        ("worker peak RSS (largest process)", f"{usage.ru_maxrss // 1024} MiB"),
        (
            "baseline: bare aiohttp loop, same sink, no ledger/broker, messages/s",
            f"{args.rows / bare_s:,.0f}",
        ),
        ("smartpush send / bare client", f"{send_rate / (args.rows / bare_s):.2f}"),
        ("final counts", str(counts)),
    ]
    table = "\n".join(
        [title, "", "| measure | value |", "| --- | ---: |", *(f"| {a} | {b} |" for a, b in rows), ""]
    )
    print(table)
    if args.out:
        with args.out.open("a", encoding="utf-8") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
