"""``smartpush scheduler``: the long-running launcher of scheduled campaigns (core: smartpush.scheduler)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from smartpush.config import load_config
from smartpush.errors import ConfigError
from smartpush.ledger import RunState
from smartpush.units import format_duration

from . import output
from .commands import reporting
from .main import EXIT_INVALID
from .runs import POLL_S, _sending

logger = logging.getLogger("smartpush.scheduler")

if TYPE_CHECKING:
    from smartpush.engine import Engine
    from smartpush.scheduler import Scheduler, SlotOutcome

    from .main import State


def scheduler(
    state: State,
    paths: tuple[Path, ...],
    *,
    once: bool,
    tick: timedelta,
    threads: int,
    lock_ttl: timedelta,
) -> None:
    from smartpush import logs
    from smartpush.scheduler import Scheduler, campaign_files, lock_for

    with reporting(state):
        logs.configure("INFO")
        config = load_config(state.config)
        folders = list(paths) or [config.project_dir / "campaigns"]
        missing = [str(p) for p in folders if not p.exists()]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)}: no such file or folder; give the campaign files or the folder "
                "holding them (default: campaigns/ next to smartpush.yaml)"
            )
        if not campaign_files(folders):
            raise ConfigError(f"no campaign file (*.yaml) in {', '.join(map(str, folders))}")
        stop = threading.Event()
        _on_sigterm(stop)
        with _sending(config, threads) as (engine, embedded):
            sched = Scheduler(engine.rt, folders, enqueue=engine.enqueue, lock=lock_for(config, lock_ttl))
            try:
                with sched.kept():
                    if once:
                        done = _pass(sched, engine, embedded)
                        if embedded:
                            _wait_for(engine, done)
                        _print(state, sched, done)
                        if sched.broken:  # a cron job running `--once` must notice a campaign it skipped
                            raise SystemExit(EXIT_INVALID)
                        return
                    while not stop.is_set():
                        try:
                            _pass(sched, engine, embedded)
                        except Exception:  # a database or broker hiccup must not stop the scheduler
                            logger.exception(
                                "scheduler pass failed; trying again in %s",
                                format_duration(tick),
                                extra={"outcome": "error"},
                            )
                        stop.wait(tick.total_seconds())
            finally:
                sched.release()
                _close(sched)


def _pass(sched: Scheduler, engine: Engine, embedded: bool) -> list[SlotOutcome]:
    was_active = sched.active
    done = sched.tick()
    if embedded and sched.active and not was_active:
        _recover(engine)
    return done


def _recover(engine: Engine) -> None:
    """Embedded: carry on with the runs a stopped scheduler (or `send`) left unfinished."""
    for run in engine.rt.ledger.list_runs(limit=200):
        if run.state is RunState.RUNNING and run.split_complete:
            engine.recover(run.id)


def _wait_for(engine: Engine, done: list[SlotOutcome]) -> None:
    """Embedded ``--once``: this process is the only sender, so stay until the launched runs are over."""
    left = {o.run_id for o in done if o.run_id is not None}
    over = (RunState.FINISHED, RunState.CANCELLED, RunState.PAUSED)
    while left:
        for run_id in list(left):
            run = engine.rt.ledger.get_run(run_id)
            if run is None or run.state in over:
                left.discard(run_id)
        if left:
            time.sleep(POLL_S)


def _print(state: State, sched: Scheduler, done: list[SlotOutcome]) -> None:
    if state.json:
        output.print_json(
            {
                "active": sched.active,
                "slots": [o.as_dict() for o in done],
                "invalid_files": sorted(str(p) for p in sched.broken),
            }
        )
        return
    if not sched.active:
        output.err.print("Another scheduler is active: nothing launched by this one.")
    elif not done:
        output.err.print("No slot is due.")
    for o in done:
        what = {"launched": "launched run", "found": "already had run", "skipped": "skipped"}[o.outcome]
        tail = f" {o.run_id}" if o.run_id else f": {o.reason}"
        output.out.print(f"{o.key}: {what}{tail}")


def _close(sched: Scheduler) -> None:
    close = getattr(sched.lock, "close", None)
    if callable(close):
        close()


def _on_sigterm(stop: threading.Event) -> None:
    """SIGTERM (systemd, Kubernetes) stops the loop after the current pass, releasing the lock."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
