"""The scenarios of ``python -m bench``: each one a function from :class:`Options` to table rows.

Sending scenarios start their sinks, a :class:`~bench.harness.Project` (PostgreSQL database, Redis db 10)
and ``smartpush worker --processes 2 --threads 8``, wait until every worker process consumes, then time
``smartpush send --detach`` up to the run being ``finished`` in the ledger (end to end: split, ledger,
queue, render, send, results written). The peers run afterwards on the same sink, in their own process.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import baselines
from bench.gen_audience import write_audience
from bench.harness import (
    HERE,
    SMARTPUSH,
    BenchError,
    HttpSink,
    Meter,
    Project,
    Row,
    SmtpSink,
    Workers,
    ledger_counts,
    log,
    run_measured,
    timeline,
    wait_finished,
)

ROOT = HERE.parent


@dataclass(frozen=True)
class Scale:
    """Sizes of one ``--scale``."""

    sms: int
    email: int
    mailmerge: int  # the peer runs on the first N emails of the same audience
    push: int
    mixed: int
    launch: int
    plan: int
    report: int
    receipts: int
    receipts_s: float
    requests_sample: int  # the sequential requests loop, measured on a sample and extrapolated
    requests_sample_delayed: int


SCALES = {
    "tiny": Scale(500, 200, 100, 500, 500, 2_000, 2_000, 2_000, 1_000, 5, 200, 40),
    "small": Scale(10_000, 2_000, 500, 10_000, 5_000, 20_000, 20_000, 20_000, 10_000, 10, 1_000, 100),
    "full": Scale(
        100_000, 20_000, 2_000, 100_000, 100_000, 1_000_000, 1_000_000, 1_000_000, 150_000, 30, 2_000, 400
    ),
}


@dataclass(frozen=True)
class Options:
    scale: Scale
    profile: bool = False
    processes: int = 2
    threads: int = 8
    #: Requests in flight per worker process and account. Without delay 64 keeps the client busy; with a
    #: 50 ms provider 256 per process (2 × 256 / 50 ms ≈ 10,000/s ceiling, above the target of 3,000/s).
    concurrency: int = 64
    concurrency_delayed: int = 256
    #: SMTP connections per worker process.
    smtp_connections: int = 8


SMS_BODY = (
    "Bonjour {{ prenom }}, votre vaccin contre la grippe est pris en charge jusqu'au {{ date_limite }}."
)
EMAIL_TEXT = (
    "Bonjour {{ prenom }} {{ nom }},\n\nVotre vaccin contre la grippe est pris en charge à 100 % jusqu'au "
    "{{ date_limite }}. Parlez-en à votre pharmacien ou à votre médecin.\n\nL'Assurance Maladie\n"
)
EMAIL_HTML = (
    '<!doctype html>\n<html lang="fr"><head><meta charset="utf-8"><title>Vaccination grippe</title></head>\n'
    "<body><p>Bonjour {{ prenom }} {{ nom }},</p>\n<p>Votre vaccin contre la grippe est pris en charge à "
    "100 % jusqu'au <strong>{{ date_limite }}</strong>. Parlez-en à votre pharmacien ou à votre "
    "médecin.</p>\n<p>L'Assurance Maladie</p></body></html>\n"
)
CHANNELS = {
    "sms": '  - {channel: sms, provider: sms, body: "' + SMS_BODY + '"}\n',
    "push": '  - {channel: push, provider: push, title: Vaccination grippe, body: "' + SMS_BODY + '"}\n',
    "email": (
        "  - channel: email\n    provider: mail\n"
        "    from: 'Assurance Maladie <ne-pas-repondre@info.exemple.fr>'\n"
        f"    subject: '{baselines.SUBJECT_MAILMERGE}'\n    text: templates/bench/email.txt.j2\n"
        "    html: templates/bench/email.html.j2\n"
    ),
}


def service_account(folder: Path, token_url: str) -> None:
    """A service-account JSON with a fresh RSA key, its token endpoint on the sink."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    document = {
        "type": "service_account",
        "project_id": "bench-project",
        "private_key_id": "0" * 16,
        "private_key": pem,
        "client_email": "bench@bench-project.iam.gserviceaccount.com",
        "token_uri": f"{token_url}/token",
    }
    (folder / "service-account.json").write_text(json.dumps(document), encoding="utf-8")


def providers_yaml(opts: Options, http: HttpSink | None, smtp: SmtpSink | None, push: bool = False) -> str:
    """The accounts on the sinks: ``sms`` (webhook), ``push`` (fcm; see service_account), ``mail``."""
    text = ""
    if http is not None:
        concurrency = opts.concurrency_delayed if http.delay_ms else opts.concurrency
        text += (
            f"  sms:\n    type: webhook\n    base_url: {http.url}\n    path: /sms\n    sender: MAIRIE\n"
            f"    concurrency: {concurrency}\n    timeout: 60s\n"
        )
        if push:
            text += (
                "  push:\n    type: fcm\n    service_account_file: service-account.json\n"
                f"    base_url: {http.url}\n    concurrency: {concurrency}\n    timeout: 60s\n"
            )
    if smtp is not None:
        text += (
            f"  mail:\n    type: smtp\n    host: 127.0.0.1\n    port: {smtp.port}\n    starttls: false\n"
            f"    connections: {opts.smtp_connections}\n"
        )
    return text or "  sms:\n    type: webhook\n    base_url: http://127.0.0.1:9\n    sender: MAIRIE\n"


def write_campaign(project: Project, channels: list[str], rows: int, complete: bool) -> tuple[Path, int]:
    """The audience (rows from bench/gen_audience.py) and the campaign; returns it and the rows that
    reach one of ``channels`` at least (what first-reachable sends)."""
    columns = {"sms": "phone", "email": "email", "push": "push_token"}
    counts = write_audience(project.root / "audience.csv", rows, complete=complete)
    templates = project.root / "templates" / "bench"
    templates.mkdir(parents=True, exist_ok=True)
    (templates / "email.txt.j2").write_text(EMAIL_TEXT, encoding="utf-8")
    (templates / "email.html.j2").write_text(EMAIL_HTML, encoding="utf-8")
    campaign = project.root / "campaign.yaml"
    campaign.write_text(
        "name: bench\ncategory: service\naudience:\n  source: audience.csv\n  id: numero_assure\n"
        "  columns: {phone: phone, email: email, push_token: push_token}\nsegments: {size: 500}\n"
        "channels:\n" + "".join(CHANNELS[c] for c in channels) + "strategy: first-reachable\n",
        encoding="utf-8",
    )
    expected = counts["reachable"] if len(channels) > 1 else counts[columns[channels[0]]]
    return campaign, expected


def send_run(
    opts: Options, project: Project, campaign: Path, label: str, sinks: list[HttpSink | SmtpSink]
) -> Row:
    """Workers up and consuming, then ``send --detach`` timed up to the run being finished."""
    with Workers(project, opts.processes, opts.threads) as workers:
        workers.wait_consuming()
        profiled = opts.profile and label.startswith(("sms", "email"))
        if profiled:
            workers.profile(HERE / "profiles" / f"{label}{os.environ.get('BENCH_PROFILE_SUFFIX', '.svg')}")
            time.sleep(3)  # py-spy attaches to every process of the tree before the clock starts
        before = [s.count() for s in sinks]
        sink_cpu = sum(s.cpu_s() for s in sinks)
        meter = Meter(project.db_name)
        meter.start()
        launched = run_measured(
            [SMARTPUSH, "send", campaign, "--yes", "--detach", "--json", "--config", project.config],
            project.root,
        )
        run_id = launched.json()["run_id"]
        wait_finished(project.db_url, run_id, 900, meter, workers)
        meter.stop()
        cpu, rss = workers.stop()
    row = meter.fill(
        Row(label, 0, meter.wall_s, cpu_s=cpu + launched.cpu_s, peak_rss_mib=max(rss, launched.peak_rss_mib))
    )
    counts = ledger_counts(project.db_url, run_id)
    received = sum(s.count() - b for s, b in zip(sinks, before, strict=True))
    sink_cpu = sum(s.cpu_s() for s in sinks) - sink_cpu
    sent = sum(n for k, n in counts.items() if k.endswith(":sent"))
    row.messages = sent
    unfinished = {k: n for k, n in counts.items() if not k.endswith((":sent", ":skipped"))}
    row.ok = received == sent and not unfinished  # first-reachable records the channels it skipped
    row.notes.append(f"{label}: ledger {counts}, sinks received {received:,}")
    row.notes.append(f"{label}: {timeline(project.db_url, run_id)}")
    if sent:
        row.notes.append(f"{label}: the sinks used {sink_cpu / sent * 1e6:,.0f} µs of CPU per message")
    if profiled:
        row.notes.append(f"{label}: profiled with py-spy (bench/profiles/{label}.svg): slower")
    if row.ok:
        workers.log_path.unlink(missing_ok=True)  # kept (in LOGS) only when something went wrong
    return row


def peer(label: str, cmd: list[str | Path], cwd: Path, count: int, of: Row) -> Row:
    """A peer run in its own process; its ratio is smartpush's rate over its own."""
    done = run_measured(cmd, cwd)
    ok, wall = count, done.wall_s
    if done.stdout.strip().startswith("{"):
        result = json.loads(done.stdout.strip().splitlines()[-1])
        ok, wall = int(result["ok"]), float(result["wall_s"])
    row = Row(label, ok, wall, cpu_s=done.cpu_s, peak_rss_mib=done.peak_rss_mib, baseline="peer")
    row.ok = ok == count
    if row.rate:
        of.baseline, of.baseline_rate = label.removeprefix("peer: ").split(" (")[0], row.rate
        row.peer_ratio = of.rate / row.rate
    return row


def _baselines(
    opts: Options, url: str, count: int, sample: int, concurrency: int, row: Row, fcm: bool
) -> list[Row]:
    flag = ["--fcm"] if fcm else []
    py = [sys.executable, "-m", "bench.baselines"]
    rows = [
        peer(
            f"peer: requests.Session loop (sample of {sample:,}, rate extrapolated)",
            [*py, "requests", url, str(sample), *flag],
            ROOT,
            sample,
            row,
        ),
        peer(
            f"peer: aiohttp loop, {concurrency} in flight, no ledger",
            [*py, "aiohttp", url, str(count), "--concurrency", str(concurrency), *flag],
            ROOT,
            count,
            row,
        ),
    ]
    return rows


# -- the scenarios ----------------------------------------------------------------------------------


def sms(opts: Options, delay_ms: float = 0.0) -> list[Row]:
    label = "sms" if not delay_ms else f"sms-{delay_ms:g}ms"
    http = HttpSink(delay_ms)
    try:
        with Project(label) as project:
            project.write_config(providers_yaml(opts, http, None))
            campaign, _ = write_campaign(project, ["sms"], opts.scale.sms, complete=True)
            row = send_run(opts, project, campaign, label, [http])
        concurrency = opts.processes * (opts.concurrency_delayed if delay_ms else opts.concurrency)
        sample = opts.scale.requests_sample_delayed if delay_ms else opts.scale.requests_sample
        before = http.count()
        peers = _baselines(opts, f"{http.url}/sms", opts.scale.sms, sample, concurrency, row, fcm=False)
        if http.count() - before != opts.scale.sms + sample:
            row.notes.append(f"{label}: the peers' requests did not all reach the sink")
        return [row, *peers]
    finally:
        http.close()


def sms_delayed(opts: Options) -> list[Row]:
    return sms(opts, 50.0)


def push(opts: Options) -> list[Row]:
    http = HttpSink()
    try:
        with Project("push") as project:
            project.write_config(providers_yaml(opts, http, None, push=True))
            service_account(project.root, http.url)
            campaign, _ = write_campaign(project, ["push"], opts.scale.push, complete=True)
            row = send_run(opts, project, campaign, "push", [http])
        url = f"{http.url}/v1/projects/bench-project/messages:send"
        peer_row = peer(
            f"peer: aiohttp loop, {opts.processes * opts.concurrency} in flight, FCM JSON, no ledger",
            [
                *(sys.executable, "-m", "bench.baselines", "aiohttp", url, str(opts.scale.push), "--fcm"),
                *("--concurrency", str(opts.processes * opts.concurrency)),
            ],
            ROOT,
            opts.scale.push,
            row,
        )
        return [row, peer_row]
    finally:
        http.close()


def email(opts: Options) -> list[Row]:
    smtp = SmtpSink()
    try:
        with Project("email") as project:
            project.write_config(providers_yaml(opts, None, smtp))
            campaign, _ = write_campaign(project, ["email"], opts.scale.email, complete=True)
            row = send_run(opts, project, campaign, "email", [smtp])
            folder = project.root / "mailmerge"
            n = opts.scale.mailmerge
            baselines.mailmerge_project(
                folder, project.root / "audience.csv", n, smtp.port, EMAIL_TEXT, EMAIL_HTML
            )
            before = smtp.count()
            cmd = [
                Path(sys.executable).parent / "mailmerge",
                "--no-limit",
                "--no-dry-run",
                "--output-format",
                "raw",
            ]
            peer_row = peer(f"peer: mailmerge CLI (first {n:,} rows)", cmd, folder, n, row)
            peer_row.messages = smtp.count() - before
            peer_row.ok = peer_row.messages == n
            row.baseline_rate = peer_row.rate
            peer_row.peer_ratio = row.rate / peer_row.rate if peer_row.rate else None
        return [row, peer_row]
    finally:
        smtp.close()


def mixed(opts: Options) -> list[Row]:
    http, smtp = HttpSink(), SmtpSink()
    try:
        with Project("mixed") as project:
            project.write_config(providers_yaml(opts, http, smtp, push=True))
            service_account(project.root, http.url)
            campaign, expected = write_campaign(
                project, ["push", "sms", "email"], opts.scale.mixed, complete=False
            )
            row = send_run(opts, project, campaign, "mixed first-reachable push→sms→email", [http, smtp])
        if row.messages != expected:
            row.ok = False
            row.notes.append(f"mixed: {expected:,} rows reachable, {row.messages:,} sent")
        return [row]
    finally:
        http.close()
        smtp.close()


def launch(opts: Options, suppressed_share: int = 0) -> list[Row]:
    """``send --detach`` with no worker: split, ledger rows, segments queued; with ``suppressed_share``
    (every Nth row's phone on the suppression list, as hard bounces), the list checked too."""
    label = "launch (split + ledger + enqueue)"
    with Project("launch") as project:
        project.write_config(providers_yaml(opts, None, None))
        campaign, expected = write_campaign(project, ["sms"], opts.scale.launch, complete=True)
        if suppressed_share:
            listed = suppress_phones(project, suppressed_share)
            label = f"launch, {listed:,} phones on the suppression list"
        meter = Meter(project.db_name)
        meter.start()
        done = run_measured([SMARTPUSH, "send", campaign, "--yes", "--detach", "--json"], project.root)
        meter.stop()
        row = meter.fill(Row(label, expected, done.wall_s, done.cpu_s))
        row.peak_rss_mib = done.peak_rss_mib
        counts = ledger_counts(project.db_url, done.json()["run_id"])
        row.messages = sum(counts.values())
        row.ok = row.messages == expected
        row.notes.append(f"launch: ledger {counts}; the command's whole time, Python start-up included")
    return [row]


def suppress_phones(project: Project, every: int) -> int:
    """Put every ``every``-th row's phone of the audience on the suppression list; returns how many."""
    import csv
    from datetime import UTC, datetime

    from smartpush.addresses import normalise_phone
    from smartpush.config import load_config
    from smartpush.errors import RecipientError
    from smartpush.ledger import Suppression
    from smartpush.runtime import Runtime
    from smartpush.unsubscribe import recipient_hash

    rt = Runtime(load_config(project.config, env={}))
    try:
        rt.ledger.migrate()
        key, now = rt.config.secret_key(), datetime.now(UTC)
        entries = []
        with (project.root / "audience.csv").open(encoding="utf-8", newline="") as f:
            for i, row in enumerate(csv.DictReader(f, delimiter=";")):
                if i % every == 0 and row["phone"]:
                    try:
                        phone = normalise_phone(row["phone"])
                    except RecipientError:
                        continue
                    entries.append(
                        Suppression("sms", recipient_hash(key, "sms", phone), "hard-bounce", "bench", now)
                    )
        return rt.ledger.suppress(entries)
    finally:
        rt.close()


def plan(opts: Options) -> list[Row]:
    from bench import plan_1m

    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        project = Path(tmp) / "p"
        _, everyone, audience = plan_1m.make_project(project, opts.scale.plan)
        done = run_measured([SMARTPUSH, "plan", everyone, "--json"], project)
        row = Row(
            "plan (every row)", opts.scale.plan, done.wall_s, done.cpu_s, peak_rss_mib=done.peak_rss_mib
        )
        row.notes.append("plan: exit 1 is expected (0.1 % invalid rows); no Redis or PostgreSQL involved")
        naive = peer(
            "peer: naive script (csv + phonenumbers + email_validator + jinja2)",
            [sys.executable, "-c", plan_1m.NAIVE, audience],
            project,
            opts.scale.plan,
            row,
        )
    return [row, naive]


def report(opts: Options) -> list[Row]:
    from bench import receipts

    n = opts.scale.report
    with Project("report") as project:
        run_id = receipts.prefill(project.db_url, n)
        project.write_config(providers_yaml(opts, None, None).replace("  sms:", f"  {receipts.ACCOUNT}:"))
        out = project.root / "report.csv"
        meter = Meter(project.db_name)
        meter.start()
        done = run_measured(
            [SMARTPUSH, "report", run_id, "--format", "csv", "-o", out, "--config", project.config],
            project.root,
        )
        meter.stop()
        row = meter.fill(
            Row("report --format csv", n, done.wall_s, done.cpu_s, peak_rss_mib=done.peak_rss_mib)
        )
        with out.open("rb") as f:
            lines = sum(1 for _ in f)
        row.ok = lines == n + 1
        row.notes.append(f"report: {lines - 1:,} records written for {n:,} messages")
        floor = peer(
            "peer: PostgreSQL COPY ... TO STDOUT (FORMAT csv)",
            [
                sys.executable,
                "-m",
                "bench.baselines",
                "report-copy",
                project.db_url,
                run_id,
                project.root / "copy.csv",
            ],
            ROOT,
            n,
            row,
        )
    return [row, floor]


def receipts_scenario(opts: Options) -> list[Row]:
    from bench import receipts

    meter = Meter(None)
    with tempfile.TemporaryDirectory(prefix="bench-receipts-") as tmp:
        o = receipts.one_run(
            "webhook", opts.scale.receipts, opts.scale.receipts_s, 64, Path(tmp), "auto", "auto", meter=meter
        )
    row = meter.fill(
        Row(
            f"receipts absorbed by serve ({o.stack})",
            o.ok,
            o.wall_s,
            o.serve_cpu_s,
            peak_rss_mib=o.serve_peak_rss_mib,
        )
    )
    row.ok = o.all_applied
    row.notes.append(
        f"receipts: 64 in flight from a second process; p50 {o.p50_ms:.1f} ms, p99 {o.p99_ms:.1f} ms; "
        f"ledger {o.ledger}; up to {opts.scale.receipts_s:g} s, so messages is what it absorbed"
    )
    return [row]


SCENARIOS: dict[str, Callable[[Options], list[Row]]] = {
    "sms": sms,
    "sms-50ms": sms_delayed,
    "email": email,
    "push": push,
    "mixed": mixed,
    "launch": launch,
    "launch-suppressed": lambda opts: launch(opts, suppressed_share=10),
    "plan": plan,
    "report": report,
    "receipts": receipts_scenario,
}


def run(names: list[str], opts: Options) -> list[Row]:
    rows: list[Row] = []
    for name in names:
        log(f"scenario {name}")
        try:
            rows += SCENARIOS[name](opts)
        except BenchError as exc:
            log(f"scenario {name} failed: {exc}")
            failed = Row(name, 0, 0.0, ok=False)
            failed.notes.append(f"{name}: FAILED: {str(exc).splitlines()[0]}")
            rows.append(failed)
    return rows
