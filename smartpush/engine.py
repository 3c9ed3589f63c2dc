"""The dispatch engine of one process: runtime + broker + segment actors + sweeper.

Embedded ``send`` builds an :class:`Engine` and starts worker threads in its own process; each
``smartpush worker`` process builds one through :mod:`smartpush.workerboot`.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

import dramatiq

from .config import Config
from .ledger import RunState
from .queueing import Dispatcher
from .runtime import Runtime
from .sending import log_run_finished, process_segment

__all__ = ["Engine"]

logger = logging.getLogger("smartpush.engine")

#: A due ``created`` message untouched this many times ``stuck_after`` lost its queued segment
#: (e.g. Redis restarted without its data): the sweeper queues the segment again.
LOST_FACTOR = 2


class Engine:
    """Sends segments for the runs in one ledger, through one broker."""

    def __init__(
        self, config: Config, *, runtime: Runtime | None = None, broker: dramatiq.Broker | None = None
    ) -> None:
        self.config = config
        self.rt = runtime or Runtime(config)
        self.rt.ledger.migrate()
        self.dispatcher = Dispatcher(config, self.handle, broker)
        self._priorities: dict[str, str] = {}
        self._stop = threading.Event()

    @property
    def broker(self) -> dramatiq.Broker:
        return self.dispatcher.broker

    def handle(self, run_id: str, segment: int) -> None:
        """The body of the segment actor."""
        priority = self.priority(run_id)
        fields: dict[str, object] = {"run_id": run_id, "segment": segment, "priority": priority}

        def should_yield() -> bool:  # after each batch: give the thread to a waiting higher priority
            if not self.dispatcher.backlog.waiting_before(priority):
                return False
            logger.info(
                "run %s segment %d (%s) yields its thread to waiting segments of a higher priority",
                run_id,
                segment,
                priority,
                extra={**fields, "outcome": "yielded"},
            )
            return True

        logger.info("run %s segment %d started", run_id, segment, extra={**fields, "outcome": "started"})
        began = time.monotonic()
        try:
            done = process_segment(self.rt, self._enqueue_later, run_id, segment, should_yield=should_yield)
        except Exception as exc:  # Dramatiq logs the traceback and retries the segment with backoff
            logger.error(
                "run %s segment %d failed with %s; Dramatiq retries it",
                run_id,
                segment,
                type(exc).__name__,
                extra={**fields, "outcome": "error", "code": type(exc).__name__},
            )
            raise
        again = done.again_in_ms / 1000 if done.again_in_ms is not None else None
        logger.info(
            "run %s segment %d: %d sent, %d failed, %d to retry%s",
            run_id,
            segment,
            done.sent,
            done.failed,
            done.retrying,
            f"; again in {again:.1f} s" if again is not None else "",
            extra={
                **fields,
                "outcome": "finished" if again is None else "continues",
                "sent": done.sent,
                "failed": done.failed,
                "retrying": done.retrying,
                "again_in_s": again,
                "duration_s": round(time.monotonic() - began, 3),
            },
        )

    def priority(self, run_id: str) -> str:
        if run_id not in self._priorities:
            run = self.rt.ledger.get_run(run_id)
            self._priorities[run_id] = run.priority if run is not None else "normal"
        return self._priorities[run_id]

    def enqueue(self, run_id: str, segment: int) -> None:
        self.dispatcher.enqueue(run_id, segment, self.priority(run_id))

    def _enqueue_later(self, run_id: str, segment: int, delay_ms: int | None) -> None:
        self.dispatcher.enqueue(run_id, segment, self.priority(run_id), delay_ms=delay_ms)

    def resume(self, run_id: str) -> int:
        """Queue every segment of the run that still has messages to send; returns how many."""
        segments = self.rt.ledger.pending_segments(run_id)
        for segment in segments:
            self.enqueue(run_id, segment)
        return len(segments)

    def recover(self, run_id: str) -> int:
        """Embedded mode, after an interrupted ``send``: release what it left ``sending`` and requeue.

        Only this process serves an embedded ledger, so nothing else can be sending those messages.
        """
        now = datetime.now(UTC)
        for segment in self.rt.ledger.pending_segments(run_id):
            self.rt.ledger.unstick(run_id, segment, sending_before=now, now=now)
        return self.resume(run_id)

    def sweep(self) -> int:
        """Requeue segments whose worker died or whose queued message was lost; finish finished runs."""
        ledger = self.rt.ledger
        now = datetime.now(UTC)
        grace = self.config.settings.stuck_after
        found = ledger.stuck(sending_before=now - grace, due_before=now - grace * LOST_FACTOR)
        for run_id, segment in found:
            released = ledger.unstick(run_id, segment, sending_before=now - grace, now=now)
            logger.warning(
                "sweeper: run %s segment %d requeued (%d messages were stuck sending, or due ones waited "
                "longer than %s)",
                run_id,
                segment,
                released,
                grace * LOST_FACTOR,
                extra={"run_id": run_id, "segment": segment, "outcome": "requeued", "messages": released},
            )
            self.enqueue(run_id, segment)
        for run in ledger.list_runs(limit=200):
            if run.state is RunState.RUNNING and run.split_complete and ledger.finish_if_done(run.id, now):
                log_run_finished(ledger, run, now)
        return len(found)

    def start_sweeper(self) -> threading.Thread:
        every = self.config.settings.sweep_every.total_seconds()

        def loop() -> None:
            while not self._stop.wait(every):
                try:
                    self.sweep()
                except Exception:  # the sweeper must outlive a database hiccup
                    logger.exception(
                        "sweeper failed; trying again in %d s", int(every), extra={"outcome": "error"}
                    )

        thread = threading.Thread(target=loop, name="smartpush-sweeper", daemon=True)
        thread.start()
        return thread

    def worker(self, threads: int = 8) -> dramatiq.Worker:
        """Start in-process worker threads on every smartpush queue (embedded mode and tests)."""
        worker = dramatiq.Worker(
            self.broker, queues=self.dispatcher.queues, worker_threads=threads, worker_timeout=100
        )
        worker.start()
        return worker

    def close(self) -> None:
        self._stop.set()
        self.rt.close()
