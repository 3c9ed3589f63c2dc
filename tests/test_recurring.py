"""Recurring audiences: `audience.exclude_reached` and `limits.per_recipient` leave out exactly the
recipients reached recently, across occurrences and campaigns (embedded engine, real SQLite ledger)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from smartpush.config import load_config
from smartpush.engine import Engine
from smartpush.launch import FREQUENCY_CAP, REACHED_RECENTLY, Launch, launch
from smartpush.ledger import RunState, Status
from smartpush.loading import load_campaign

CAMPAIGN = """\
name: {name}
category: {category}
audience:
  source: {source}
  id: id
{audience}
channels:
  - channel: sms
    provider: outbox
    body: "Bonjour."
  - channel: email
    provider: outbox
    from: "Service <noreply@example.fr>"
    subject: "Information"
    text: "Bonjour."
strategy: all
"""


class Project:
    def __init__(self, root: Path, limits: str = "") -> None:
        self.root = root
        (root / "smartpush.yaml").write_text(
            f"database: sqlite:///{root / 'ledger.db'}\n{limits}"
            "providers:\n  outbox:\n    type: outbox\n    path: outbox\n",
            encoding="utf-8",
        )
        self.config = load_config(root / "smartpush.yaml", env={})
        self.engine = Engine(self.config)
        self.ledger = self.engine.rt.ledger
        self.worker = self.engine.worker(2)

    def audience(self, name: str, ids: range | list[int]) -> str:
        rows = ["id;phone;email"] + [f"{i};06{12345600 + i:08d};p{i}@example.fr" for i in ids]
        (self.root / f"{name}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        return f"{name}.csv"

    def campaign(self, name: str, source: str, *, category: str = "information", audience: str = "") -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(
            CAMPAIGN.format(name=name, category=category, source=source, audience=audience), encoding="utf-8"
        )
        return path

    def send(self, campaign: Path, key: str | None = None) -> Launch:
        prepared = load_campaign(campaign, self.config)
        result = launch(self.engine.rt, prepared, enqueue=self.engine.enqueue, key=key)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            run = self.ledger.get_run(result.run.id)
            if run is not None and run.state is RunState.FINISHED:
                return result
            time.sleep(0.05)
        raise AssertionError("the run did not finish")

    def outcome(self, run_id: str) -> dict[str, set[str]]:
        """Recipient ids by what happened to them in the run: sent, or the skip reason."""
        out: dict[str, set[str]] = {}
        for m in self.ledger.messages(run_id):
            what = "sent" if m.status is Status.SENT else f"{m.status.value}:{m.error_code}"
            out.setdefault(what, set()).add(m.recipient_id)
        return out

    def age(self, run_id: str, recipient_ids: list[int], days: float) -> None:
        """Make the run's messages to these recipients sent ``days`` ago (time travel for the ledger)."""
        ago = timedelta(days=days)
        with self.ledger._tx() as conn:  # a test reaching into the ledger on purpose
            for rid in recipient_ids:
                for (mid,) in conn.execute(
                    text("SELECT id FROM messages WHERE run_id = :r AND recipient_id = :p"),
                    {"r": run_id, "p": str(rid)},
                ):
                    conn.execute(
                        text("UPDATE messages SET sent_at = :t WHERE id = :m"),
                        {"t": _stamp(ago), "m": mid},
                    )

    def close(self) -> None:
        self.worker.stop()
        self.engine.close()


def _stamp(ago: timedelta) -> str:
    """A time ``ago`` as SQLite's ledger stores it (naive UTC text)."""
    return (datetime.now(UTC) - ago).replace(tzinfo=None).isoformat(sep=" ")


def ids(*values: int | range) -> set[str]:
    out: set[str] = set()
    for v in values:
        out |= {str(i) for i in (v if isinstance(v, range) else [v])}
    return out


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    p = Project(tmp_path)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Project]:
    p = Project(tmp_path, limits="limits:\n  per_recipient: 1/7d\n")
    try:
        yield p
    finally:
        p.close()


def test_exclude_reached_leaves_out_exactly_those_reached_within_the_period(project: Project) -> None:
    # First occurrence: recipients 0-5.
    source = project.audience("people", range(6))
    path = project.campaign("digest", source, audience="  exclude_reached: 30d")
    first = project.send(path, key="digest@1")
    assert project.outcome(first.run.id) == {"sent": ids(range(6))}
    # 0 and 1 were reached 31 days ago, 2 29 days ago; 3's messages failed (not reached)
    project.age(first.run.id, [0, 1], days=31)
    project.age(first.run.id, [2], days=29)
    with project.ledger._tx() as conn:
        conn.execute(
            text("UPDATE messages SET status = 'permanent-failure' WHERE run_id = :r AND recipient_id = '3'"),
            {"r": first.run.id},
        )
    # Second occurrence: the audience is read again and has grown to 0-9.
    project.audience("people", range(10))
    second = project.send(path, key="digest@2")
    got = project.outcome(second.run.id)
    assert got == {
        "sent": ids(0, 1, 3, range(6, 10)),
        f"skipped:{REACHED_RECENTLY}": ids(2, 4, 5),
    }
    assert second.reached_recently == 3 and second.capped == 0
    # Every channel of a left-out recipient is skipped, with the reason, and no address is kept.
    skipped = [m for m in project.ledger.messages(second.run.id) if m.status is Status.SKIPPED]
    assert len(skipped) == 6 and all(m.address is None for m in skipped)
    assert all("exclude_reached" in (m.error_text or "") for m in skipped)
    # Counts add up: every recipient × channel is in the run.
    assert sum(project.ledger.counts(second.run.id).values()) == 10 * 2


def test_exclude_reached_counts_only_this_campaign(project: Project) -> None:
    other = project.campaign("other", project.audience("a", range(5)))
    project.send(other)
    path = project.campaign("digest", project.audience("b", range(5)), audience="  exclude_reached: 30d")
    assert project.outcome(project.send(path).run.id) == {"sent": ids(range(5))}


def test_frequency_cap_across_campaigns(capped: Project) -> None:
    # Campaign A reaches 0-4 (both channels: one contact, not two).
    a = capped.send(capped.campaign("a", capped.audience("a", range(5))))
    assert capped.outcome(a.run.id) == {"sent": ids(range(5))}
    # Campaign B, a different campaign, for 0-9: 0-4 were contacted within 7 days.
    b = capped.send(capped.campaign("b", capped.audience("b", range(10))))
    assert capped.outcome(b.run.id) == {"sent": ids(range(5, 10)), f"skipped:{FREQUENCY_CAP}": ids(range(5))}
    assert (b.capped, b.reached_recently) == (5, 0)
    # A legally required notice is not capped...
    s = capped.send(capped.campaign("notice", capped.audience("s", range(12)), category="service"))
    assert capped.outcome(s.run.id) == {"sent": ids(range(12))}
    # ...and does not count: 10 and 11 had only the notice, so an information campaign still reaches them.
    c = capped.send(capped.campaign("c", capped.audience("c", [3, 7, 10, 11])))
    assert capped.outcome(c.run.id) == {"sent": ids(10, 11), f"skipped:{FREQUENCY_CAP}": ids(3, 7)}


def test_frequency_cap_period_ends(capped: Project) -> None:
    a = capped.send(capped.campaign("a", capped.audience("a", range(4))))
    capped.age(a.run.id, [0, 1], days=8)  # reached 8 days ago: outside 1/7d
    capped.age(a.run.id, [2], days=6)
    b = capped.send(capped.campaign("b", capped.audience("b", range(4))))
    assert capped.outcome(b.run.id) == {"sent": ids(0, 1), f"skipped:{FREQUENCY_CAP}": ids(2, 3)}


def test_a_cap_of_two_allows_a_second_contact(tmp_path: Path) -> None:
    p = Project(tmp_path, limits="limits:\n  per_recipient: 2/7d\n")
    try:
        p.send(p.campaign("a", p.audience("a", range(3))))
        p.send(p.campaign("b", p.audience("b", range(2))))
        c = p.send(p.campaign("c", p.audience("c", range(4))))
        # 0 and 1 had two contacts (a, b), 2 one (a), 3 none.
        assert p.outcome(c.run.id) == {"sent": ids(2, 3), f"skipped:{FREQUENCY_CAP}": ids(0, 1)}
    finally:
        p.close()


def test_a_run_still_sending_counts_as_reaching(capped: Project) -> None:
    """Two campaigns launched together: the second does not also send to the first one's queue."""
    a_path = capped.campaign("a", capped.audience("a", range(3)))
    capped.worker.stop()  # nothing is sent: the first run's messages stay `created`
    prepared = load_campaign(a_path, capped.config)
    launch(capped.engine.rt, prepared, enqueue=lambda run_id, segment: None)
    b_prepared = load_campaign(capped.campaign("b", capped.audience("b", range(5))), capped.config)
    b = launch(capped.engine.rt, b_prepared, enqueue=lambda run_id, segment: None)
    statuses = {m.recipient_id: m.status for m in capped.ledger.messages(b.run.id) if m.channel == "sms"}
    assert {r for r, s in statuses.items() if s is Status.SKIPPED} == ids(range(3))
    capped.worker = capped.engine.worker(1)  # for close()


def test_invalid_limits_and_periods_are_named(tmp_path: Path) -> None:
    from smartpush.errors import ConfigError

    (tmp_path / "smartpush.yaml").write_text("limits:\n  per_recipient: weekly\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"smartpush.yaml:2.*'weekly' is not a frequency"):
        load_config(tmp_path / "smartpush.yaml", env={})
    (tmp_path / "x").mkdir()
    p = Project(tmp_path / "x")
    try:
        path = p.campaign("d", p.audience("d", range(2)), audience="  exclude_reached: soon")
        named = r"d.yaml:6:20: audience.exclude_reached: 'soon' is not a duration"
        with pytest.raises(ConfigError, match=named):
            load_campaign(path, p.config)
    finally:
        p.close()
