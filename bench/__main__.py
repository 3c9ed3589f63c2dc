"""Benchmark smartpush end to end on this machine, against its peers in the same run.

    python -m bench [--scenarios sms,email,...] [--scale tiny|small|full] [--out bench/RESULTS.md] [--profile]

Needs PostgreSQL (postgresql://postgres@127.0.0.1:5432: a database sp_bench_xxxxxx is created and
dropped per scenario) and Redis (redis://127.0.0.1:6379/10: db 10 only, flushed before and after).
Sinks (bench/sink.py for HTTP, bench/smtp_sink.py for SMTP) run as subprocesses on loopback and count
what they receive; a row whose counts do not match says LOST MESSAGES.

Scenarios: sms (webhook, no delay), sms-50ms (the provider answers in 50 ms), email (smtp, text + HTML),
push (fcm against an FCM-shaped sink), mixed (push → sms → email, first-reachable), launch (send
--detach with no worker), launch-suppressed (the same, every 10th phone on the suppression list), plan,
report (--format csv), receipts (absorbed by serve). Scales: tiny (~500 messages, seconds), small
(~10k, a couple of minutes), full (100k-1M: on a quiet machine only).

Columns: wall s from `send` to the run being finished; CPU µs/msg of the smartpush processes (launcher
+ worker tree, sampled from /proc) and, apart, of redis-server + every postgres process (server-wide:
whatever else runs there counts); peak RSS of the largest process (VmHWM / ru_maxrss); Redis commands
per message (INFO total_commands_processed delta, server-wide); PostgreSQL transactions and rows
written per message (pg_stat_database of the bench database). Exit 1 if a scenario lost messages.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
from pathlib import Path

from bench.harness import machine, table
from bench.scenarios import SCALES, SCENARIOS, Options, run

TARGETS = (
    "Targets (issue 9; reported, not asserted): SMS no limit ≥ 4,000 msg/s and ≥ 0.45× the aiohttp loop; "
    "SMS 50 ms ≥ 3,000 msg/s; email ≥ 2,000 msg/s and ≥ 2.5× mailmerge; launch 1M ≥ 50,000/s; peak RSS "
    "of any process ≤ 250 MB at 1M; plan 1M ≤ 150 MB."
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, default: all")
    ap.add_argument("--scale", choices=list(SCALES), default="small")
    ap.add_argument("--out", type=Path, help="append the section (machine, versions, command, table) here")
    ap.add_argument("--profile", action="store_true", help="py-spy the workers into bench/profiles/*.svg")
    ap.add_argument("--processes", type=int, default=2, help="worker processes")
    ap.add_argument("--threads", type=int, default=8, help="segments at once per worker process")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenarios {unknown}; choose among {', '.join(SCENARIOS)}")
    where = machine()
    opts = Options(SCALES[args.scale], profile=args.profile, processes=args.processes, threads=args.threads)
    rows = run(names, opts)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    title = (
        f"### python -m bench, scale {args.scale} — {dt.date.today()} — {where['cores']} cores, "
        f"{where['cpu']}, Python {where['python']}"
    )
    load = ", ".join(f"{x:.2f}" for x in where["load"])
    notes = [
        (
            f"smartpush {where['smartpush']}, Redis {where['redis']}, PostgreSQL {where['postgresql']}; "
            f"load average at the start {load}"
        ),
        (
            f"command: `{command}`; workers: `smartpush worker --processes {opts.processes} --threads "
            f"{opts.threads}`, webhook/fcm concurrency {opts.concurrency} per process "
            f"({opts.concurrency_delayed} with the 50 ms provider), {opts.smtp_connections} SMTP connections "
            "per process"
        ),
        (
            "CPU redis+pg and Redis ops are server-wide (other users of those servers count); PG figures are "
            "the bench database's only. Peer rows: CPU and RSS are the peer process's own, ratio = "
            "smartpush's msg/s over the peer's; a peer's wall leaves out its Python start-up, smartpush's "
            "includes `send`'s."
        ),
        TARGETS,
        *(note for r in rows for note in r.notes),
    ]
    section = "\n".join([title, "", table(rows), "", *(f"- {n}" for n in notes), ""])
    print(section)
    if args.out:
        with args.out.open("a", encoding="utf-8") as f:
            f.write("\n" + section)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
