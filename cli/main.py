"""The ``smartpush`` command: thin click commands that call the core and print.

Only click and the standard library are imported here at start-up, so ``smartpush --help`` stays fast;
each command imports the core when it runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Any)

#: Exit codes (SPEC.md "Commands").
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INFRASTRUCTURE = 4
EXIT_INTERRUPTED = 130


class State:
    """Options given before or after the command name; the later one wins."""

    def __init__(self) -> None:
        self.config: Path | None = None
        self.json = False


def common(f: F) -> F:
    """Add ``--config`` and ``--json`` to a command, so they can follow the command name too."""

    def set_config(ctx: click.Context, _: click.Parameter, value: Path | None) -> None:
        if value is not None:
            ctx.ensure_object(State).config = value

    def set_json(ctx: click.Context, _: click.Parameter, value: bool) -> None:
        if value:
            ctx.ensure_object(State).json = True

    f = click.option(
        "--json",
        "json_",
        is_flag=True,
        expose_value=False,
        callback=set_json,
        help="Print machine-readable JSON on standard output, and nothing else there.",
    )(f)
    f = click.option(
        "--config",
        type=click.Path(path_type=Path, dir_okay=False),
        expose_value=False,
        callback=set_config,
        help="The smartpush.yaml to use. Default: ./smartpush.yaml, else the embedded defaults.",
    )(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="smartpush", prog_name="smartpush")
@common
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Send one message to many citizens by SMS, email and push, safely.

    Write a campaign (YAML and Jinja templates), check it with `validate`, look at real messages with
    `preview`, see counts, costs and duration with `plan`. Start with `smartpush init DIR`.

    Exit codes: 0 ok, 1 invalid campaign or input, 2 usage error, 3 some messages failed,
    4 broker, database or provider unreachable, 130 interrupted.
    """
    ctx.ensure_object(State)


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False), default=".")
@click.option("--force", is_flag=True, help="Overwrite files that already exist.")
@common
@click.pass_obj
def init(state: State, directory: Path, force: bool) -> None:
    """Write a working example project into DIRECTORY (default: the current folder).

    It holds smartpush.yaml (the `outbox` provider, which writes messages to files), a French campaign
    with push, SMS and email channels, templates with an accessible email layout, and a synthetic
    audience of a few hundred people.
    """
    from . import commands

    commands.init(state, directory, force)


def processes_option(f: F) -> F:
    return click.option(
        "--processes",
        type=click.IntRange(1, 64),
        default=None,
        help="Processes reading a large audience at once. Default: one per core, at most 4.",
    )(f)


@cli.command()
@click.argument("campaigns", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@processes_option
@common
@click.pass_obj
def validate(state: State, campaigns: tuple[Path, ...], processes: int | None) -> None:
    """Check each CAMPAIGN file completely without sending anything.

    Checks the file's fields, the provider accounts, that templates compile and only use columns the
    audience has, then reads every row of the audience. Lists every problem at once, with file, line
    and field; exits 1 if there is any.
    """
    from . import commands

    commands.validate(state, campaigns, processes)


@cli.command()
@click.argument("campaign", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--recipient",
    "recipient",
    metavar="ID",
    multiple=True,
    help="Show the messages of this recipient id (repeat for several).",
)
@click.option(
    "--sample",
    type=click.IntRange(1, 100),
    default=3,
    show_default=True,
    help="Show the messages of the first N recipients.",
)
@click.option(
    "--show-addresses", is_flag=True, help="Show phone numbers, emails and tokens in full instead of masked."
)
@common
@click.pass_obj
def preview(
    state: State, campaign: Path, recipient: tuple[str, ...], sample: int, show_addresses: bool
) -> None:
    """Render the messages of CAMPAIGN for real rows of its audience.

    For SMS it shows the encoding (GSM-7 or UCS-2), the characters and parts, and which characters
    forced UCS-2. Addresses are masked unless --show-addresses.
    """
    from . import commands

    commands.preview(state, campaign, list(recipient), sample, show_addresses)


@cli.command()
@click.argument("campaigns", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--limit",
    type=click.IntRange(0),
    default=50,
    show_default=True,
    help="Invalid rows listed in the table output (all of them with --json or --limit 0).",
)
@processes_option
@common
@click.pass_obj
def plan(state: State, campaigns: tuple[Path, ...], limit: int, processes: int | None) -> None:
    """Dry-run each CAMPAIGN file over its whole audience, without sending.

    Shows recipients per channel and provider, invalid rows with their line numbers, duplicates, SMS
    parts and cost, segments, and the duration the rate limits impose. Exits 1 if any row is invalid.
    """
    from . import commands

    commands.plan(state, campaigns, limit, processes)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the command and turns errors into exit codes."""
    try:
        rc = cli.main(args=argv, prog_name="smartpush", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("Interrupted.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
