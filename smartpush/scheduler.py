"""``smartpush scheduler``: launches the scheduled campaigns of a folder, once per slot, at most one
scheduler active.

Every ``tick`` the active scheduler reads the campaign files again (an edit takes effect at the next
slot; a broken file is reported and the others go on), and for each campaign with ``schedule.cron`` or
``schedule.at`` looks at the slots since the last one on record (SPEC ``schedule:``):

* the latest slot that is at most ``schedule.catch_up`` late and before ``schedule.not_after`` is
  launched, with the same run key as ``send --key auto`` (``NAME@2026-12-01T09:00``): a cron job, a
  second scheduler or a retry that launches the same slot finds the same run;
* every other slot since the last one on record is recorded as skipped, with the reason: missed by more
  than ``catch_up`` (after an outage nothing stale is sent, listmonk #1801), past ``not_after``, or
  superseded by a later slot (a recipient gets one reminder, not three).

A campaign the scheduler has never seen starts ``catch_up`` back, so a new scheduler launches a slot
that has just passed but records nothing older. The outcome of every slot is in the ledger
(``smartpush runs --campaign NAME``).

One scheduler is active at a time: in distributed mode a Redis lock that expires (another scheduler on
any host takes over within ``lock_ttl`` after the active one dies); embedded, a lock on a file in the
project folder (the operating system releases it when the process dies). Others stand by. The run key
makes a launch idempotent anyway; the lock keeps two schedulers from splitting the same audience twice.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Protocol

from .config import Config
from .errors import SmartpushError
from .launch import Enqueue, launch
from .ledger import Ledger, OccurrenceRecord
from .loading import PreparedCampaign, load_campaign
from .occurrences import refusal, slot_key, slots, zone
from .runtime import Runtime

__all__ = ["FileLock", "Lock", "RedisLock", "Scheduler", "SlotOutcome", "campaign_files"]

logger = logging.getLogger("smartpush.scheduler")

#: Slots looked at per campaign and pass: after a long outage of a minutely cron, the latest ones.
MAX_SLOTS = 1_000
#: Skipped slots logged one by one per campaign and pass; the rest are counted in one line.
LOGGED_SKIPS = 10
#: The Redis key of the scheduler lock (in the broker's database).
LOCK_KEY = "smartpush:scheduler:lock"
#: How long a Redis lock outlives its holder's last renewal.
DEFAULT_LOCK_TTL = timedelta(seconds=30)

Clock = Callable[[], datetime]


class Lock(Protocol):
    """At most one holder at a time, across processes (and hosts, for Redis)."""

    #: How long the lock outlives its holder's last renewal; None: it never expires while held.
    expires_after_s: float | None

    def acquire(self) -> bool: ...

    def renew(self) -> bool: ...

    def release(self) -> None: ...


class FileLock:
    """An exclusive ``flock`` on a file: held until released or the process dies (embedded mode)."""

    expires_after_s: float | None = None  # the operating system releases it when the process dies

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def acquire(self) -> bool:
        if self._file is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        return True

    def renew(self) -> bool:
        return self._file is not None

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class RedisLock:
    """A Redis key holding this scheduler's token, expiring ``ttl`` after its last renewal."""

    def __init__(self, url: str, ttl: timedelta = DEFAULT_LOCK_TTL, key: str = LOCK_KEY) -> None:
        import redis

        self.client = redis.Redis.from_url(url)
        self.key = key
        self.ttl_ms = max(1, int(ttl.total_seconds() * 1000))
        self.expires_after_s: float | None = self.ttl_ms / 1000
        self.token = secrets.token_hex(16)

    def acquire(self) -> bool:
        if self.renew():
            return True
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        return bool(self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms))

    def release(self) -> None:
        self.client.eval(_RELEASE, 1, self.key, self.token)

    def close(self) -> None:
        self.client.close()


def lock_for(config: Config, ttl: timedelta = DEFAULT_LOCK_TTL) -> Lock:
    """A Redis lock when workers share a Redis broker, else a file lock in the project folder."""
    broker = config.settings.broker
    if broker is not None and broker.startswith(("redis://", "rediss://", "unix://")):
        return RedisLock(broker, ttl)
    return FileLock(config.project_dir / ".smartpush" / "scheduler.lock")


def campaign_files(paths: Sequence[Path]) -> list[Path]:
    """The campaign files among ``paths``: files as given, folders' ``*.yaml``/``*.yml`` files."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()))
        else:
            found.append(path)
    return found


@dataclass(frozen=True)
class SlotOutcome:
    """What one pass did with one slot."""

    campaign: str
    key: str
    slot: datetime
    outcome: str  # launched, found (a run with the key existed), skipped
    run_id: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {
            "campaign": self.campaign,
            "key": self.key,
            "slot": self.slot.isoformat(),
            "outcome": self.outcome,
            "run_id": self.run_id,
            "reason": self.reason,
        }


class Scheduler:
    """Launches the slots of the campaigns in ``paths`` that are due at ``clock()``.

    ``enqueue`` queues a segment (the engine's); ``clock`` is :func:`datetime.now` in UTC unless a
    test gives its own.
    """

    def __init__(
        self,
        rt: Runtime,
        paths: Sequence[Path],
        *,
        enqueue: Enqueue,
        lock: Lock,
        clock: Clock | None = None,
    ) -> None:
        self.rt = rt
        self.config = rt.config
        self.ledger: Ledger = rt.ledger
        self.paths = list(paths)
        self.enqueue = enqueue
        self.lock = lock
        self.clock: Clock = clock or (lambda: datetime.now(UTC))
        self.active = False
        self._standing_by = False
        self.broken: dict[Path, str] = {}  # file → its last error, reported once until it changes

    # The lock -----------------------------------------------------------------------------------
    def hold(self) -> bool:
        """Take or keep the lock; says so in the log when this scheduler becomes active or stands by."""
        try:
            held = self.lock.renew() if self.active else self.lock.acquire()
        except Exception as exc:  # Redis down: not active, try again next tick
            logger.warning(
                "scheduler lock unreachable (%s); standing by",
                type(exc).__name__,
                extra={"outcome": "standby"},
            )
            held = False
        if held and not self.active:
            logger.info("scheduler active: launching the scheduled campaigns", extra={"outcome": "active"})
        elif not held and self.active:
            logger.warning("scheduler lost its lock; standing by", extra={"outcome": "standby"})
        elif not held and not self._standing_by:
            logger.info("another scheduler is active; standing by to take over", extra={"outcome": "standby"})
        self._standing_by = not held
        self.active = held
        return held

    def release(self) -> None:
        if self.active:
            with suppress(Exception):
                self.lock.release()
            self.active = False

    @contextmanager
    def kept(self) -> Iterator[None]:
        """Renew the lock in the background every third of its expiry while this runs: between two
        passes (the tick may be as long as the expiry) and during a long launch (a large split)."""
        if self.lock.expires_after_s is None:  # nothing to renew
            yield
            return
        stop = threading.Event()
        every = max(0.05, self.lock.expires_after_s / 3)

        def keep() -> None:
            while not stop.wait(every):
                if self.active:
                    with suppress(Exception):
                        self.lock.renew()

        thread = threading.Thread(target=keep, name="smartpush-scheduler-lock", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # One pass -----------------------------------------------------------------------------------
    def tick(self) -> list[SlotOutcome]:
        """One pass over the campaigns, if this scheduler holds the lock; what it did with each slot."""
        if not self.hold():
            return []
        done: list[SlotOutcome] = []
        for path in campaign_files(self.paths):
            prepared = self._load(path)
            if prepared is None:
                continue
            schedule = prepared.campaign.schedule
            if schedule.cron is None and schedule.at is None:
                continue
            try:
                done.extend(self._campaign(prepared))
            except SmartpushError as exc:
                logger.error(
                    "campaign %s: its slot could not be launched: %s",
                    prepared.campaign.name,
                    exc,
                    extra={"campaign": prepared.campaign.name, "outcome": "error"},
                )
        return done

    def _load(self, path: Path) -> PreparedCampaign | None:
        try:
            prepared = load_campaign(path, self.config)
        except SmartpushError as exc:
            text = str(exc)
            if self.broken.get(path) != text:
                logger.error(
                    "campaign file %s is invalid and is not scheduled until fixed:\n%s",
                    path,
                    text,
                    extra={"file": str(path), "outcome": "invalid"},
                )
            self.broken[path] = text
            return None
        if self.broken.pop(path, None) is not None:
            logger.info(
                "campaign file %s is valid again", path, extra={"file": str(path), "outcome": "valid"}
            )
        return prepared

    def _campaign(self, prepared: PreparedCampaign) -> list[SlotOutcome]:
        campaign = prepared.campaign
        now = self.clock()
        tz = zone(campaign, self.config.settings.timezone)
        last = self.ledger.last_slot(campaign.name)
        after = last if last is not None else now - campaign.schedule.catch_up - timedelta(microseconds=1)
        due = slots(campaign, after, now, self.config.settings.timezone, limit=MAX_SLOTS)
        if last is None:
            due = due[-1:]  # a campaign seen for the first time: its latest slot only
        if not due:
            return []
        launchable = [s for s in due if refusal(campaign, s, now, tz) is None]
        chosen = launchable[-1] if launchable else None
        out: list[SlotOutcome] = []
        for slot in due:
            key = slot_key(campaign, slot, tz)
            if slot == chosen:
                out.append(self._launch(prepared, slot, key))
                continue
            why = refusal(campaign, slot, now, tz) or (
                f"a later slot ({slot_key(campaign, chosen, tz).partition('@')[2]}) was launched instead"
                if chosen is not None
                else "not launched"
            )
            out.append(self._skip(campaign.name, slot, key, why, quiet=len(out) >= LOGGED_SKIPS))
        skipped = sum(1 for o in out if o.outcome == "skipped")
        if skipped > LOGGED_SKIPS:
            logger.warning(
                "campaign %s: %d slots skipped in all (the first %d are logged above)",
                campaign.name,
                skipped,
                LOGGED_SKIPS,
                extra={"campaign": campaign.name, "outcome": "skipped", "slots": skipped},
            )
        return out

    def _record(
        self,
        name: str,
        slot: datetime,
        key: str,
        outcome: str,
        *,
        run_id: str | None = None,
        reason: str | None = None,
    ) -> OccurrenceRecord:
        record = OccurrenceRecord(
            key, name, slot, outcome, "scheduler", self.clock(), reason=reason, run_id=run_id
        )
        return self.ledger.record_occurrence(record)

    def _launch(self, prepared: PreparedCampaign, slot: datetime, key: str) -> SlotOutcome:
        name = prepared.campaign.name
        result = launch(self.rt, prepared, enqueue=self.enqueue, key=key)
        run = result.run
        stored = self._record(name, slot, key, "launched", run_id=run.id)
        outcome = "launched" if result.created else "found"
        logger.info(
            "campaign %s: slot %s %s run %s",
            name,
            key,
            "launched" if result.created else "already had",
            run.id,
            extra={"campaign": name, "key": key, "run_id": run.id, "outcome": outcome},
        )
        return SlotOutcome(name, key, slot, outcome, stored.run_id or run.id)

    def _skip(self, name: str, slot: datetime, key: str, why: str, *, quiet: bool = False) -> SlotOutcome:
        stored = self._record(name, slot, key, "skipped", reason=why)
        if stored.outcome == "launched":  # a cron job or another scheduler launched it meanwhile
            return SlotOutcome(name, key, slot, "found", stored.run_id)
        if quiet:
            return SlotOutcome(name, key, slot, "skipped", reason=why)
        logger.warning(
            "campaign %s: slot %s skipped: %s",
            name,
            key,
            why,
            extra={"campaign": name, "key": key, "outcome": "skipped"},
        )
        return SlotOutcome(name, key, slot, "skipped", reason=why)
