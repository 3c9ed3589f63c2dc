"""Soak: a long distributed run with a fault injected every minute; lost, duplicates, time to recover.

    .venv/bin/python bench/soak.py [--rows 100000] [--fault-every 60] [--rate 400] [--workers 2]

Runs as root (it starts a PostgreSQL cluster of its own as the ``postgres`` user). Everything is
private and on loopback: a ``redis-server`` with AOF (``appendfsync everysec``), a PostgreSQL cluster,
``smartpush worker`` processes and a provider that honours ``Idempotency-Key`` (the chaos suite's, see
tests/chaos/chaoslib.py). Faults, in turn: kill -9 a worker (a replacement starts), Redis crashed and
restarted from its AOF, PostgreSQL crashed and restarted. At the end it reports:

- lost: messages not in a final status, or recorded ``sent`` but never delivered;
- duplicates: messages the provider delivered twice (0 expected: it honours the key), and
  replays: requests repeated for a message already delivered (what a provider ignoring the key would
  have sent twice: the at-least-once window);
- time to recover, per fault: from the fault until deliveries run at half the pre-fault pace again.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "chaos"))

from chaoslib import (  # noqa: E402 - the chaos suite's private servers and workers
    PrivatePostgres,
    PrivateRedis,
    Workers,
    launch,
    make_project,
    run_finished,
)

from smartpush.ledger import FINAL, Ledger, Status  # noqa: E402
from smartpush.testing import FakeProviderServer  # noqa: E402

FAULTS = ("kill-worker", "redis-restart", "postgresql-restart")
#: How long Redis or PostgreSQL stays down.
DOWN_S = 2.0


def pace(samples: list[tuple[float, int]], since: float, until: float) -> float:
    """Deliveries per second between two times, from (time, delivered so far) samples."""
    inside = [s for s in samples if since <= s[0] <= until]
    if len(inside) < 2:
        return 0.0
    (t0, n0), (t1, n1) = inside[0], inside[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def recovered_at(samples: list[tuple[float, int]], fault_at: float, before: float) -> float | None:
    """The first time after ``fault_at`` when the last second's pace is at least half ``before``."""
    for t, _ in samples:
        if t > fault_at + 1.0 and pace(samples, t - 1.0, t) >= before / 2:
            return t
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    ap.add_argument("--rate", type=int, default=400, help="the account's rate (messages/s); 0: none")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--delay-ms", type=float, default=10.0, help="provider answer time")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the folder (worker logs) afterwards")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    folder = Path(tempfile.mkdtemp(prefix="sp-soak-"))
    (folder / "redis").mkdir()
    redis = PrivateRedis(folder / "redis")
    postgres = PrivatePostgres(Path(tempfile.mkdtemp(prefix="sp-soak-pg-")))  # given to postgres
    workers: Workers | None = None
    try:
        redis.start()
        postgres.init()
        postgres.start()
        database = postgres.create_database(f"soak_{secrets.token_hex(4)}")
        with FakeProviderServer(delay_s=args.delay_ms / 1000, idempotent=True) as sink:
            rate = f"\n    rate: {args.rate}/s" if args.rate else ""
            config = make_project(
                folder,
                args.rows,
                broker=redis.url,
                database=database,
                account=f"base_url: {sink.url}\n    concurrency: 50\n    timeout: 5s{rate}",
                # Longer than an outage: a result held through it is written, not raced by a resend.
                settings="stuck_after: 20s\nsweep_every: 2s\n",
            )
            ledger = Ledger(database)
            ledger.migrate()
            workers = Workers(config)
            for _ in range(args.workers):
                workers.start(args.threads)
            began = time.monotonic()
            run_id = launch(folder, "soak")
            samples: list[tuple[float, int]] = []
            faults: list[dict[str, object]] = []
            next_fault = began + args.fault_every
            done = False
            while not done:
                now = time.monotonic()
                samples.append((now, len(sink.delivered_per_key())))
                while len(workers.alive()) < args.workers:  # as systemd's Restart=always would
                    workers.start(args.threads)
                if now >= next_fault:
                    kind = FAULTS[len(faults) % len(FAULTS)]
                    before = pace(samples, now - 10, now)
                    if kind == "kill-worker":
                        workers.kill(rng.choice(workers.alive()))
                        workers.start(args.threads)
                    elif kind == "redis-restart":
                        redis.crash()
                        time.sleep(DOWN_S)
                        redis.start()
                    else:
                        postgres.crash()
                        time.sleep(DOWN_S)
                        postgres.start()
                    faults.append({"fault": kind, "at_s": round(now - began, 1), "pace_before": before})
                    next_fault = now + args.fault_every
                try:
                    done = run_finished(ledger, run_id)
                except Exception:  # the ledger is down for a moment: the fault under test
                    done = False
                if now - began > 3600:
                    raise SystemExit("the run did not finish within an hour")
                time.sleep(0.25)
            took = time.monotonic() - began
            samples.append((time.monotonic(), len(sink.delivered_per_key())))
            for fault in faults:
                at = began + float(fault["at_s"])  # type: ignore[arg-type]
                back = recovered_at(samples, at, float(fault.pop("pace_before")))  # type: ignore[arg-type]
                fault["time_to_recover_s"] = round(back - at, 1) if back is not None else None
            statuses = Counter(m.status for m in ledger.messages(run_id))
            sent = {m.id for m in ledger.messages(run_id, statuses=[Status.SENT])}
            delivered = sink.delivered_per_key()
            report = {
                "rows": args.rows,
                "seconds": round(took, 1),
                "messages_per_s": round(args.rows / took, 1),
                "statuses": {s.value: n for s, n in statuses.items()},
                "lost": sum(n for s, n in statuses.items() if s not in FINAL) + len(sent - set(delivered)),
                "duplicates_delivered": sum(n - 1 for n in delivered.values() if n > 1),
                "replays_at_the_provider": sum(sink.replayed_per_key().values()),
                "faults": faults,
            }
            ledger.close()
            print(json.dumps(report, indent=2))
    finally:
        if workers is not None:
            workers.stop_all()
        redis.stop()
        postgres.stop("immediate")
        shutil.rmtree(postgres.folder, ignore_errors=True)
        if args.keep:
            print(f"worker logs kept in {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
