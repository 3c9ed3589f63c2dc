"""`smartpush bounces`: DSNs (RFC 3464) from a Maildir or an mbox applied to the ledger.

The DSNs are the samples of ``tests/fixtures/bounces`` (Postfix, Exim, Microsoft 365, Google), with
their original Message-ID and address replaced by those of messages created in a ledger, SQLite and
PostgreSQL (skipped with the reason when no server is reachable), and, at the end, of a campaign sent
through the real `smartpush` command.
"""

from __future__ import annotations

import json
import logging
import mailbox
import subprocess
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from pathlib import Path

import pytest
from servers import ledger_of_kind
from sqlalchemy import select

from smartpush.bounces import (
    MEANINGS,
    BounceReport,
    NotADsn,
    Outcome,
    apply_bounces,
    meaning,
    open_mailbox,
    read_dsn,
)
from smartpush.errors import ConfigError
from smartpush.launch import new_id
from smartpush.ledger import Ledger, MessageRecord, NewMessage, NewRecipient, Result, RunRecord, Status
from smartpush.ledger_schema import messages as messages_t
from smartpush.ledger_schema import suppressions
from smartpush.unsubscribe import recipient_hash

Run = Callable[..., subprocess.CompletedProcess[str]]

FIXTURES = Path(__file__).parent / "fixtures" / "bounces"
#: The original message every fixture reports on; tests put their own message's in its place.
FIXTURE_ID = "0193c1d2e3f4a5b6c7d8e9f0a1b"
FIXTURE_ADDRESS = "jeanne.martin@example.net"
KEY = b"test-secret-key"
ACCOUNT = "smtp-relay"
DOMAIN = "info.exemple.fr"
#: What the fixtures' diagnostic texts say: none of it may reach the ledger or the output.
DIAGNOSTICS = ("User unknown", "No such user", "RESOLVER", "Unauthenticated", "Mailbox full", "try again")


# Fixtures and helpers ------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    with ledger_of_kind(request.param, tmp_path, "bounces_test") as led:
        yield led


def now() -> datetime:
    return datetime.now(UTC)


def address(i: int) -> str:
    return f"personne.{i}@example.net"


def sent_emails(
    ledger: Ledger, n: int, *, addresses: Sequence[str | None] | None = None, reference: str | None = None
) -> list[MessageRecord]:
    """``n`` email messages of a new run, sent through the ``smtp`` account as the driver records them.

    ``reference`` (a format with ``{id}``) replaces the driver's ``<id@domain>`` provider reference.
    """
    run, _ = ledger.create_run(
        RunRecord(id=new_id(), campaign="rappel", campaign_file="/srv/rappel.yaml", config_file=None)
    )
    addrs = list(addresses) if addresses is not None else [address(i) for i in range(n)]
    recipients = [NewRecipient(f"r{i}", 0, i + 2, {"prenom": "Jeanne"}) for i in range(n)]
    messages = [
        NewMessage(new_id(), f"r{i}", 0, "email", 0, ACCOUNT, Status.CREATED, address=addrs[i])
        for i in range(n)
    ]
    ledger.add_batch(run.id, recipients, messages)
    ids = [m.id for m in messages]
    assert ledger.claim(ids, now()) == set(ids)
    ledger.record(
        [
            Result(
                m.id,
                Status.SENT,
                provider=ACCOUNT,
                provider_reference=(reference or "<{id}@" + DOMAIN + ">").format(id=m.id),
            )
            for m in messages
        ],
        now(),
    )
    order = {m.id: i for i, m in enumerate(messages)}
    return sorted(ledger.messages(run.id), key=lambda m: order[m.id])


def fixture(name: str, message_id: str | None = None, to: str | None = None) -> bytes:
    """A fixture's bytes, about message ``message_id`` sent to ``to`` (as written when None)."""
    text = (FIXTURES / name).read_text(encoding="utf-8")
    if message_id is not None:
        text = text.replace(FIXTURE_ID, message_id)
    if to is not None:
        text = text.replace(FIXTURE_ADDRESS, to)
    return text.encode()


def about(name: str, message: MessageRecord) -> bytes:
    assert message.address is not None
    return fixture(name, message.id, message.address)


def maildir(path: Path, mails: Sequence[bytes]) -> Path:
    box = mailbox.Maildir(path, create=True)
    for mail in mails:
        box.add(mail)
    box.close()
    return path


def mbox(path: Path, mails: Sequence[bytes]) -> Path:
    box = mailbox.mbox(path, create=True)
    for mail in mails:
        box.add(mail)
    box.flush()
    box.close()
    return path


def apply(ledger: Ledger, path: Path, **kw: object) -> BounceReport:
    source = open_mailbox(path)
    try:
        return apply_bounces(ledger, source, key=KEY, providers=[ACCOUNT], **kw)  # type: ignore[arg-type]
    finally:
        source.close()


def current(ledger: Ledger, messages: Sequence[MessageRecord]) -> dict[str, MessageRecord]:
    return {m.id: m for m in ledger.messages_for_bounces([m.id for m in messages])}


def suppression_rows(ledger: Ledger) -> dict[str, tuple[str, str, str]]:
    """address hash → (channel, reason, source)."""
    with ledger._tx(write=False) as conn:
        rows = conn.execute(
            select(
                suppressions.c.address_hash,
                suppressions.c.channel,
                suppressions.c.reason,
                suppressions.c.source,
            )
        )
        return {h: (c, r, s) for h, c, r, s in rows}


def counts(report: BounceReport) -> dict[str, int]:
    return {o.value: n for o, n in report.counts.items() if n}


# Reading DSNs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "outcome", "code"),
    [
        ("postfix-user-unknown.eml", Outcome.HARD_BOUNCE, "5.1.1"),
        ("exim-no-such-user.eml", Outcome.HARD_BOUNCE, "5.1.1"),  # Status 5.0.0, made precise
        ("exchange-recipient-not-found.eml", Outcome.HARD_BOUNCE, "5.1.10"),
        ("gmail-dmarc-rejected.eml", Outcome.SENDER_SIDE, "5.7.26"),
        ("postfix-mailbox-full.eml", Outcome.MAILBOX_FULL, "5.2.2"),
        ("postfix-delayed.eml", Outcome.IGNORED, "4.7.1"),
    ],
)
def test_each_sample_dsn_is_read_and_classified(name: str, outcome: Outcome, code: str) -> None:
    dsn = read_dsn(fixture(name))
    assert dsn.message_ids[0] == f"<{FIXTURE_ID}@{DOMAIN}>"
    assert dsn.verdict(FIXTURE_ADDRESS) == (outcome, code)
    assert dsn.verdict(None) == (outcome, code)
    assert FIXTURE_ADDRESS not in repr(dsn)  # addresses stay out of reprs, hence out of tracebacks


@pytest.mark.parametrize(
    ("name", "reason"), [("out-of-office.eml", "not-a-dsn"), ("malformed-report.eml", "malformed")]
)
def test_auto_replies_and_broken_reports_are_not_dsns(name: str, reason: str) -> None:
    with pytest.raises(NotADsn) as caught:
        read_dsn(fixture(name))
    assert caught.value.reason == reason


def report_mail(
    status_fields: str, *, headers: str = "", per_message: str = "", original: str | None = None
) -> bytes:
    """A minimal multipart/report DSN with the given delivery-status text."""
    third = "" if original is None else f"--B\nContent-Type: text/rfc822-headers\n\n{original}\n"
    return (
        "From: MAILER-DAEMON@relay.example.org\nSubject: Undelivered Mail\n"
        f"{headers}MIME-Version: 1.0\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\n\n'
        "--B\nContent-Type: text/plain\n\nThe mail system\n\n"
        "--B\nContent-Type: message/delivery-status\n\n"
        f"Reporting-MTA: dns; relay.example.org\n{per_message}\n{status_fields}\n"
        f"{third}--B--\n"
    ).encode()


def test_a_status_comes_from_the_diagnostic_when_missing_and_is_normalised() -> None:
    original = f"Message-ID: <{FIXTURE_ID}@{DOMAIN}>"
    bare = report_mail(
        "Final-Recipient: rfc822; a@example.net\nAction: failed\nDiagnostic-Code: smtp; 550 no",
        original=original,
    )
    assert read_dsn(bare).verdict(None) == (Outcome.HARD_BOUNCE, "5.0.0")
    enhanced = report_mail(
        "Final-Recipient: rfc822; a@example.net\nAction: failed\nDiagnostic-Code: smtp;554-5.7.1 blocked",
        original=original,
    )
    assert read_dsn(enhanced).verdict(None) == (Outcome.SENDER_SIDE, "5.7.1")
    padded = report_mail(
        "Final-Recipient: rfc822; a@example.net\nAction: Failed\nStatus: 5.01.001 (bad)", original=original
    )
    assert read_dsn(padded).verdict(None) == (Outcome.HARD_BOUNCE, "5.1.1")
    sender = report_mail(
        "Final-Recipient: rfc822; a@example.net\nAction: failed\nStatus: 5.1.7", original=original
    )
    assert read_dsn(sender).verdict(None) == (Outcome.SENDER_SIDE, "5.1.7")  # our own address is bad
    nothing = report_mail("Final-Recipient: rfc822; a@example.net\nAction: failed", original=original)
    with pytest.raises(NotADsn, match="malformed"):  # no status at all: never suppress on a guess
        read_dsn(nothing)


def test_the_block_about_the_messages_own_address_decides() -> None:
    blocks = (
        "Final-Recipient: rfc822; alias@example.org\nAction: expanded\nStatus: 2.0.0\n\n"
        "Final-Recipient: rfc822; forward@example.com\nOriginal-Recipient: rfc822; Jeanne@Example.net\n"
        "Action: delayed\nStatus: 4.4.1\n\n"
        "Final-Recipient: rfc822; other@example.com\nAction: failed\nStatus: 5.1.1"
    )
    dsn = read_dsn(report_mail(blocks, original=f"Message-ID: <{FIXTURE_ID}@{DOMAIN}>"))
    assert dsn.verdict("jeanne@example.net") == (Outcome.IGNORED, "4.4.1")
    # No block names the address: any failure among them counts
    assert dsn.verdict("somebody@example.net") == (Outcome.HARD_BOUNCE, "5.1.1")


def test_the_original_is_found_from_fallback_headers() -> None:
    fields = "Final-Recipient: rfc822; a@example.net\nAction: failed\nStatus: 5.1.1"
    in_reply = report_mail(fields, headers=f"In-Reply-To: <{FIXTURE_ID}@{DOMAIN}>\n")
    assert read_dsn(in_reply).message_ids == (f"<{FIXTURE_ID}@{DOMAIN}>",)
    original_field = report_mail(fields, per_message=f"X-Original-Message-ID: <x1@{DOMAIN}>\n")
    assert read_dsn(original_field).message_ids == (f"<x1@{DOMAIN}>",)
    nothing = read_dsn(report_mail(fields))
    assert nothing.message_ids == ()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\xff\xfe garbage \x80\x81" * 50,
        b"Content-Type: multipart/report; report-type=delivery-status\n\nno boundary at all",
        (
            b'Content-Type: multipart/report; boundary="B"\n\n'
            b"--B\nContent-Type: message/delivery-status\n\n--B--"
        ),
        (
            b'Content-Type: multipart/report; report-type=feedback-report; boundary="B"\n\n--B\n'
            b"Content-Type: message/feedback-report\n\nFeedback-Type: abuse\n--B--\n"
        ),
        b"Message-ID: <<<@@>>>\nIn-Reply-To: <\nContent-Type: text/plain\n\nhello",
    ],
    ids=["empty", "binary", "no-boundary", "empty-status", "complaint", "bad-headers"],
)
def test_hostile_mail_is_skipped_never_a_crash(data: bytes) -> None:
    with pytest.raises(NotADsn):
        read_dsn(data)


def test_every_meaning_is_short_and_every_code_has_one() -> None:
    assert all(len(text) < 80 and "@" not in text for text in MEANINGS.values())
    assert meaning("5.1.1") == "the mailbox does not exist"
    assert meaning("5.7.99") == "refused by a security or policy rule"
    assert meaning("5.9.9") == "permanent failure"


# The mailbox -------------------------------------------------------------------------------------------
def test_a_path_that_is_no_mailbox_says_what_was_expected(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=r"nowhere does not exist: expected a Maildir .* or an mbox file"):
        open_mailbox(missing)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ConfigError, match="folder is a folder without cur/ and new/"):
        open_mailbox(folder)
    single = tmp_path / "bounce.eml"
    single.write_bytes(fixture("postfix-user-unknown.eml"))
    with pytest.raises(ConfigError, match=r"bounce.eml is neither a Maildir nor an mbox file"):
        open_mailbox(single)
    spool = tmp_path / "spool"
    spool.write_bytes(b"")  # an mbox whose mail was all read
    source = open_mailbox(spool)
    assert (source.kind, source.mail_keys()) == ("mbox", [])
    source.close()


# Applying ------------------------------------------------------------------------------------------------
def test_a_maildir_of_every_kind_of_bounce(ledger: Ledger, tmp_path: Path) -> None:
    messages = sent_emails(ledger, 7)
    hard = ["postfix-user-unknown.eml", "exim-no-such-user.eml", "exchange-recipient-not-found.eml"]
    mails = [about(name, m) for name, m in zip(hard, messages, strict=False)]
    mails += [
        about("gmail-dmarc-rejected.eml", messages[3]),
        about("postfix-mailbox-full.eml", messages[4]),
        about("postfix-delayed.eml", messages[5]),
        about("out-of-office.eml", messages[6]),  # quotes our Message-ID, but is no bounce
        about("malformed-report.eml", messages[6]),
        fixture("postfix-user-unknown.eml", new_id(), address(99)),  # not a message of this ledger
    ]
    report = apply(ledger, maildir(tmp_path / "Maildir", mails))

    assert counts(report) == {
        "hard_bounce": 3,
        "sender_side": 1,
        "mailbox_full": 1,
        "ignored": 1,
        "unknown": 1,
        "skipped": 2,
    }
    assert (report.read, report.suppressed, report.kind) == (9, 3, "maildir")
    assert report.codes == {"5.1.1": 2, "5.1.10": 1, "5.7.26": 1, "5.2.2": 1}
    assert report.skipped == {"not-a-dsn": 1, "malformed": 1}
    assert sorted(report.message_ids[Outcome.HARD_BOUNCE]) == sorted(m.id for m in messages[:3])
    assert report.message_ids[Outcome.SENDER_SIDE] == [messages[3].id]
    assert len(report.mail_keys[Outcome.SKIPPED]) == 2 and len(report.mail_keys[Outcome.UNKNOWN]) == 1

    now_ = current(ledger, messages)
    expected = {0: "5.1.1", 1: "5.1.1", 2: "5.1.10", 3: "5.7.26", 4: "5.2.2"}
    for i, code in expected.items():
        m = now_[messages[i].id]
        assert (m.status, m.error_code) == (Status.PERMANENT_FAILURE, code)
        assert m.error_text == f"bounced (DSN {code}): {meaning(code)}"
        assert m.final_at is not None and m.sent_at is not None
    assert now_[messages[5].id].status is Status.SENT  # delayed: the relay still tries
    assert now_[messages[6].id].status is Status.SENT  # an auto-reply and a broken report change nothing

    # Only the three hard bounces' addresses are suppressed: never 5.7.x (our side) or a full mailbox
    hashes = {recipient_hash(KEY, "email", address(i)): i for i in range(7)}
    rows = suppression_rows(ledger)
    assert {hashes[h] for h in rows} == {0, 1, 2}
    assert set(rows.values()) == {("email", "hard-bounce", "bounces")}

    # Again: nothing changes, and the report says the bounces were applied already
    before = current(ledger, messages)
    again = apply(ledger, tmp_path / "Maildir")
    assert counts(again) == {"already_applied": 5, "ignored": 1, "unknown": 1, "skipped": 2}
    assert again.suppressed == 0 and not again.codes
    assert current(ledger, messages) == before
    assert suppression_rows(ledger) == rows


def test_an_mbox_file_works_the_same(ledger: Ledger, tmp_path: Path) -> None:
    messages = sent_emails(ledger, 3)
    path = mbox(
        tmp_path / "bounces.mbox",
        [
            about("exchange-recipient-not-found.eml", messages[0]),
            about("gmail-dmarc-rejected.eml", messages[1]),
            about("postfix-delayed.eml", messages[2]),
            fixture("out-of-office.eml"),
        ],
    )
    report = apply(ledger, path)
    assert report.kind == "mbox"
    assert counts(report) == {"hard_bounce": 1, "sender_side": 1, "ignored": 1, "skipped": 1}
    statuses = {m.id: m.status for m in current(ledger, messages).values()}
    assert [statuses[m.id] for m in messages] == [
        Status.PERMANENT_FAILURE,
        Status.PERMANENT_FAILURE,
        Status.SENT,
    ]
    assert set(suppression_rows(ledger)) == {recipient_hash(KEY, "email", address(0))}
    assert counts(apply(ledger, path)) == {"already_applied": 2, "ignored": 1, "skipped": 1}


def test_dry_run_says_what_would_change_and_changes_nothing(ledger: Ledger, tmp_path: Path) -> None:
    messages = sent_emails(ledger, 3)
    path = maildir(
        tmp_path / "Maildir",
        [
            about("postfix-user-unknown.eml", messages[0]),
            about("exim-no-such-user.eml", messages[0]),  # the same bounce twice: applied once
            about("gmail-dmarc-rejected.eml", messages[1]),
            about("postfix-delayed.eml", messages[2]),
        ],
    )
    before = current(ledger, messages)
    dry = apply(ledger, path, dry_run=True)
    assert dry.dry_run and dry.suppressed == 1
    assert counts(dry) == {"hard_bounce": 1, "already_applied": 1, "sender_side": 1, "ignored": 1}
    assert current(ledger, messages) == before
    assert suppression_rows(ledger) == {}

    real = apply(ledger, path)
    assert counts(real) == counts(dry) and real.suppressed == dry.suppressed
    assert real.as_dict()["counts"] == {**dry.as_dict()["counts"]}
    # The dry run counts an address already on the list as nothing to add
    assert apply(ledger, path, dry_run=True).suppressed == 0


def test_messages_not_sent_any_more_are_left_as_they_are(ledger: Ledger, tmp_path: Path) -> None:
    messages = sent_emails(ledger, 1)
    # A delivered message, one failed at send time, one handed back for a retry (created again)
    others = sent_emails(ledger, 3, addresses=[address(10), address(11), address(12)])
    delivered, failed, retrying = others
    with ledger._tx() as conn:  # as receipts and the sweeper would leave them
        for m, status in (
            (delivered, Status.DELIVERED),
            (failed, Status.PERMANENT_FAILURE),
            (retrying, Status.CREATED),
        ):
            conn.execute(
                messages_t.update().where(messages_t.c.id == m.id).values(status=status.value, error_code="x")
            )
    path = maildir(
        tmp_path / "Maildir",
        [about("postfix-user-unknown.eml", m) for m in (messages[0], delivered, failed, retrying)],
    )
    report = apply(ledger, path)
    assert counts(report) == {"hard_bounce": 1, "already_applied": 2, "other_status": 1}
    assert report.message_ids[Outcome.OTHER_STATUS] == [retrying.id]
    after = current(ledger, others)
    assert [after[m.id].status for m in others] == [
        Status.DELIVERED,
        Status.PERMANENT_FAILURE,
        Status.CREATED,
    ]
    assert all(after[m.id].error_code == "x" for m in others)
    assert set(suppression_rows(ledger)) == {recipient_hash(KEY, "email", address(0))}


def test_a_message_is_found_by_its_provider_reference(ledger: Ledger, tmp_path: Path) -> None:
    # A driver that writes its own Message-ID: the left part is not our message id
    messages = sent_emails(ledger, 1, reference="<relay.{id}.x@mta.example.org>")
    mail = fixture("postfix-user-unknown.eml", to=address(0)).replace(
        f"<{FIXTURE_ID}@{DOMAIN}>".encode(), f"<relay.{messages[0].id}.x@mta.example.org>".encode()
    )
    path = maildir(tmp_path / "Maildir", [mail])
    source = open_mailbox(path)
    # The reference index is searched per account: without the account names the message is unknown
    assert counts(apply_bounces(ledger, source, key=KEY, dry_run=True)) == {"unknown": 1}
    source.close()
    assert counts(apply(ledger, path)) == {"hard_bounce": 1}


def test_a_purged_address_fails_the_message_but_cannot_be_suppressed(ledger: Ledger, tmp_path: Path) -> None:
    messages = sent_emails(ledger, 1, addresses=[None])
    report = apply(
        ledger, maildir(tmp_path / "Maildir", [fixture("postfix-user-unknown.eml", messages[0].id)])
    )
    assert counts(report) == {"hard_bounce": 1}
    assert (report.suppressed, report.address_missing) == (0, 1)
    assert current(ledger, messages)[messages[0].id].status is Status.PERMANENT_FAILURE


def test_no_address_or_diagnostic_reaches_the_ledger_the_log_or_the_report(
    ledger: Ledger, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    messages = sent_emails(ledger, 4)
    names = ["postfix-user-unknown.eml", "exchange-recipient-not-found.eml", "gmail-dmarc-rejected.eml"]
    mails = [about(name, m) for name, m in zip(names, messages, strict=False)]
    mails.append(about("out-of-office.eml", messages[3]))
    with caplog.at_level(logging.DEBUG):
        report = apply(ledger, maildir(tmp_path / "Maildir", mails))
    texts = [caplog.text, json.dumps(report.as_dict()), repr(report)]
    texts += [f"{m.error_code} {m.error_text}" for m in current(ledger, messages).values()]
    for text in texts:
        assert "@example.net" not in text and "personne." not in text
        assert not any(d in text for d in DIAGNOSTICS), text
    assert "2 hard_bounce" in caplog.text  # counts are logged


# The command -------------------------------------------------------------------------------------------
CAMPAIGN = "campaigns/rappel-vaccination-grippe.yaml"


def test_the_command_applies_bounces_of_a_real_send(project: Path, run_cli: Run, tmp_path: Path) -> None:
    sent = run_cli("send", CAMPAIGN, "--yes", "--json", cwd=project)
    assert sent.returncode == 0, sent.stderr
    run_id = json.loads(sent.stdout)["run_id"]
    emails = sorted((project / "outbox" / run_id / "email").glob("*.eml"))
    assert len(emails) >= 3
    # The outbox wrote the exact message an SMTP relay would have got: its Message-ID and To
    originals = []
    for path in emails[:3]:
        with path.open("rb") as f:
            headers = BytesHeaderParser().parse(f)
        originals.append((str(headers["Message-ID"]).strip("<>").partition("@")[0], str(headers["To"])))
    box = maildir(
        tmp_path / "Maildir",
        [
            fixture("postfix-user-unknown.eml", *originals[0]),
            fixture("gmail-dmarc-rejected.eml", *originals[1]),
            fixture("postfix-delayed.eml", *originals[2]),
            fixture("exim-no-such-user.eml", new_id(), "inconnu@example.net"),
            fixture("out-of-office.eml", *originals[2]),
        ],
    )
    shown = run_cli("bounces", box, "--dry-run", cwd=project)
    assert shown.returncode == 0, shown.stderr
    assert "Dry run, nothing changed: 5 mails read from the maildir" in shown.stdout
    assert "message would fail, address would be suppressed" in shown.stdout

    result = run_cli("bounces", box, "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["counts"] == {
        "hard_bounce": 1,
        "mailbox_full": 0,
        "sender_side": 1,
        "ignored": 1,
        "unknown": 1,
        "skipped": 1,
        "already_applied": 0,
        "other_status": 0,
    }
    assert data["suppressed"] == 1 and data["dry_run"] is False
    assert data["message_ids"]["hard_bounce"] == [originals[0][0]]

    report = run_cli("report", run_id, "--format", "json", "--status", "permanent-failure", cwd=project)
    assert report.returncode == 0, report.stderr
    assert originals[0][0] in report.stdout and "5.7.26" in report.stdout

    from smartpush.config import load_config

    key = load_config(project / "smartpush.yaml").secret_key()
    ledger = Ledger(f"sqlite:///{project / 'smartpush.db'}")
    try:
        on_list = ledger.suppressed("email", {recipient_hash(key, "email", to) for _, to in originals})
        assert on_list == {recipient_hash(key, "email", originals[0][1])}
    finally:
        ledger.close()

    again = run_cli("bounces", box, cwd=project)
    assert again.returncode == 0, again.stderr
    assert "already applied" in again.stdout
    assert "Suppression list: 0 address(es) added" in again.stdout
    for output in (shown, result, again):
        everything = output.stdout + output.stderr
        assert not any(to in everything for _, to in originals)
        assert "@example.net" not in everything
        assert not any(d in everything for d in DIAGNOSTICS)


def test_the_command_names_a_path_that_is_no_mailbox(project: Path, run_cli: Run, tmp_path: Path) -> None:
    result = run_cli("bounces", tmp_path / "nothing-here", cwd=project)
    assert result.returncode == 1
    assert "nothing-here does not exist" in result.stderr and "Maildir" in result.stderr
    assert not (project / "smartpush.db").exists()  # the database is not touched for a wrong path
    as_json = run_cli("bounces", tmp_path, "--json", cwd=project)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["ok"] is False
