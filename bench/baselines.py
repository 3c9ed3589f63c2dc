"""The peers smartpush is measured against, each run in its own process on the same sink.

    python -m bench.baselines aiohttp URL COUNT --concurrency 128 [--fcm]
    python -m bench.baselines requests URL COUNT [--fcm]
    python -m bench.baselines report-copy DATABASE_URL RUN_ID OUTPUT

- ``aiohttp``: a bare ``aiohttp.ClientSession`` keeping ``--concurrency`` JSON POSTs in flight: no
  ledger, no broker, no templating; the ceiling of the HTTP client alone.
- ``requests``: a plain ``requests.Session`` loop, one request after the other: what a script does.
- ``report-copy``: PostgreSQL's own ``COPY (SELECT ...) TO STDOUT (FORMAT csv)`` of a run's messages,
  the floor for ``smartpush report --format csv``.

Each prints one JSON line: ``{"wall_s": ..., "ok": ...}`` (the harness reads CPU and RSS from wait4).
:func:`mailmerge_project` writes the files the ``mailmerge`` CLI needs for the email scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import time
from pathlib import Path


def payload(i: int, fcm: bool) -> dict[str, object]:
    if fcm:
        return {
            "message": {
                "token": f"fcm:{i:032x}",
                "notification": {"title": "Vaccination grippe", "body": "Bonjour Camille, ceci est un test."},
            }
        }
    return {
        "to": f"+3361{i:07d}",
        "body": "Bonjour Camille, ceci est un test.",
        "from": "MAIRIE",
        "id": str(i),
    }


async def aiohttp_loop(url: str, count: int, concurrency: int, fcm: bool) -> tuple[float, int]:
    import aiohttp

    ok = 0
    next_i = 0
    headers = {"Authorization": "Bearer ya29.bench"} if fcm else {}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal ok, next_i
        while next_i < count:
            i = next_i
            next_i += 1
            async with session.post(url, json=payload(i, fcm), headers=headers) as answer:
                await answer.read()
                ok += answer.status == 200

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(min(concurrency, count))))
        return time.perf_counter() - started, ok


def requests_loop(url: str, count: int, fcm: bool) -> tuple[float, int]:
    import requests

    ok = 0
    headers = {"Authorization": "Bearer ya29.bench"} if fcm else {}
    with requests.Session() as session:
        started = time.perf_counter()
        for i in range(count):
            answer = session.post(url, json=payload(i, fcm), headers=headers, timeout=30)
            ok += answer.status_code == 200
        return time.perf_counter() - started, ok


def report_copy(db_url: str, run_id: str, output: Path) -> tuple[float, int]:
    import psycopg

    started = time.perf_counter()
    rows = 0
    query = psycopg.sql.SQL(
        "COPY (SELECT id, recipient_id, channel, provider, status, attempts, created_at, sent_at, "
        "delivered_at, provider_reference, error_code, error_text FROM messages WHERE run_id = {} "
        "ORDER BY id) TO STDOUT (FORMAT csv, HEADER)"
    ).format(psycopg.sql.Literal(run_id))
    with (
        psycopg.connect(db_url) as conn,
        conn.cursor() as cursor,
        output.open("wb") as f,
        cursor.copy(query) as copy,
    ):
        for data in copy:
            f.write(data)
            rows += bytes(data).count(b"\n")
    return time.perf_counter() - started, max(rows - 1, 0)


# -- mailmerge --------------------------------------------------------------------------------------


def mailmerge_project(folder: Path, audience: Path, rows: int, port: int, text: str, html: str) -> None:
    """mailmerge's template (the same text and HTML, multipart/alternative), database (the first ``rows``
    people of the audience that have an email) and server configuration (the SMTP sink, no TLS)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mailmerge_server.conf").write_text(
        f"[smtp_server]\nhost = 127.0.0.1\nport = {port}\nsecurity = Never\nratelimit = 0\n", encoding="utf-8"
    )
    (folder / "mailmerge_template.txt").write_text(
        "TO: {{email}}\n"
        "FROM: Assurance Maladie <ne-pas-repondre@info.exemple.fr>\n"
        f"SUBJECT: {SUBJECT_MAILMERGE}\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/alternative; boundary="bench-boundary"\n\n'
        "--bench-boundary\nContent-Type: text/plain; charset=utf-8\n\n"
        f"{text}\n"
        "--bench-boundary\nContent-Type: text/html; charset=utf-8\n\n"
        f"{html}\n"
        "--bench-boundary--\n",
        encoding="utf-8",
    )
    written = 0
    with (
        audience.open(encoding="utf-8", newline="") as source,
        (folder / "mailmerge_database.csv").open("w", encoding="utf-8", newline="") as target,
    ):
        out = csv.writer(target)
        out.writerow(["email", "prenom", "nom", "date_limite"])
        for row in csv.DictReader(source, delimiter=";"):
            if written >= rows:
                break
            if row["email"]:
                out.writerow([row["email"], row["prenom"], row["nom"], row["date_limite"]])
                written += 1


#: The email subject, the same template for both tools (both are Jinja).
SUBJECT_MAILMERGE = "{{ prenom }}, votre invitation à la vaccination contre la grippe"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["aiohttp", "requests", "report-copy"])
    ap.add_argument("target")
    ap.add_argument("count")
    ap.add_argument("output", nargs="?")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--fcm", action="store_true", help="FCM-shaped JSON and a bearer token")
    args = ap.parse_args()
    if args.kind == "aiohttp":
        wall, ok = asyncio.run(aiohttp_loop(args.target, int(args.count), args.concurrency, args.fcm))
    elif args.kind == "requests":
        wall, ok = requests_loop(args.target, int(args.count), args.fcm)
    else:
        wall, ok = report_copy(args.target, args.count, Path(args.output))
    print(json.dumps({"wall_s": wall, "ok": ok}), flush=True)


if __name__ == "__main__":
    main()
