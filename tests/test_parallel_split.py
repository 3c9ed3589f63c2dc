"""A new run's split read in several processes stores exactly what the launching process alone stores.

Real PostgreSQL (a schema per test); the readers are forked for real, on chunks made small so that a
few thousand rows give dozens of them (duplicates, invalid and filtered rows land in different chunks).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from servers import flushed_redis, needs_services, throwaway_schema

from smartpush import launch as launching
from smartpush.config import load_config
from smartpush.launch import Launch, launch
from smartpush.loading import load_campaign
from smartpush.metrics import MESSAGES
from smartpush.runtime import Runtime

CAMPAIGN = """\
name: {name}
category: service
audience:
  source: people.csv
  id: id
  where: "age >= 18"
segments:
  size: 37
channels:
  - channel: sms
    provider: sms
    body: "Bonjour {{{{ prenom }}}}, rendez-vous le {{{{ jour }}}}."
  - channel: email
    provider: mail
    from: "Service <noreply@example.fr>"
    subject: "Rendez-vous"
    text: "Bonjour {{{{ prenom }}}}"
strategy: first-reachable
"""


def people(rows: int) -> str:
    lines = ["id;prenom;age;jour;phone;email"]
    for i in range(rows):
        phone = f"06{12345600 + i:08d}"
        email = f"p{i}@example.fr"
        if i % 97 == 5:
            phone = "0612"  # invalid phone: the email is the channel that reaches them
        if i % 89 == 3:
            phone = ""  # no phone: email only
        if i % 211 == 7:
            email = "not-an-address"
        name = f"Zoé\\{i}\tA" if i % 50 == 0 else f"Zoé{i}"  # a backslash and a tab, kept as they are
        age = 12 if i % 31 == 0 else 40  # filtered out by where
        rid = "" if i % 503 == 11 else str(i)  # empty id: an invalid row
        if i % 700 == 699:
            rid = str(i - 650)  # a duplicate of a row far above (another chunk)
        lines.append(f"{rid};{name};{age};lundi;{phone};{email}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def schema_url() -> Iterator[str]:
    with throwaway_schema("split") as url:
        yield url


@contextmanager
def opened(tmp_path: Path, url: str, rows: int, settings: str = "") -> Iterator[Runtime]:
    """A project on ``url`` with ``rows`` audience rows and the campaigns ``seq`` and ``par``."""
    (tmp_path / "smartpush.yaml").write_text(
        f"database: {url}\n{settings}providers:\n  sms: {{type: outbox}}\n  mail: {{type: outbox}}\n",
        encoding="utf-8",
    )
    (tmp_path / "people.csv").write_text(people(rows), encoding="utf-8")
    for name in ("seq", "par"):
        (tmp_path / f"{name}.yaml").write_text(CAMPAIGN.format(name=name), encoding="utf-8")
    rt = Runtime(load_config(tmp_path / "smartpush.yaml", env={}))
    try:
        rt.ledger.migrate()
        yield rt
    finally:
        rt.close()


@pytest.fixture
def rt(tmp_path: Path, schema_url: str) -> Iterator[Runtime]:
    with opened(tmp_path, schema_url, 6_000) as runtime:
        yield runtime


def split(
    rt: Runtime, tmp_path: Path, name: str, *, parallel: bool, enqueue: Any = None, key: str | None = None
) -> tuple[Launch, list[tuple[str, int]]]:
    queued: list[tuple[str, int]] = []
    prepared = load_campaign(tmp_path / f"{name}.yaml", rt.config)
    done = launch(rt, prepared, enqueue=enqueue or (lambda run, seg: queued.append((run, seg))), key=key)
    return done, queued


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launching, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(launching, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(launching.os, "cpu_count", lambda: 2)


def sequential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launching, "PARALLEL_MIN_BYTES", 1 << 62)


def stored(url: str, run_id: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        recipients = conn.execute(
            "SELECT recipient_id, segment, line, context FROM recipients WHERE run_id = %s ORDER BY line",
            (run_id,),
        ).fetchall()
        messages = conn.execute(
            "SELECT recipient_id, segment, channel, channel_index, provider, status, attempts, address,"
            " error_code, error_text, final_at IS NULL, length(id) FROM messages WHERE run_id = %s"
            " ORDER BY recipient_id, channel_index",
            (run_id,),
        ).fetchall()
        run = conn.execute(
            "SELECT state, split_complete, split_line, segments, recipients FROM runs WHERE id = %s",
            (run_id,),
        ).fetchone()
    assert run is not None
    return recipients, messages, tuple(run)


def launched_counts(campaign: str) -> dict[tuple[str, ...], float]:
    return {
        tuple(s.labels[k] for k in ("channel", "provider", "status")): s.value
        for metric in MESSAGES.collect()
        for s in metric.samples
        if s.name.endswith("_total") and s.labels.get("campaign") == campaign
    }


def test_a_split_in_several_processes_stores_what_one_process_stores(
    tmp_path: Path, schema_url: str, rt: Runtime, monkeypatch: pytest.MonkeyPatch, small_chunks: None
) -> None:
    assert rt.config is not None
    prepared = load_campaign(tmp_path / "par.yaml", rt.config)
    assert len(prepared.audience.shards(40, min_bytes=2048) or []) == 40  # the file can be cut

    forks: list[int] = []
    real_pool = launching.multiprocessing.get_context("fork").Pool

    def counting_pool(processes: int, **options: Any) -> Any:
        forks.append(processes)
        return real_pool(processes, **options)

    class Context:
        Pool = staticmethod(counting_pool)

    monkeypatch.setattr(launching.multiprocessing, "get_context", lambda method: Context)
    par, par_queued = split(rt, tmp_path, "par", parallel=True)
    assert forks == [2]  # the readers really were forked
    monkeypatch.undo()
    sequential(monkeypatch)
    seq, seq_queued = split(rt, tmp_path, "seq", parallel=False)

    counts = ("recipients", "filtered", "duplicates", "invalid_rows", "suppressed")
    assert {c: getattr(par, c) for c in counts} == {c: getattr(seq, c) for c in counts}
    assert par.duplicates >= 5 and par.filtered > 100 and par.invalid_rows > 5
    assert stored(schema_url, par.run.id) == stored(schema_url, seq.run.id)
    recipients, _, (state, complete, _line, segments, total) = stored(schema_url, par.run.id)
    assert (state, complete) == ("running", True)
    assert total == len(recipients) == par.recipients + par.invalid_rows
    # every segment queued once, in order, as the single process queues them
    assert [s for _, s in par_queued] == [s for _, s in seq_queued] == list(range(segments))
    # the tab and the backslash of a name went through COPY's escaping unchanged
    assert json.loads(next(r[3] for r in recipients if r[0] == "50"))["prenom"] == "Zoé\\50\tA"
    assert launched_counts("par") == launched_counts("seq")


def test_a_parallel_split_that_dies_is_finished_by_launching_again(
    tmp_path: Path, schema_url: str, rt: Runtime, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:

    class Died(Exception):
        pass

    def dying(run: str, segment: int) -> None:
        if segment == 60:
            raise Died

    with pytest.raises(Died):
        split(rt, tmp_path, "par", parallel=True, enqueue=dying, key="k")
    run = rt.ledger.find_run("k")
    assert run is not None and not run.split_complete and run.recipients >= 60 * 37
    again, queued = split(rt, tmp_path, "par", parallel=True, key="k")
    assert again.resumed and again.run.id == run.id
    sequential(monkeypatch)
    seq, _ = split(rt, tmp_path, "seq", parallel=False)
    assert stored(schema_url, run.id)[1] == stored(schema_url, seq.run.id)[1]
    # nothing was sent yet: the relaunch queues every segment again (a queued one may be lost)
    assert sorted({s for _, s in queued}) == list(range(again.run.segments))


def test_a_chunk_that_cannot_be_read_is_reported_as_one_process_reports_it(
    tmp_path: Path, schema_url: str, rt: Runtime, small_chunks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("par", "seq"):  # a file said to be UTF-8, with a byte that is not, far down
        path = tmp_path / f"{name}.yaml"
        path.write_text(path.read_text().replace("  id: id\n", "  id: id\n  encoding: utf-8\n"))
    data = (tmp_path / "people.csv").read_bytes()
    cut = data.index(b"\n5000;")
    (tmp_path / "people.csv").write_bytes(data[:cut] + b"\n5000;\xff\xfe;40;lundi;;" + data[cut:])
    with pytest.raises(Exception) as parallel_error:
        split(rt, tmp_path, "par", parallel=True, key="p")
    sequential(monkeypatch)
    with pytest.raises(Exception) as sequential_error:
        split(rt, tmp_path, "seq", parallel=False, key="s")
    assert str(parallel_error.value) == str(sequential_error.value).replace("seq.yaml", "par.yaml")
    par, seq = rt.ledger.find_run("p"), rt.ledger.find_run("s")
    assert par is not None and seq is not None and not par.split_complete
    assert 0 < par.recipients < 5000 and par.split_line < 5002  # what was read before it is stored
    # the officer fixes the line and launches again with the same key: both runs end the same
    (tmp_path / "people.csv").write_bytes(data[:cut] + b"\n5000;Zo\xc3\xa9;40;lundi;;" + data[cut:])
    monkeypatch.setattr(launching, "PARALLEL_MIN_BYTES", 0)
    assert split(rt, tmp_path, "par", parallel=True, key="p")[0].resumed
    sequential(monkeypatch)
    assert split(rt, tmp_path, "seq", parallel=False, key="s")[0].resumed
    assert stored(schema_url, par.id)[1:] == stored(schema_url, seq.id)[1:]


def screened_split(
    tmp_path: Path, url: str, *, parallel: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, ...]:
    """A campaign with a suppression list, ``exclude_reached`` and ``limits.per_recipient``, after an
    earlier run of it and a run of another campaign."""
    from datetime import UTC, datetime

    from smartpush.ledger import Suppression
    from smartpush.unsubscribe import recipient_hash

    folder = tmp_path / ("par" if parallel else "seq")
    folder.mkdir()
    with opened(folder, url, 6_000, settings="limits:\n  per_recipient: 1/7d\n") as rt:
        assert rt.config is not None
        campaign = CAMPAIGN.format(name="rappel").replace("category: service", "category: information")
        campaign = campaign.replace(
            '  where: "age >= 18"\n', '  where: "age >= 18"\n  exclude_reached: 30d\n'
        )
        (folder / "main.yaml").write_text(campaign, encoding="utf-8")
        rows = people(6_000).splitlines()
        (folder / "prior.csv").write_text("\n".join(rows[:1] + rows[1::7]) + "\n", encoding="utf-8")
        (folder / "prior.yaml").write_text(campaign.replace("people.csv", "prior.csv"), encoding="utf-8")
        (folder / "other.csv").write_text("\n".join(rows[:1] + rows[2::11]) + "\n", encoding="utf-8")
        other = campaign.replace("people.csv", "other.csv").replace("name: rappel", "name: autre")
        (folder / "other.yaml").write_text(other, encoding="utf-8")
        key = rt.config.secret_key()
        now = datetime.now(UTC)
        rt.ledger.suppress(
            [
                Suppression(
                    "sms", recipient_hash(key, "sms", f"+336{12345600 + i:08d}"), "opt-out", "test", now
                )
                for i in range(0, 6_000, 13)
            ]
            + [
                Suppression(
                    "email", recipient_hash(key, "email", f"p{i}@example.fr"), "hard-bounce", "test", now
                )
                for i in range(0, 6_000, 17)
            ]
        )
        sequential(monkeypatch)
        prior, _ = split(rt, folder, "prior", parallel=False)  # still queued: its recipients count as reached
        split(rt, folder, "other", parallel=False)  # another campaign: counts for the per-recipient cap
        monkeypatch.setattr(launching, "PARALLEL_MIN_BYTES", 0 if parallel else 1 << 62)
        started: list[object] = []
        real_start = launching._Readers.start

        def start(*args: Any) -> Any:
            started.append(readers := real_start(*args))
            return readers

        monkeypatch.setattr(launching._Readers, "start", start)
        done, queued = split(rt, folder, "main", parallel=parallel)
        assert (started[0] is not None) is parallel  # read by forked readers, or in this process
        counts = tuple(
            getattr(done, c)
            for c in (
                "recipients",
                "filtered",
                "duplicates",
                "invalid_rows",
                "suppressed",
                "reached_recently",
                "capped",
            )
        )
        return counts, stored(url, done.run.id)[1:], [s for _, s in queued], prior.recipients


def test_a_split_in_several_processes_applies_the_suppression_list_and_exclude_reached_as_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_chunks: None
) -> None:
    with throwaway_schema("split") as par_url, throwaway_schema("split") as seq_url:
        par = screened_split(tmp_path, par_url, parallel=True, monkeypatch=monkeypatch)
        seq = screened_split(tmp_path, seq_url, parallel=False, monkeypatch=monkeypatch)
    assert par == seq
    counts = dict(
        zip(
            ("recipients", "filtered", "duplicates", "invalid", "suppressed", "reached", "capped"),
            par[0],
            strict=True,
        )
    )
    assert counts["suppressed"] > 300 and counts["reached"] > 500 and counts["capped"] > 300  # all happened
    statuses = {(m[2], m[5], m[8]) for m in par[1][0]}  # channel, status, error code
    assert {("sms", "suppressed", "opt-out"), ("sms", "skipped", "reached-recently")} <= statuses
    assert ("sms", "skipped", "frequency-cap") in statuses


@needs_services(4)
def test_ctrl_c_during_a_split_in_several_processes_then_the_same_key_finishes_it(
    tmp_path: Path, schema_url: str
) -> None:
    import os
    import signal
    import subprocess
    import time

    from conftest import smartpush_exe

    rows = 220_000  # 9+ MiB: the real threshold, read by forked readers
    (tmp_path / "people.csv").write_text(people(rows), encoding="utf-8")
    assert (tmp_path / "people.csv").stat().st_size >= launching.PARALLEL_MIN_BYTES
    (tmp_path / "c.yaml").write_text(CAMPAIGN.format(name="gros"), encoding="utf-8")
    command = [smartpush_exe(), "send", "c.yaml", "--yes", "--detach", "--key", "gros-1"]
    env = {**os.environ, "NO_COLOR": "1"}
    with flushed_redis(4) as broker:  # a broker: --detach launches only, no worker sends
        (tmp_path / "smartpush.yaml").write_text(
            f"database: {schema_url}\nbroker: {broker}\n"
            "providers:\n  sms: {type: outbox}\n  mail: {type: outbox}\n",
            encoding="utf-8",
        )
        launcher = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        with psycopg.connect(schema_url, autocommit=True) as conn:
            while time.monotonic() < deadline and launcher.poll() is None:
                table = conn.execute("SELECT to_regclass('recipients') IS NOT NULL").fetchone()
                stored_yet = table is not None and table[0]
                if stored_yet and (conn.execute("SELECT count(*) FROM recipients").fetchone() or (0,))[0]:
                    break  # the split has stored its first batches
                time.sleep(0.02)
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C reaches the whole group, readers included
        _, err = launcher.communicate(timeout=60)
        assert "Traceback" not in err and "ForkPoolWorker" not in err, err[-2000:]
        again = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert again.returncode == 0, again.stderr[-2000:]
    with psycopg.connect(schema_url) as conn:
        ((complete, recipients),) = conn.execute("SELECT split_complete, recipients FROM runs").fetchall()
        stored_rows = conn.execute("SELECT count(*) FROM recipients").fetchone()
    assert complete and stored_rows is not None and stored_rows[0] == recipients
    # every row of the file once: the ones not filtered out and not duplicates of an earlier one
    expected = Runtime(load_config(tmp_path / "smartpush.yaml", env={}))
    try:
        assert expected.config is not None
        prepared = load_campaign(tmp_path / "c.yaml", expected.config)
        seen: set[str] = set()
        kept = 0
        for outcome in launching.Evaluator(prepared, render="none", dedup=False).over(prepared.audience):
            if outcome.kind == "invalid":
                kept += 1
            elif outcome.kind == "recipient" and outcome.recipient_id not in seen:
                seen.add(outcome.recipient_id or "")
                kept += 1
        assert recipients == kept
    finally:
        expected.close()
