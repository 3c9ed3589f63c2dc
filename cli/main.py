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


#: ``--threads`` of the commands that send in their own process when no broker is configured.
embedded_threads = click.option(
    "--threads",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Embedded mode: worker threads sending in this process.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="smartpush", prog_name="smartpush")
@common
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Send one message to many citizens by SMS, email and push, safely.

    Write a campaign (YAML and Jinja templates), check it with `validate`, look at real messages with
    `preview`, see counts, costs and duration with `plan`, then launch it with `send` and follow it
    with `runs`, `status` and `report`. Start with `smartpush init DIR`.

    Without `broker:` in smartpush.yaml everything runs in the `send` process (embedded); with
    `broker: redis://…` run `smartpush worker` processes, on as many machines as you need.

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


@cli.command()
@click.argument("campaign", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--key",
    metavar="KEY",
    help="Idempotency key: a second launch with the same key returns the first run instead. "
    "`auto`: the campaign's name and scheduled slot (schedule.cron, schedule.at, else the day), "
    "for cron jobs and timers; a slot older than schedule.catch_up or past not_after is refused (exit 1).",
)
@click.option(
    "--detach",
    is_flag=True,
    help="With a broker: return once the run is queued instead of following it to the end.",
)
@click.option("--strict", is_flag=True, help="Refuse to send anything if any row is invalid (exit 1).")
@embedded_threads
@common
@click.pass_obj
def send(
    state: State, campaign: Path, yes: bool, key: str | None, detach: bool, strict: bool, threads: int
) -> None:
    """Launch a run of CAMPAIGN.

    Embedded (no broker configured) it sends in this process and shows progress until every message is
    final. With a broker it queues the run's segments for `smartpush worker` processes and follows the
    run (or returns at once with --detach). Exit 0 when nothing failed, 3 when some messages failed.
    """
    from . import runs

    runs.send(state, campaign, yes=yes, key=key, detach=detach, strict=strict, threads=threads)


@cli.command()
@click.option(
    "--processes",
    "-p",
    type=click.IntRange(1, 64),
    default=None,
    help="Worker processes. Default: one per core.",
)
@click.option(
    "--threads",
    "-t",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Segments processed at once per process (each sends many messages concurrently).",
)
@click.option(
    "--queues",
    "-Q",
    multiple=True,
    type=click.Choice(["urgent", "normal", "bulk"]),
    help="Serve only these priorities (repeat). Default: all.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    metavar="PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics: smartpush's and Dramatiq's, summed over "
    "this worker's processes (HOST: dramatiq_prom_host, default 0.0.0.0).",
)
@common
@click.pass_obj
def worker(
    state: State, processes: int | None, threads: int, queues: tuple[str, ...], metrics_port: int | None
) -> None:
    """Run workers for the configured broker (distributed mode).

    Start as many as you like, on as many machines: they share the broker, the rate limits and the
    ledger. Stop with Ctrl-C or SIGTERM: segments in progress finish first.
    """
    # First of all, before `runs` is imported: prometheus_client decides when it is imported whether a
    # process (and every worker process forked from it) writes its metrics to the multiprocess folder.
    from smartpush.workerboot import metrics_environment

    from .commands import reporting

    with reporting(state):
        metrics_environment(metrics_port)
    from . import runs

    runs.worker(state, processes, threads, queues)


@cli.command()
@click.argument("campaigns", nargs=-1, type=click.Path(path_type=Path))
@click.option("--once", is_flag=True, help="Do one pass and exit (embedded: after the runs it launched end).")
@click.option(
    "--tick",
    default="30s",
    show_default=True,
    metavar="DURATION",
    help="How often the campaign files are read again and due slots launched.",
)
@embedded_threads
@click.option("--lock-ttl", default="30s", show_default=True, hidden=True)
@common
@click.pass_obj
def scheduler(
    state: State, campaigns: tuple[Path, ...], once: bool, tick: str, threads: int, lock_ttl: str
) -> None:
    """Launch the scheduled campaigns in CAMPAIGNS (files or folders; default: ./campaigns/).

    Every campaign with `schedule.cron` or `schedule.at` is launched once per slot, with the run key
    `send --key auto` uses, so a cron job on the same slot finds the same run. A slot missed while no
    scheduler ran is launched if it is at most `schedule.catch_up` late (default 1h) and before
    `not_after`, otherwise recorded as skipped; `smartpush runs --campaign NAME` shows every slot.

    Start one on several hosts if you like: one is active (a Redis lock with a broker, a file lock
    embedded), the others stand by and take over within 30 s if it dies. Embedded, the active
    scheduler also sends. Stop with Ctrl-C or SIGTERM.
    """
    from smartpush.units import parse_duration

    from . import schedule

    try:
        every, ttl = parse_duration(tick), parse_duration(lock_ttl)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    schedule.scheduler(state, campaigns, once=once, tick=every, threads=threads, lock_ttl=ttl)


@cli.command("runs")
@click.option(
    "--campaign",
    metavar="NAME",
    help="Only this campaign's runs, after its scheduled slots: launched (run, counts) or skipped (why).",
)
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True, help="How many runs.")
@common
@click.pass_obj
def runs_(state: State, campaign: str | None, limit: int) -> None:
    """List runs, newest first, with their state and counts.

    With --campaign NAME, first the history of the campaign's scheduled slots (`send --key auto`, the
    scheduler): each slot's key, launched or skipped, by which, and the run's counts or the reason.
    """
    from . import runs

    runs.list_runs(state, campaign, limit)


@cli.command()
@click.argument("run")
@click.option("--watch", is_flag=True, help="Refresh until the run is over.")
@common
@click.pass_obj
def status(state: State, run: str, watch: bool) -> None:
    """Show RUN's progress: counts per status and channel, rate and ETA.

    RUN is a run id, the first characters of one, or the --key it was launched with.
    """
    from . import runs

    runs.status(state, run, watch)


def _control(name: str, doc: str) -> None:
    @cli.command(name, help=doc)
    @click.argument("run")
    @common
    @click.pass_obj
    def command(state: State, run: str) -> None:
        from . import runs

        runs.control(state, name, run)


_control("pause", "Pause RUN: workers stop sending its messages within seconds; nothing is lost.")
_control("resume", "Resume a paused RUN (or one whose workers all stopped) where it stopped.")
_control("cancel", "Cancel RUN: messages not yet sent become `cancelled`; sent ones stay sent.")


@cli.command()
@click.argument("run")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "html"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    metavar="STATUS",
    help="Only messages in this status (repeat for several).",
)
@click.option(
    "--include-addresses",
    is_flag=True,
    help="Add the phone, email or token of each message (personal data: handle with care).",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write to this file instead of standard output.",
)
@common
@click.pass_obj
def report(
    state: State, run: str, fmt: str, statuses: tuple[str, ...], include_addresses: bool, output: Path | None
) -> None:
    """Final counts and one record per message of RUN.

    Columns: message_id, recipient_id, channel, provider, status, attempts, created_at, sent_at,
    delivered_at, provider_reference, error.
    """
    from . import runs

    runs.report(state, run, fmt, statuses, include_addresses, output)


@cli.command()
@click.argument("run")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    required=True,
    metavar="STATUS",
    help="Resend to the recipients with a message in this status (repeat for several).",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--detach", is_flag=True, help="With a broker: return once the run is queued.")
@common
@click.pass_obj
def resend(state: State, run: str, statuses: tuple[str, ...], yes: bool, detach: bool) -> None:
    """Start a new run of RUN's campaign for just the recipients whose messages are in STATUS."""
    from . import runs

    runs.resend(state, run, statuses, yes=yes, detach=detach)


@cli.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. The default answers this machine only; 0.0.0.0 answers every network.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port to listen on (0: any free port, printed at start).",
)
@common
@click.pass_obj
def serve(state: State, host: str, port: int) -> None:
    """Serve HTTP: delivery receipts, STOP replies, one-click unsubscribe, /metrics and /healthz.

    Routes: /webhooks/ACCOUNT (receipts), /inbound/ACCOUNT (SMS replies), /unsubscribe/TOKEN (the
    links in emails and templates), /healthz (200 when the ledger and the broker answer, else 503) and
    /metrics (Prometheus; every smartpush process of the host with PROMETHEUS_MULTIPROC_DIR).

    It listens on 127.0.0.1 only by default. To let providers and mail clients reach it, keep it
    there and put a reverse proxy in front that terminates TLS (nginx, Caddy, HAProxy), e.g. nginx
    `location / { proxy_pass http://127.0.0.1:8080; }` in an https server block, and set `public_url:`
    in smartpush.yaml to that https address: unsubscribe links are built on it.

    One process; the access log (standard error) names each request's route, status and duration,
    never its path or query (they carry tokens). Stop with Ctrl-C or SIGTERM: requests in progress
    finish first, then it exits 0.
    """
    from . import serve as serving

    serving.serve(state, host, port)


#: The suppression list's channels and reasons (smartpush.suppression, not imported here: it is heavy).
_SUPPRESS_CHANNELS = ("sms", "email", "push")
_SUPPRESS_REASONS = ("opt-out", "hard-bounce", "complaint", "unregistered", "manual")


def _list_channel(f: F) -> F:
    return click.option(
        "--channel",
        type=click.Choice(_SUPPRESS_CHANNELS),
        required=True,
        help="The channel whose list it is.",
    )(f)


def _only_channel(f: F) -> F:
    return click.option(
        "--channel", type=click.Choice(_SUPPRESS_CHANNELS), help="Only this channel's entries."
    )(f)


@cli.group()
@common
def suppress() -> None:
    """The suppression list: addresses a channel must not message, each with a reason.

    It holds keyed hashes of addresses, never the addresses. Reasons: opt-out, hard-bounce, complaint,
    unregistered, manual. `marketing` and `information` campaigns skip every entry; `service`
    campaigns (legally required notices) still reach addresses on the list for opt-out or complaint,
    and each such send is on record, but never hard-bounce, unregistered or manual ones. It is
    applied when a run is launched and again just before each message is sent.
    """


@suppress.command("add")
@click.argument("addresses", nargs=-1, required=True)
@_list_channel
@click.option(
    "--reason", type=click.Choice(_SUPPRESS_REASONS), default="manual", show_default=True, help="Why."
)
@common
@click.pass_obj
def suppress_add(state: State, addresses: tuple[str, ...], channel: str, reason: str) -> None:
    """Put each ADDRESS (a phone number, an email address or a push token) on the channel's list.

    Phones are read as smartpush.yaml's `region` reads them (06 12 34 56 78 is +33612345678 in FR);
    quote a number written with spaces when you add several. Nothing is added if one is invalid.
    """
    from . import suppress as bodies

    bodies.add(state, channel, reason, addresses)


@suppress.command("remove")
@click.argument("addresses", nargs=-1, required=True)
@_list_channel
@common
@click.pass_obj
def suppress_remove(state: State, addresses: tuple[str, ...], channel: str) -> None:
    """Take each ADDRESS off the channel's list: campaigns may message it again."""
    from . import suppress as bodies

    bodies.remove(state, channel, addresses)


@suppress.command("list")
@_only_channel
@click.option("--reason", type=click.Choice(_SUPPRESS_REASONS), help="Only entries with this reason.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True, help="How many entries.")
@common
@click.pass_obj
def suppress_list(state: State, channel: str | None, reason: str | None, limit: int) -> None:
    """Show the newest entries (channel, hash, reason, source, time) and how many there are."""
    from . import suppress as bodies

    bodies.list_entries(state, channel, reason, limit)


@suppress.command("import")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@_list_channel
@click.option(
    "--column",
    metavar="NAME",
    help="The column holding the addresses. Default: phone, email or push_token (by channel), or "
    "the file's only column.",
)
@click.option(
    "--reason", type=click.Choice(_SUPPRESS_REASONS), default="opt-out", show_default=True, help="Why."
)
@common
@click.pass_obj
def suppress_import(state: State, file: Path, channel: str, column: str | None, reason: str) -> None:
    """Put every address of a CSV FILE on the channel's list, streaming it.

    The encoding and delimiter are detected as for audiences. A bad row is reported with its line
    number and counted; the others are added. Prints how many were added, already there and invalid;
    exits 1 if any row was invalid.
    """
    from . import suppress as bodies

    bodies.import_file(state, file, channel, column, reason)


@suppress.command("export")
@click.option(
    "--out",
    "-o",
    "out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write to this file instead of standard output.",
)
@_only_channel
@common
@click.pass_obj
def suppress_export(state: State, out: Path | None, channel: str | None) -> None:
    """Write the whole list as CSV: channel, address_hash, reason, source, created_at.

    With --json and no --out, a JSON array of the same records.
    """
    from . import suppress as bodies

    bodies.export(state, out, channel)


@cli.command("bounces")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Read the mail and say what would change; change nothing.")
@common
@click.pass_obj
def bounces_(state: State, path: Path, dry_run: bool) -> None:
    """Apply the bounce mail (RFC 3464 DSNs) in PATH, a Maildir folder or an mbox file.

    A hard bounce (5.x.x) fails its message and puts the address on the suppression list; 5.7.x
    (our reputation, SPF/DKIM/DMARC) and a full mailbox fail the message but keep the address;
    delays (4.x.x) are ignored. Reading the same mail again changes nothing. The mail is left
    where it is.
    """
    from . import bounces

    bounces.bounces(state, path, dry_run)


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
