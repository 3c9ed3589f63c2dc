"""The bodies of the commands: load, call the core, hand the result to :mod:`.output`."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.resources import as_file, files
from pathlib import Path
from typing import TYPE_CHECKING

from smartpush.config import Config, load_config
from smartpush.errors import ConfigError, SmartpushError
from smartpush.loading import PreparedCampaign, load_campaign
from smartpush.planning import Plan

from . import output
from .main import EXIT_INVALID

if TYPE_CHECKING:
    from .main import State


@contextmanager
def reporting(state: State) -> Iterator[None]:
    """Turn a :class:`SmartpushError` into its report and exit code."""
    try:
        yield
    except SmartpushError as exc:
        output.error(exc, as_json=state.json)
        raise SystemExit(exc.exit_code) from None


def _config(state: State) -> Config:
    config = load_config(state.config)
    return config


def _prepare(state: State, campaign: Path) -> PreparedCampaign:
    config = _config(state)
    prepared = load_campaign(campaign, config)
    if not state.json:
        output.warnings(prepared.warnings)
    return prepared


def init(state: State, directory: Path, force: bool) -> None:
    with reporting(state):
        written: list[str] = []
        skeleton = files("smartpush.examples")
        layouts = files("smartpush.layouts")
        with as_file(skeleton) as src, as_file(layouts) as lay:
            sources: list[tuple[Path, Path]] = []
            for path in sorted(Path(src).rglob("*")):
                rel = path.relative_to(src)
                if path.is_file() and not _skip(rel):
                    sources.append((path, directory / rel))
            for path in sorted(Path(lay).rglob("*")):
                rel = path.relative_to(lay)
                if path.is_file() and not _skip(rel):
                    sources.append((path, directory / "templates" / rel))
            clashes = [str(dst) for _, dst in sources if dst.exists()]
            if clashes and not force:
                raise ConfigError(
                    f"{len(clashes)} file(s) already exist in {directory}, e.g. {clashes[0]}; "
                    "choose an empty folder or add --force to overwrite them"
                )
            for src_file, dst in sources:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src_file, dst)
                written.append(str(dst))
        output.initialised(directory, written, as_json=state.json)


def _skip(rel: Path) -> bool:
    return rel.name == "__init__.py" or "__pycache__" in rel.parts


def validate(state: State, campaigns: tuple[Path, ...], processes: int | None) -> None:
    _each(state, campaigns, processes, lambda plan, prepared: output.validated(plan), output.validated_dict)


def plan(state: State, campaigns: tuple[Path, ...], limit: int, processes: int | None) -> None:
    _each(
        state,
        campaigns,
        processes,
        lambda plan, prepared: output.plan(plan, prepared, limit=limit),
        output.plan_dict,
    )


def _each(
    state: State,
    campaigns: tuple[Path, ...],
    processes: int | None,
    show: Callable[[Plan, PreparedCampaign], None],
    as_dict: Callable[[Plan], dict[str, object]],
) -> None:
    """Plan each campaign in turn; one campaign's problems do not stop the others. Exit: the worst."""
    from smartpush.planning import make_plan

    results: list[dict[str, object]] = []
    worst = 0
    for i, path in enumerate(campaigns):
        if i and not state.json:
            output.out.print()
        try:
            prepared = _prepare(state, path)
            result = make_plan(prepared, processes=processes)
        except SmartpushError as exc:
            worst = max(worst, exc.exit_code)
            if state.json:
                results.append({"file": str(path), **output.error_dict(exc)})
            else:
                output.error(exc, as_json=False)
            continue
        if result.has_invalid:
            worst = max(worst, EXIT_INVALID)
        if state.json:
            results.append(as_dict(result))
        else:
            show(result, prepared)
    if state.json:
        output.print_json(results[0] if len(results) == 1 else results)
    if worst:
        raise SystemExit(worst)


def preview(state: State, campaign: Path, recipients: list[str], sample: int, show_addresses: bool) -> None:
    from smartpush.recipients import Evaluator, RecipientOutcome

    with reporting(state):
        prepared = _prepare(state, campaign)
        evaluator = Evaluator(prepared, render="all", keep_data=True)
        wanted = set(recipients)
        found: list[RecipientOutcome] = []
        for outcome in evaluator:
            if wanted:
                if outcome.recipient_id in wanted and outcome.kind != "duplicate":
                    found.append(outcome)
                    wanted.discard(outcome.recipient_id)
                    if not wanted:
                        break
            elif outcome.kind == "recipient" and any(c.status == "send" for c in outcome.channels):
                found.append(outcome)
                if len(found) >= sample:
                    break
        if wanted:
            raise ConfigError(
                f"no row of {prepared.campaign.audience.source} has the id(s) you asked for "
                f"(column '{prepared.campaign.audience.id}'); {len(wanted)} not found"
            )
    mask: Callable[[str], str] = (lambda a: a) if show_addresses else output.mask
    output.preview(prepared, found, mask=mask, as_json=state.json)
