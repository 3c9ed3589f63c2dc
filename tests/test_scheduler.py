"""`smartpush scheduler` with a controllable clock: each slot launched once, whatever runs at once;
after downtime one catch-up inside `catch_up`, skips recorded outside it; the history in the ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import smartpush_exe
from servers import flushed_redis, needs_services, throwaway_database

from smartpush.config import load_config
from smartpush.ledger import Ledger
from smartpush.runtime import Runtime
from smartpush.scheduler import FileLock, Lock, RedisLock, Scheduler, SlotOutcome

REDIS_DB = 8

CAMPAIGN = """\
name: rappel
category: information
audience:
  source: people.csv
  id: id
channels:
  - channel: sms
    provider: outbox
    body: "Bonjour, votre rendez-vous approche."
schedule:
{schedule}
"""


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


class Clock:
    """A clock the test moves; every scheduler of a test reads the same one."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class NoLock:
    """A lock that every scheduler gets: only the run key stands between them and a double launch."""

    expires_after_s: float | None = None

    def acquire(self) -> bool:
        return True

    def renew(self) -> bool:
        return True

    def release(self) -> None:
        pass


def write_project(root: Path, schedule: str, database: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    db = database or f"sqlite:///{root / 'ledger.db'}"
    (root / "smartpush.yaml").write_text(
        f"database: {db}\ntimezone: Europe/Paris\n"
        "providers:\n  outbox:\n    type: outbox\n    path: outbox\n",
        encoding="utf-8",
    )
    rows = ["id;phone"] + [f"{i};06{12345600 + i:08d}" for i in range(5)]
    (root / "people.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    campaigns = root / "campaigns"
    campaigns.mkdir(exist_ok=True)
    indented = "\n".join(f"  {line}" for line in schedule.strip().splitlines())
    (campaigns / "rappel.yaml").write_text(CAMPAIGN.format(schedule=indented), encoding="utf-8")
    return campaigns


class Host:
    """One scheduler "process": its own runtime and ledger connection, queued segments recorded."""

    def __init__(self, root: Path, lock: Lock, clock: Clock) -> None:
        self.rt = Runtime(load_config(root / "smartpush.yaml", env={}))
        self.rt.ledger.migrate()
        self.queued: list[tuple[str, int]] = []
        self.scheduler = Scheduler(
            self.rt,
            [root / "campaigns"],
            enqueue=lambda run_id, segment: self.queued.append((run_id, segment)),
            lock=lock,
            clock=clock,
        )

    def close(self) -> None:
        self.scheduler.release()
        self.rt.close()


@contextmanager
def hosts(root: Path, locks: list[Lock], clock: Clock) -> Iterator[list[Host]]:
    made = [Host(root, lock, clock) for lock in locks]
    try:
        yield made
    finally:
        for host in made:
            host.close()


def tick_together(hosts_: list[Host]) -> list[list[SlotOutcome]]:
    """Every scheduler's tick at the same moment, in threads."""
    barrier = threading.Barrier(len(hosts_))
    results: list[list[SlotOutcome]] = [[] for _ in hosts_]
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            barrier.wait()
            results[i] = hosts_[i].scheduler.tick()
        except BaseException as exc:  # raised again in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(hosts_))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def runs_by_key(ledger: Ledger) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for run in ledger.list_runs(limit=1000):
        out.setdefault(run.key or "", []).append(run.id)
    return out


@contextmanager
def two_locks(kind: str, tmp_path: Path) -> Iterator[list[Lock]]:
    if kind == "file":
        path = tmp_path / "p" / ".smartpush" / "scheduler.lock"
        yield [FileLock(path), FileLock(path)]
    elif kind == "redis":
        with flushed_redis(REDIS_DB) as url:
            locks = [RedisLock(url, timedelta(seconds=5)), RedisLock(url, timedelta(seconds=5))]
            try:
                yield list(locks)
            finally:
                for lock in locks:
                    lock.close()
    else:
        yield [NoLock(), NoLock()]


@contextmanager
def database(kind: str) -> Iterator[str | None]:
    if kind == "postgresql":
        with throwaway_database("sched") as url:
            yield url
    else:
        yield None


@needs_services(REDIS_DB)
@pytest.mark.parametrize(
    ("lock_kind", "db_kind"),
    [("file", "sqlite"), ("redis", "postgresql"), ("none", "sqlite"), ("none", "postgresql")],
)
def test_two_schedulers_running_at_once_launch_each_slot_once(
    tmp_path: Path, lock_kind: str, db_kind: str
) -> None:
    clock = Clock(utc(2026, 12, 1, 7, 59))  # 08:59 in Paris
    with ExitStack() as stack:
        url = stack.enter_context(database(db_kind))
        write_project(tmp_path / "p", 'cron: "0 9 * * *"', url)
        locks = stack.enter_context(two_locks(lock_kind, tmp_path))
        pair = stack.enter_context(hosts(tmp_path / "p", locks, clock))
        launched: list[SlotOutcome] = []
        for day in range(1, 6):  # five mornings; both schedulers tick at 09:00:00, 09:00:30 and 09:05
            for minute, second in ((0, 0), (0, 30), (5, 0)):
                clock.now = utc(2026, 12, day, 8, minute, second)
                for outcomes in tick_together(pair):
                    launched += [o for o in outcomes if o.outcome == "launched"]
        ledger = pair[0].rt.ledger
        runs = runs_by_key(ledger)
        keys = [f"rappel@2026-12-0{day}T09:00" for day in range(1, 6)]
        assert sorted(runs) == keys
        assert all(len(ids) == 1 for ids in runs.values())  # one run per slot, never two
        assert sorted(o.key for o in launched) == keys  # and each launched by one scheduler only
        if lock_kind != "none":
            assert [h.scheduler.active for h in pair].count(True) == 1  # the other stood by
        history = ledger.occurrences("rappel")
        assert {o.key: o.outcome for o in history} == dict.fromkeys(keys, "launched")
        assert {o.run_id for o in history} == {ids[0] for ids in runs.values()}


@needs_services(REDIS_DB)
@pytest.mark.parametrize("lock_kind", ["file", "redis"])
def test_a_standby_scheduler_takes_over_when_the_active_one_dies(tmp_path: Path, lock_kind: str) -> None:
    clock = Clock(utc(2026, 12, 1, 8, 0))
    write_project(tmp_path / "p", 'cron: "0 9 * * *"')
    with flushed_redis(REDIS_DB) as url:
        if lock_kind == "file":
            path = tmp_path / "p" / ".smartpush" / "scheduler.lock"
            locks: list[Lock] = [FileLock(path), FileLock(path)]
        else:
            locks = [RedisLock(url, timedelta(milliseconds=300)), RedisLock(url, timedelta(milliseconds=300))]
        first, second = Host(tmp_path / "p", locks[0], clock), Host(tmp_path / "p", locks[1], clock)
        try:
            assert [o.key for o in first.scheduler.tick()] == ["rappel@2026-12-01T09:00"]
            assert second.scheduler.tick() == []  # standing by
            # The active one dies: a process's flock goes with it; a Redis key expires unrenewed.
            if lock_kind == "file":
                locks[0].release()
            else:
                time.sleep(0.5)
            clock.now = utc(2026, 12, 2, 8, 0)
            assert [o.key for o in second.scheduler.tick()] == ["rappel@2026-12-02T09:00"]
            assert second.scheduler.active
            if lock_kind == "redis":
                assert first.scheduler.tick() == []  # it comes back: the lock is taken, it stands by
        finally:
            first.close()
            second.close()
            for lock in locks:
                if isinstance(lock, RedisLock):
                    lock.close()


@needs_services(REDIS_DB)
def test_the_active_scheduler_keeps_its_lock_between_passes_longer_than_its_expiry(tmp_path: Path) -> None:
    """A tick as long as the lock's expiry must not hand the lock to a standby at every pass."""
    clock = Clock(utc(2026, 12, 1, 8, 0))
    write_project(tmp_path / "p", 'cron: "0 9 * * *"')
    with flushed_redis(REDIS_DB) as url:
        locks = [RedisLock(url, timedelta(milliseconds=300)), RedisLock(url, timedelta(milliseconds=300))]
        first, second = Host(tmp_path / "p", locks[0], clock), Host(tmp_path / "p", locks[1], clock)
        try:
            with first.scheduler.kept():
                assert [o.outcome for o in first.scheduler.tick()] == ["launched"]
                for _ in range(3):
                    time.sleep(0.5)  # longer than the expiry, as a 30 s tick is against a 30 s lock
                    assert second.scheduler.tick() == [] and not second.scheduler.active
                    first.scheduler.tick()
                    assert first.scheduler.active
        finally:
            first.close()
            second.close()
            for lock in locks:
                lock.close()


def test_down_across_a_slot_catches_up_once_inside_catch_up(tmp_path: Path) -> None:
    clock = Clock(utc(2026, 12, 1, 8, 0))
    write_project(tmp_path / "p", 'cron: "0 9 * * *"\ncatch_up: 1h')
    with hosts(tmp_path / "p", [NoLock()], clock) as (host,):
        assert [o.outcome for o in host.scheduler.tick()] == ["launched"]
        # Down from 09:01 on the 1st to 09:40 on the 2nd: the 2nd's slot is 40 min late, within catch_up.
        clock.now = utc(2026, 12, 2, 8, 40)
        first = host.scheduler.tick()
        assert [(o.key, o.outcome) for o in first] == [("rappel@2026-12-02T09:00", "launched")]
        clock.now = utc(2026, 12, 2, 8, 41)
        assert host.scheduler.tick() == []  # caught up once, not twice
        assert len(runs_by_key(host.rt.ledger)["rappel@2026-12-02T09:00"]) == 1


def test_down_across_a_slot_for_longer_than_catch_up_records_it_skipped(tmp_path: Path) -> None:
    clock = Clock(utc(2026, 12, 1, 8, 0))
    write_project(tmp_path / "p", 'cron: "0 9 * * *"\ncatch_up: 1h')
    with hosts(tmp_path / "p", [NoLock()], clock) as (host,):
        host.scheduler.tick()
        clock.now = utc(2026, 12, 2, 9, 30)  # 10:30 in Paris: 1 h 30 late
        outcomes = host.scheduler.tick()
        assert [(o.key, o.outcome) for o in outcomes] == [("rappel@2026-12-02T09:00", "skipped")]
        assert outcomes[0].reason is not None and "catch_up" in outcomes[0].reason
        assert "rappel@2026-12-02T09:00" not in runs_by_key(host.rt.ledger)  # nothing stale was sent
        history = host.rt.ledger.occurrences("rappel")
        assert [(o.key, o.outcome) for o in history] == [
            ("rappel@2026-12-02T09:00", "skipped"),
            ("rappel@2026-12-01T09:00", "launched"),
        ]
        clock.now = utc(2026, 12, 3, 8, 0)  # the next morning: back to normal
        assert [o.outcome for o in host.scheduler.tick()] == ["launched"]


def test_several_missed_slots_launch_the_latest_one_only(tmp_path: Path) -> None:
    """An hourly reminder down for 2 h 30 with catch_up 3h: one catch-up send, not three."""
    clock = Clock(utc(2026, 12, 1, 8, 0))
    write_project(tmp_path / "p", 'cron: "0 * * * *"\ncatch_up: 3h')
    with hosts(tmp_path / "p", [NoLock()], clock) as (host,):
        host.scheduler.tick()
        clock.now = utc(2026, 12, 1, 10, 30)
        outcomes = host.scheduler.tick()
        assert [(o.key, o.outcome) for o in outcomes] == [
            ("rappel@2026-12-01T10:00", "skipped"),
            ("rappel@2026-12-01T11:00", "launched"),
        ]
        assert outcomes[0].reason == "a later slot (2026-12-01T11:00) was launched instead"


def test_slots_past_not_after_are_skipped(tmp_path: Path) -> None:
    clock = Clock(utc(2026, 12, 14, 8, 0))
    write_project(tmp_path / "p", 'cron: "0 9 * * *"\nnot_after: 2026-12-14')
    with hosts(tmp_path / "p", [NoLock()], clock) as (host,):
        assert [o.outcome for o in host.scheduler.tick()] == ["launched"]
        clock.now = utc(2026, 12, 15, 8, 0)
        outcomes = host.scheduler.tick()
        assert [o.outcome for o in outcomes] == ["skipped"]
        assert outcomes[0].reason is not None and "not_after" in outcomes[0].reason


def test_a_one_off_at_is_launched_once_when_its_time_comes(tmp_path: Path) -> None:
    clock = Clock(utc(2026, 12, 1, 7, 0))
    write_project(tmp_path / "p", "at: 2026-12-01T09:00:00+01:00")
    with hosts(tmp_path / "p", [NoLock()], clock) as (host,):
        assert host.scheduler.tick() == []  # not yet
        clock.now = utc(2026, 12, 1, 8, 0, 5)
        assert [o.key for o in host.scheduler.tick()] == ["rappel@2026-12-01T09:00"]
        clock.now = utc(2026, 12, 1, 8, 30)
        assert host.scheduler.tick() == []
        assert len(runs_by_key(host.rt.ledger)) == 1


def test_a_new_scheduler_launches_a_slot_just_passed_but_records_nothing_older(tmp_path: Path) -> None:
    clock = Clock(utc(2026, 12, 1, 8, 20))  # 09:20 in Paris; the scheduler starts for the first time
    write_project(tmp_path / "p", 'cron: "*/10 * * * *"\ncatch_up: 1h')
    with hosts(tmp_path / "p", [NoLock()], clock) as (host,):
        outcomes = host.scheduler.tick()
        assert [(o.key, o.outcome) for o in outcomes] == [("rappel@2026-12-01T09:20", "launched")]
        assert len(host.rt.ledger.occurrences("rappel")) == 1


def test_a_tick_in_the_last_second_before_a_slot_neither_skips_nor_loses_it(tmp_path: Path) -> None:
    """A tick at 08:59:59.6 (Paris 09:59:59.6) must not take the 10:00 slot for a missed one: it stays
    to come and the next tick launches it (CI caught a `scheduler --once` at hh:mm:59 that did)."""
    clock = Clock(utc(2026, 12, 1, 8, 50))
    write_project(tmp_path / "p", 'cron: "0 * * * *"\ncatch_up: 1h')
    with hosts(tmp_path / "p", [NoLock()], clock) as (host,):
        first = host.scheduler.tick()  # seen for the first time: the 09:00 slot, 50 min late
        assert [(o.key, o.outcome) for o in first] == [("rappel@2026-12-01T09:00", "launched")]
        clock.now = utc(2026, 12, 1, 8, 59, 59) + timedelta(milliseconds=600)
        assert host.scheduler.tick() == []  # 10:00 has not come: nothing launched, nothing skipped
        clock.now = utc(2026, 12, 1, 9, 0, 1)
        later = host.scheduler.tick()
        assert [(o.key, o.outcome) for o in later] == [("rappel@2026-12-01T10:00", "launched")]
        assert [o.outcome for o in host.rt.ledger.occurrences("rappel")] == ["launched", "launched"]


def test_a_new_scheduler_in_the_last_second_before_a_slot_launches_the_one_just_passed(
    tmp_path: Path,
) -> None:
    clock = Clock(utc(2026, 12, 1, 8, 59, 59) + timedelta(milliseconds=600))
    write_project(tmp_path / "p", 'cron: "* * * * *"')
    with hosts(tmp_path / "p", [NoLock()], clock) as (host,):
        outcomes = host.scheduler.tick()
        assert [(o.key, o.outcome) for o in outcomes] == [("rappel@2026-12-01T09:59", "launched")]


def test_a_broken_campaign_file_is_reported_and_the_others_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(utc(2026, 12, 1, 8, 0))
    campaigns = write_project(tmp_path / "p", 'cron: "0 9 * * *"')
    (campaigns / "broken.yaml").write_text("name: broken\nschedule: {cron: 'every day'}\n", encoding="utf-8")
    with hosts(tmp_path / "p", [NoLock()], clock) as (host,):
        assert [o.key for o in host.scheduler.tick()] == ["rappel@2026-12-01T09:00"]
    assert any("broken.yaml" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


# The command --------------------------------------------------------------------------------------


def test_runs_campaign_shows_launched_and_skipped_slots(
    tmp_path: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    clock = Clock(utc(2026, 12, 1, 8, 0))
    write_project(tmp_path / "p", 'cron: "0 9 * * *"\ncatch_up: 1h')
    with hosts(tmp_path / "p", [NoLock()], clock) as (host,):
        host.scheduler.tick()
        clock.now = utc(2026, 12, 2, 12, 0)
        host.scheduler.tick()
    done = run_cli("runs", "--campaign", "rappel", "--json", cwd=tmp_path / "p")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    slots = [(o["key"], o["outcome"], o["source"], o["run_id"] is not None) for o in out["occurrences"]]
    assert slots == [
        ("rappel@2026-12-02T09:00", "skipped", "scheduler", False),
        ("rappel@2026-12-01T09:00", "launched", "scheduler", True),
    ]
    assert out["occurrences"][1]["run_id"] == out["runs"][0]["run_id"]
    assert "catch_up" in out["occurrences"][0]["reason"]
    text = run_cli("runs", "--campaign", "rappel", cwd=tmp_path / "p")
    assert "rappel@2026-12-02T09:00" in text.stdout and "skipped" in text.stdout


def test_scheduler_once_launches_the_due_slot_and_sends_it(
    tmp_path: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    write_project(tmp_path / "p", 'cron: "* * * * *"')
    first = run_cli("scheduler", "--once", "--json", cwd=tmp_path / "p")
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["active"] is True and [s["outcome"] for s in out["slots"]] == ["launched"]
    status = json.loads(run_cli("status", out["slots"][0]["run_id"], "--json", cwd=tmp_path / "p").stdout)
    assert status["state"] == "finished" and status["counts"] == {"sent": 5}  # embedded: it sent them
    again = run_cli("scheduler", "--once", "--json", cwd=tmp_path / "p")
    # The same minute: nothing is due; the next minute: that minute's slot, never the first one again.
    assert out["slots"][0]["key"] not in [s["key"] for s in json.loads(again.stdout)["slots"]]


def test_scheduler_once_exits_1_naming_a_broken_campaign_file(
    tmp_path: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    campaigns = write_project(tmp_path / "p", 'cron: "0 9 * * *"')
    (campaigns / "broken.yaml").write_text("name: broken\n", encoding="utf-8")
    done = run_cli("scheduler", "--once", "--json", cwd=tmp_path / "p")
    assert done.returncode == 1
    assert json.loads(done.stdout)["invalid_files"] == [str(campaigns / "broken.yaml")]
    assert "broken.yaml" in done.stderr


def test_two_scheduler_processes_one_active_and_a_takeover(tmp_path: Path) -> None:
    """Two real `smartpush scheduler` processes on one embedded project: one launches, the other stands
    by; SIGTERM on the active one hands over, and the slot it launched is not launched again."""
    write_project(tmp_path / "p", 'cron: "* * * * *"')
    env = {**os.environ, "SMARTPUSH_LOG_FORMAT": "json"}
    cmd = [smartpush_exe(), "scheduler", "--tick", "0.2s"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = []
    for log in logs:
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, cwd=tmp_path / "p", env=env, stdout=f, stderr=subprocess.STDOUT)
            procs.append(proc)
    try:
        deadline = time.monotonic() + 30
        active: list[int] = []
        standby: list[int] = []
        while time.monotonic() < deadline and not (active and standby):
            time.sleep(0.2)
            active = [i for i, log in enumerate(logs) if "scheduler active" in log.read_text()]
            standby = [i for i, log in enumerate(logs) if "standing by" in log.read_text()]
        assert len(active) == 1 and standby == [1 - active[0]], [log.read_text()[-2000:] for log in logs]
        first, other = active[0], standby[0]
        procs[first].send_signal(signal.SIGTERM)
        assert procs[first].wait(timeout=30) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "scheduler active" not in logs[other].read_text():
            time.sleep(0.2)
        assert "scheduler active" in logs[other].read_text()
        time.sleep(1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)
    ledger = Ledger(f"sqlite:///{tmp_path / 'p' / 'ledger.db'}")
    try:
        runs = runs_by_key(ledger)
    finally:
        ledger.close()
    assert runs and all(len(ids) == 1 for ids in runs.values())  # each minute's slot once
