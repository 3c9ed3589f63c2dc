"""What one smartpush process holds while it sends: config, ledger, drivers, loop, rate limiters.

A worker process builds one :class:`Runtime` and keeps it: provider drivers (and their HTTP connection
pools) live as long as the process, on one asyncio event loop running in a thread of its own. Dramatiq
worker threads do the database work and hand each batch of sends to that loop (:meth:`Runtime.run`),
the one place where synchronous code meets asynchronous code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import threading
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from . import registry
from .config import Config, load_config
from .errors import InfrastructureError, SmartpushError
from .failover import Breaker
from .ledger import Ledger, RunRecord, RunState
from .loading import PreparedCampaign, load_campaign
from .provider import Provider
from .ratelimit import LEASE_MARGIN_SECONDS, AccountLimiter, Bucket, MemoryStore, RedisStore, Store
from .recipients import Evaluator

__all__ = ["Runtime", "database_url", "open_ledger"]

T = TypeVar("T")

#: How long a process trusts its last reading of a run's state (pause, cancel) before reading it again.
RUN_STATE_TTL_S = 0.5
#: The oldest reading a message about to leave may rely on while a fresh one is read.
RUN_STATE_MAX_AGE_S = 2.0


def _local_midnight(wall: datetime, config: Config) -> datetime:
    """The start of ``wall``'s day in the configured timezone (where daily quotas reset), in UTC."""
    tz = ZoneInfo(config.settings.timezone)
    day = wall.astimezone(tz).date()
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)


def database_url(config: Config) -> str:
    """The configured ledger, or ``smartpush.db`` (SQLite) in the project folder."""
    return config.settings.database or f"sqlite:///{config.project_dir / 'smartpush.db'}"


def open_ledger(config: Config) -> Ledger:
    """The configured ledger, migrated; an :class:`InfrastructureError` saying what to check when the
    database is out of reach (never its URL, which may hold a password)."""
    try:
        ledger = Ledger(database_url(config))
        ledger.migrate()
    except SmartpushError:
        raise
    except Exception as exc:  # SQLAlchemy's OperationalError and friends: the database is out of reach
        raise InfrastructureError(
            f"the ledger database cannot be reached ({type(exc).__name__}); check `database:` in "
            f"{config.source} or SMARTPUSH_DATABASE_URL"
        ) from None
    return ledger


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (Linux, macOS), else asyncio's.

    A worker spends most of its CPU in the event loop (one HTTP request per message); uvloop's loop
    does the same work in C.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on the platforms that have it
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _LoopThread:
    """An asyncio event loop (uvloop's where installed) running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = _new_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="smartpush-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class Runtime:
    """Per-process state for sending. Thread-safe; build one per process."""

    def __init__(self, config: Config, *, ledger: Ledger | None = None) -> None:
        self.config = config
        self.ledger = ledger or Ledger(database_url(config))
        self._lock = threading.Lock()
        self._providers: dict[str, Provider] = {}
        self._limiters: dict[str, AccountLimiter] = {}
        self._campaigns: dict[str, PreparedCampaign] = {}
        self._loading: dict[str, threading.Lock] = {}  # run id → held while its campaign is loaded
        self._evaluators: dict[str, Evaluator] = {}
        self._run_states: dict[str, tuple[float, bool]] = {}
        self._reading: dict[str, asyncio.Task[bool]] = {}
        self._loop: _LoopThread | None = None
        self._key = config.secret_key()
        failover = config.settings.failover
        broker = config.settings.broker
        shared = broker is not None and broker.startswith(("redis://", "rediss://", "unix://"))
        #: Where rate limits, quotas and throttle pauses live: Redis when workers share a broker there.
        self.limit_store: Store = RedisStore(broker) if shared and broker is not None else MemoryStore()
        self.breaker = Breaker(
            failover.errors,
            failover.within.total_seconds(),
            failover.cooldown.total_seconds(),
            broker if broker is not None and broker.startswith(("redis://", "rediss://")) else None,
        )

    @classmethod
    def from_config_file(cls, path: str | None) -> Runtime:
        return cls(load_config(Path(path) if path else None))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the process's event loop and wait for it (called from worker threads)."""
        with self._lock:
            if self._loop is None:
                self._loop = _LoopThread()
            loop = self._loop
        return loop.run(coro)

    def provider(self, account: str) -> Provider:
        found = self._providers.get(account)  # built once; asked for at every message
        if found is not None:
            return found
        with self._lock:
            if account not in self._providers:
                options = self.config.account(account)
                cls = registry.driver(options.type)
                self._providers[account] = cls(account, options, project_dir=self.config.project_dir)
            return self._providers[account]

    def warm_up(self) -> None:
        """Import and start what a process's first message needs beyond its driver (loaded with the
        configuration): the HTTP client, the rate-limit store's client and the event loop thread.

        A worker calls it as it starts: otherwise its first batches wait while the event loop thread
        imports aiohttp, holding the GIL (0.5 - 1 s before the first answer, measured).
        """
        with contextlib.suppress(ImportError):
            import aiohttp  # noqa: F401 - imported for its side effect: loaded now, not mid-batch
        if isinstance(self.limit_store, RedisStore):
            import redis.asyncio  # noqa: F401
        self.run(asyncio.sleep(0))

    def bucket(self, account: str) -> Bucket:
        """An account's limits as ``smartpush.yaml`` gives them."""
        options = self.config.account(account)
        return Bucket(
            account,
            options.messages_per_second,
            options.daily_quota,
            self.config.settings.timezone,
            options.cluster_concurrency,
            options.timeout.total_seconds() + LEASE_MARGIN_SECONDS,
        )

    def limiter(self, account: str) -> AccountLimiter:
        """The account's pacing in this process (shared with every worker through the limit store)."""
        found = self._limiters.get(account)  # built once; asked for at every message
        if found is not None:
            return found
        with self._lock:
            if account not in self._limiters:
                from .metrics import RATE_LIMIT_WAIT

                waited = RATE_LIMIT_WAIT.labels(provider=account)
                ledger, config = self.ledger, self.config
                self._limiters[account] = AccountLimiter(
                    self.bucket(account),
                    self.limit_store,
                    concurrency=self.config.account(account).concurrency,
                    used_today=lambda wall: ledger.sent_since(account, _local_midnight(wall, config)),
                    on_wait=waited.inc,
                )
            return self._limiters[account]

    def limiters(self) -> list[AccountLimiter]:
        """The limiters this process has built so far."""
        with self._lock:
            return list(self._limiters.values())

    def campaign(self, run: RunRecord) -> PreparedCampaign:
        """The run's campaign, loaded once per process from the file it was launched from."""
        with self._lock:
            prepared = self._campaigns.get(run.id)
            loading = self._loading.setdefault(run.id, threading.Lock()) if prepared is None else None
        if loading is not None:
            # One thread loads it; the others of this process wait for that instead of each loading
            # (and checking) the same files at the same time when a run's first segments arrive.
            with loading:
                with self._lock:
                    prepared = self._campaigns.get(run.id)
                if prepared is None:
                    prepared = load_campaign(Path(run.campaign_file), self.config)
                    with self._lock:
                        self._campaigns[run.id] = prepared
                        self._loading.pop(run.id, None)
        assert prepared is not None  # noqa: S101 - loaded above or found
        return prepared

    def sending_allowed(self, run_id: str) -> bool:
        """Whether the run may still send (running or splitting), read at most every RUN_STATE_TTL_S.

        Checked before each message leaves, so `pause` and `cancel` take effect within a second even
        in a batch that the rate limit stretches over minutes.
        """
        known = self.known_sending_allowed(run_id)
        if known is not None:
            return known
        now = time.monotonic()
        run = self.ledger.get_run(run_id)
        allowed = run is not None and run.state in (RunState.RUNNING, RunState.SPLITTING)
        with self._lock:
            self._run_states[run_id] = (now, allowed)
        return allowed

    def saw_run(self, run: RunRecord, read_at: float) -> None:
        """A reading of ``run`` made at ``read_at`` (monotonic, taken before the query) elsewhere: kept
        as :meth:`sending_allowed`'s, so a segment's first messages do not read the run once more."""
        allowed = run.state in (RunState.RUNNING, RunState.SPLITTING)
        with self._lock:
            cached = self._run_states.get(run.id)
            if cached is None or cached[0] < read_at:
                self._run_states[run.id] = (read_at, allowed)

    def known_sending_allowed(self, run_id: str) -> bool | None:
        """:meth:`sending_allowed` from the cache only (no database read): None when it is stale."""
        cached = self._run_states.get(run_id)  # a dict read is atomic; no lock on the hot path
        if cached is not None and time.monotonic() - cached[0] < RUN_STATE_TTL_S:
            return cached[1]
        return None

    def _read_done(self, run_id: str, task: asyncio.Task[bool]) -> None:
        self._reading.pop(run_id, None)
        # Retrieved here, so that a read that failed while nobody awaited it (the database away, a
        # cached state served meanwhile) is not logged as "Task exception was never retrieved".
        if not task.cancelled():
            task.exception()

    async def still_sending(self, run_id: str) -> bool:
        """:meth:`sending_allowed` for the event loop, without a database read in the way of a send.

        A reading younger than :data:`RUN_STATE_TTL_S` is used as is; one younger than
        :data:`RUN_STATE_MAX_AGE_S` is used while a fresh one is read in the background (a message
        that has just been given its rate-limit slot must leave now, not after a query: late sends
        bunch up and break the rate); an older one is read before answering.
        """
        cached = self._run_states.get(run_id)
        age = time.monotonic() - cached[0] if cached is not None else RUN_STATE_MAX_AGE_S
        if cached is not None and age < RUN_STATE_TTL_S:
            return cached[1]
        reading = self._reading.get(run_id)
        if reading is None:  # one read at a time per run, however many messages ask
            reading = asyncio.get_running_loop().create_task(asyncio.to_thread(self.sending_allowed, run_id))
            self._reading[run_id] = reading
            reading.add_done_callback(partial(self._read_done, run_id))
        if cached is not None and age < RUN_STATE_MAX_AGE_S:
            return cached[1]
        return await asyncio.shield(reading)

    def evaluator(self, run: RunRecord, prepared: PreparedCampaign) -> Evaluator:
        """One evaluator per run and process (it holds the compiled templates' render state)."""
        with self._lock:
            found = self._evaluators.get(run.id)
            if found is None:
                found = self._evaluators[run.id] = Evaluator(prepared, dedup=False)
            return found

    def pseudonym(self, recipient_id: str) -> str:
        """A keyed hash of a recipient id, for logs: stable, not reversible without the secret key."""
        return hmac.new(self._key, recipient_id.encode(), hashlib.sha256).hexdigest()[:16]

    def close(self) -> None:
        with self._lock:
            providers = list(self._providers.values())
            loop = self._loop
            self._providers.clear()
        if loop is not None:
            for p in providers:
                with contextlib.suppress(Exception):  # closing must not hide the run's real outcome
                    loop.run(p.close())
            with contextlib.suppress(Exception):
                loop.run(self.limit_store.close())
            loop.stop()
        self.ledger.close()
