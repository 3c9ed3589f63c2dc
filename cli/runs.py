"""Bodies of the run commands: send, worker, runs, status, pause/resume/cancel, report, resend."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from smartpush.audience import Row
from smartpush.config import Config, load_config
from smartpush.errors import ConfigError, InfrastructureError, RunNotFound, SmartpushError
from smartpush.ledger import FAILED, FINAL, Ledger, OccurrenceRecord, RunRecord, RunState, Status
from smartpush.loading import PreparedCampaign, load_campaign
from smartpush.provider import Channel

from . import output, runview
from .commands import reporting
from .main import EXIT_INVALID, EXIT_PARTIAL

if TYPE_CHECKING:
    from smartpush.engine import Engine
    from smartpush.launch import Launch
    from smartpush.occurrences import Occurrence

    from .main import State

#: How often a followed run's progress is read from the ledger.
POLL_S = 0.5


def _ledger(config: Config) -> Ledger:
    from smartpush.runtime import open_ledger

    return open_ledger(config)


def _engine(config: Config) -> Engine:
    from smartpush.engine import Engine

    try:
        return Engine(config)
    except SmartpushError:
        raise
    except Exception as exc:  # redis.ConnectionError, database errors
        raise InfrastructureError(
            f"the broker or the ledger cannot be reached ({type(exc).__name__}); check `broker:` and "
            f"`database:` in {config.source}"
        ) from None


def _configure_logs(state: State, *, progress: bool = True) -> None:
    """Log lines on standard error (smartpush.logs): JSON lines for machines, text on a terminal.

    On a terminal that shows the live progress view, only warnings by default: the view is the
    report there (``SMARTPUSH_LOG_LEVEL=info`` prints the run and segment events above it).
    """
    from smartpush import logs

    logs.configure("WARNING" if progress and sys.stderr.isatty() and not state.json else "INFO")


def _exit_code(counts: dict[tuple[str, Status], int]) -> int:
    return EXIT_PARTIAL if any(n for (_, s), n in counts.items() if s in FAILED) else 0


def send(
    state: State, campaign: Path, *, yes: bool, key: str | None, detach: bool, strict: bool, threads: int
) -> None:
    from smartpush.launch import launch
    from smartpush.occurrences import AUTO, occurrence

    with reporting(state):
        _configure_logs(state)
        config = load_config(state.config)
        prepared = load_campaign(campaign, config)
        if not state.json:
            output.warnings(prepared.warnings)
        if strict:
            from smartpush.planning import make_plan

            plan = make_plan(prepared)
            if plan.has_invalid:
                if state.json:
                    output.print_json(output.plan_dict(plan))
                else:
                    output.validated(plan)
                    output.err.print("--strict: nothing was sent.")
                raise SystemExit(EXIT_INVALID)
        if not yes:
            if not sys.stdin.isatty():
                raise click.UsageError("confirmation needed: add --yes to send without a terminal")
            runview.confirm(prepared, config)
        occ = None
        if key == AUTO:
            occ = occurrence(prepared.campaign, datetime.now(UTC), config.settings.timezone)
            key = occ.key
            if occ.refused is not None:
                _refused(state, config, occ)
        with _sending(config, threads) as (engine, embedded):
            result = launch(engine.rt, prepared, enqueue=engine.enqueue, key=key)
            run = result.run
            if occ is not None:
                engine.rt.ledger.record_occurrence(
                    OccurrenceRecord(
                        key=occ.key,
                        campaign=run.campaign,
                        slot=occ.slot,
                        outcome="launched",
                        source="send",
                        recorded_at=datetime.now(UTC),
                        run_id=run.id,
                    )
                )
            if not result.created and not state.json:
                output.err.print(f"A run with key {key!r} exists already: {run.id} ({run.state}).")
            if embedded and not result.created and run.state is RunState.RUNNING:
                engine.recover(run.id)  # an earlier embedded send was interrupted: carry on from the ledger
            _after_launch(state, engine, result, embedded=embedded, detach=detach)


def _refused(state: State, config: Config, occ: Occurrence) -> None:
    """``send --key auto`` outside its slot: the slot's run if one exists (its exit code), else exit 1.

    A slot missed by more than ``catch_up`` or past ``not_after`` is recorded as skipped.
    """
    ledger = _ledger(config)
    try:
        try:
            existing = ledger.find_run(occ.key)
        except RunNotFound:
            existing = None
        if existing is not None:  # the slot was launched in time: report that run, as a second trigger
            if not state.json:
                output.err.print(
                    f"A run with key {occ.key!r} exists already: {existing.id} ({existing.state})."
                )
            _print_run(state, ledger, existing.id, extra={"launched": False})
            raise SystemExit(_exit_code(ledger.counts(existing.id)))
        if occ.slot is None or occ.slot <= datetime.now(UTC):  # not "has not come yet": a real skip
            ledger.record_occurrence(
                OccurrenceRecord(
                    key=occ.key,
                    campaign=occ.key.partition("@")[0],
                    slot=occ.slot,
                    outcome="skipped",
                    source="send",
                    recorded_at=datetime.now(UTC),
                    reason=occ.refused,
                )
            )
    finally:
        ledger.close()
    if state.json:
        output.print_json({"launched": False, "key": occ.key, "refused": occ.refused})
    else:
        output.err.print(f"Not launched ({occ.key}): {occ.refused}.")
    raise SystemExit(EXIT_INVALID)


@contextmanager
def _sending(config: Config, threads: int = 4) -> Iterator[tuple[Engine, bool]]:
    """The engine for a launching command, with worker threads in this process when embedded."""
    engine = _engine(config)
    embedded = config.settings.broker is None
    worker = engine.worker(threads) if embedded else None
    try:
        yield engine, embedded
    finally:
        if worker is not None:
            worker.stop()
        engine.close()


def _after_launch(state: State, engine: Engine, result: Launch, *, embedded: bool, detach: bool) -> None:
    """Print the launch, then follow the run to its end (unless detached); exits with the run's code."""
    if not state.json:
        runview.launched(result)
        _window_note(engine, result.run)
    launched = {"launched": result.created}  # False: the key found an existing run (--json)
    if detach and not embedded:
        _print_run(state, engine.rt.ledger, result.run.id, extra=launched)
        return
    counts = _follow(state, engine.rt.ledger, result.run.id, embedded=embedded, extra=launched)
    raise SystemExit(_exit_code(counts))


def _window_note(engine: Engine, run: RunRecord) -> None:
    """Say so when the campaign's send window is closed: the run will wait, not hang for no reason."""
    from smartpush.windows import effective_window, next_opening

    window = effective_window(engine.rt.campaign(run).campaign)
    now = datetime.now(UTC)
    opens = next_opening(window, now) if window is not None else now
    if opens is None or opens > now:
        when = opens.astimezone().strftime("%A %d %B %H:%M") if opens else "never (check schedule.window)"
        output.err.print(
            f"Outside the campaign's send window: messages wait until {when}. Ctrl-C stops this command; "
            f"`smartpush resume {run.id}` continues the run later."
        )


def _follow(
    state: State, ledger: Ledger, run_id: str, *, embedded: bool = False, extra: dict[str, Any] | None = None
) -> dict[tuple[str, Status], int]:
    """Show progress until the run is finished or cancelled (or paused, embedded); returns the counts."""
    with runview.Progress(enabled=not state.json) as progress:
        while True:
            run = ledger.get_run(run_id)
            counts = ledger.counts(run_id)
            assert run is not None  # noqa: S101 - it was just created
            progress.update(run, counts)
            if run.state in (RunState.FINISHED, RunState.CANCELLED):
                break
            if run.state is RunState.PAUSED:
                if embedded:
                    break  # this process is the only sender: let it go; `resume` picks the run up again
                progress.note("paused: `smartpush resume` continues it")
            time.sleep(POLL_S)
    _print_run(state, ledger, run_id, extra=extra)
    return counts


def _print_run(
    state: State,
    ledger: Ledger,
    run_id: str,
    config: Config | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    run = ledger.get_run(run_id)
    assert run is not None  # noqa: S101
    counts = ledger.counts(run_id)
    view = runview.run_status(run, ledger, config) if config is not None else None
    if state.json:
        output.print_json({**runview.run_dict(run, counts, view), **(extra or {})})
    else:
        runview.summary(run, counts, view)


#: Segments a worker thread holds in reserve. Dramatiq's default (2 per thread) leaves more segments
#: stranded in a killed worker for the heartbeat timeout; a segment is minutes of work, so 1 is plenty.
PREFETCH_PER_THREAD = 1


def worker(state: State, processes: int | None, threads: int, queues: tuple[str, ...]) -> None:
    # Read by dramatiq.worker at import time: set before anything imports Dramatiq.
    os.environ.setdefault("dramatiq_queue_prefetch", str(threads * PREFETCH_PER_THREAD))
    import dramatiq.cli

    from smartpush import logs
    from smartpush.queueing import queue_name

    with reporting(state):
        _configure_logs(state, progress=False)
        # Dramatiq's worker processes write to a pipe: they log as this process does (format, level).
        os.environ.setdefault(logs.ENV_FORMAT, "text" if sys.stderr.isatty() else "json")
        os.environ.setdefault(logs.ENV_LEVEL, "info")
        config = load_config(state.config)
        if config.settings.broker is None:
            raise ConfigError(
                f"{config.source} has no `broker:`: workers serve a shared broker such as "
                "redis://localhost:6379/0 "
                "(embedded `smartpush send` needs no worker)"
            )
        _engine(config).close()  # fail here, clearly, if the broker or the ledger is out of reach
    if config.source and not config.source.startswith("("):
        os.environ["SMARTPUSH_CONFIG"] = str(Path(config.source).resolve())
    args = [
        "smartpush.workerboot:setup",
        "--threads",
        str(threads),
        "--processes",
        str(processes or os.cpu_count() or 1),
    ]
    args += ["--queues", *(queue_name(q) for q in queues or ("urgent", "normal", "bulk"))]
    parsed = dramatiq.cli.make_argument_parser().parse_args(args)  # type: ignore[no-untyped-call]
    raise SystemExit(dramatiq.cli.main(parsed))  # type: ignore[no-untyped-call]


def list_runs(state: State, campaign: str | None, limit: int) -> None:
    with reporting(state):
        ledger = _ledger(load_config(state.config))
        found = [(run, ledger.counts(run.id)) for run in ledger.list_runs(campaign=campaign, limit=limit)]
        history = []
        if campaign is not None:
            for occ in ledger.occurrences(campaign, limit=limit):
                run = ledger.get_run(occ.run_id) if occ.run_id else None
                history.append((occ, run, ledger.counts(run.id) if run is not None else {}))
    if state.json:
        runs_json = [runview.run_dict(run, counts) for run, counts in found]
        if campaign is None:
            output.print_json(runs_json)
        else:
            output.print_json(
                {
                    "campaign": campaign,
                    "occurrences": [runview.occurrence_dict(*h) for h in history],
                    "runs": runs_json,
                }
            )
        return
    if history:
        runview.occurrence_table(campaign or "", history)
    runview.run_table(found)


def _find(ledger: Ledger, ref: str) -> RunRecord:
    return ledger.find_run(ref)


def status(state: State, ref: str, watch: bool) -> None:
    with reporting(state):
        config = load_config(state.config)
        ledger = _ledger(config)
        run = _find(ledger, ref)
        if config.settings.broker is not None and run.state is RunState.RUNNING:
            engine = _engine(config)  # a look from `status` also requeues what dead workers left
            try:
                engine.sweep()
            finally:
                engine.close()
        if watch and run.state not in (RunState.FINISHED, RunState.CANCELLED):
            _follow(state, ledger, run.id)
            return
        _print_run(state, ledger, run.id, config)


def control(state: State, action: str, ref: str) -> None:
    with reporting(state):
        config = load_config(state.config)
        now = datetime.now(UTC)
        if action == "resume":
            _configure_logs(state)
            embedded = config.settings.broker is None
            engine = _engine(config)
            worker = engine.worker() if embedded else None
            try:
                run = engine.rt.ledger.find_run(ref)
                changed = engine.rt.ledger.set_run_state(
                    run.id, RunState.RUNNING, only_from=frozenset({RunState.PAUSED})
                )
                queued = 0
                if run.state in (RunState.PAUSED, RunState.RUNNING):
                    queued = engine.recover(run.id) if embedded else engine.resume(run.id)
                if embedded and queued:  # this process is the sender: follow the run to its end
                    counts = _follow(state, engine.rt.ledger, run.id, embedded=True)
                    raise SystemExit(_exit_code(counts))
            finally:
                if worker is not None:
                    worker.stop()
                engine.close()
            message = (
                f"run {run.id} resumed: {queued} segment(s) queued"
                if changed or queued
                else f"run {run.id} is {run.state}: nothing to resume"
            )
        else:
            ledger = _ledger(config)
            run = ledger.find_run(ref)
            if action == "pause":
                changed = ledger.set_run_state(
                    run.id, RunState.PAUSED, only_from=frozenset({RunState.RUNNING, RunState.SPLITTING})
                )
                message = f"run {run.id} paused" if changed else f"run {run.id} is {run.state}: cannot pause"
            else:
                changed = ledger.set_run_state(
                    run.id,
                    RunState.CANCELLED,
                    only_from=frozenset({RunState.RUNNING, RunState.SPLITTING, RunState.PAUSED}),
                )
                cancelled = ledger.cancel_unsent(run.id, now) if changed else 0
                message = (
                    f"run {run.id} cancelled: {cancelled} message(s) will not be sent"
                    if changed
                    else f"run {run.id} is {run.state}: cannot cancel"
                )
        if state.json:
            output.print_json({"ok": bool(changed), "run_id": run.id, "action": action, "message": message})
        else:
            output.out.print(message)
        if not changed and action != "resume":
            raise SystemExit(EXIT_INVALID)


def report(
    state: State,
    ref: str,
    fmt: str,
    statuses: tuple[str, ...],
    include_addresses: bool,
    output_path: Path | None,
) -> None:
    with reporting(state):
        wanted = _statuses(statuses)
        ledger = _ledger(load_config(state.config))
        run = _find(ledger, ref)
        if state.json:
            fmt = "json"
        stream = output_path.open("w", encoding="utf-8", newline="") if output_path else sys.stdout
        try:
            runview.report(
                stream,
                fmt,
                run,
                ledger.counts(run.id),
                ledger.messages(run.id, statuses=wanted),
                include_addresses=include_addresses,
            )
        finally:
            if output_path:
                stream.close()


def _statuses(values: tuple[str, ...]) -> list[Status] | None:
    if not values:
        return None
    known = [s.value for s in Status]
    out = []
    for v in values:
        if v not in known:
            from smartpush.schema import did_you_mean

            raise click.BadParameter(
                f"'{v}' is not a status{did_you_mean(v, known)}; statuses: {', '.join(known)}",
                param_hint="--status",
            )
        out.append(Status(v))
    return out


def resend(state: State, ref: str, statuses: tuple[str, ...], *, yes: bool, detach: bool) -> None:
    from smartpush.launch import launch

    with reporting(state):
        _configure_logs(state)
        wanted = _statuses(statuses) or []
        if any(s not in FINAL for s in wanted):
            raise click.BadParameter("only final statuses can be resent", param_hint="--status")
        config = load_config(state.config)
        with _sending(config) as (engine, embedded):
            ledger = engine.rt.ledger
            old = ledger.find_run(ref)
            prepared = load_campaign(Path(old.campaign_file), config)
            chosen = _recipients_to_resend(prepared, ledger, old.id, set(wanted))
            if not chosen:
                raise ConfigError(
                    f"run {old.id} has no message in status {', '.join(statuses)}: nothing to resend"
                )
            if not yes:
                if not sys.stdin.isatty():
                    raise click.UsageError("confirmation needed: add --yes to send without a terminal")
                click.confirm(f"Send {prepared.name} again to {len(chosen):,} recipient(s)?", abort=True)
            result = launch(engine.rt, prepared, enqueue=engine.enqueue, rows=chosen, parent_run_id=old.id)
            _after_launch(state, engine, result, embedded=embedded, detach=detach)


def _recipients_to_resend(
    prepared: PreparedCampaign, ledger: Ledger, run_id: str, wanted: set[Status]
) -> list[Row]:
    """Rows rebuilt from the ledger (stored context + each channel's address) for the chosen recipients."""
    columns = prepared.campaign.audience.columns
    id_column = prepared.campaign.audience.id
    rows: list[Row] = []
    current: str | None = None
    row: dict[str, object] = {}
    line = 0
    keep = False
    for m in ledger.messages(run_id, with_context=True):  # grouped: ordered by line, then channel
        if m.recipient_id != current:
            if keep:
                rows.append(Row(line, row))
            current, line, keep = m.recipient_id, m.line or 0, False
            row = {**(m.context or {}), id_column: m.recipient_id}
        if m.address is not None:
            row[columns.for_channel(Channel(m.channel))] = m.address
        keep = keep or (m.status in wanted and not m.recipient_id.startswith("#line:"))
    if keep:
        rows.append(Row(line, row))
    return rows
