"""Every kind of bad campaign input gets an error naming the file and the line or field."""

from __future__ import annotations

import shutil
from importlib.resources import as_file, files
from pathlib import Path

import pytest

from smartpush.config import load_config
from smartpush.errors import ConfigError, Problem
from smartpush.loading import PreparedCampaign, load_campaign

CAMPAIGN = "campaigns/rappel-vaccination-grippe.yaml"


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """The example project, copied from the installed package."""
    root = tmp_path / "demo"
    with as_file(files("smartpush.examples")) as src, as_file(files("smartpush.layouts")) as layouts:
        shutil.copytree(src, root, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
        shutil.copytree(
            layouts,
            root / "templates",
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__init__.py", "__pycache__"),
        )
    return root


def load(root: Path, name: str = CAMPAIGN) -> PreparedCampaign:
    return load_campaign(root / name, load_config(root / "smartpush.yaml", env={}))


def problems(root: Path, name: str = CAMPAIGN) -> list[Problem]:
    with pytest.raises(ConfigError) as exc:
        load(root, name)
    return list(exc.value.problems)


def edit(root: Path, old: str, new: str, name: str = CAMPAIGN) -> None:
    path = root / name
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def line_of(root: Path, needle: str, name: str = CAMPAIGN) -> int:
    for i, line in enumerate((root / name).read_text(encoding="utf-8").splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(needle)


def test_the_example_is_valid(demo: Path) -> None:
    prepared = load(demo)
    assert [str(c.channel) for c in prepared.channels] == ["push", "sms", "email"]
    assert prepared.region == "FR"
    assert "prenom" in prepared.channels[1].templates["body"].variables


def test_yaml_syntax_error(demo: Path) -> None:
    edit(demo, "strategy: first-reachable", "strategy: [first-reachable")
    (p,) = problems(demo)
    assert p.file and p.file.endswith("rappel-vaccination-grippe.yaml")
    assert p.line is not None and p.line >= line_of(demo, "strategy:")
    assert "YAML syntax error" in p.message


def test_unknown_key_with_suggestion(demo: Path) -> None:
    edit(demo, "    subject:", "    subjet:")
    found = problems(demo)
    unknown = next(p for p in found if "unknown field" in p.message)
    assert unknown.line == line_of(demo, "subjet:")
    assert "did you mean 'subject'" in unknown.message
    assert unknown.field == "channels[2].subjet"
    missing = next(p for p in found if "required field 'subject'" in p.message)
    assert missing.field == "channels[2].subject"


def test_wrong_types_all_reported_at_once(demo: Path) -> None:
    edit(demo, "  max_attempts: 6", "  max_attempts: beaucoup")
    edit(demo, "priority: normal", "priority: urgnt")
    edit(demo, "  size: 500", "  size: 0")
    found = problems(demo)
    by_field = {p.field: p for p in found}
    assert by_field["retry.max_attempts"].line == line_of(demo, "max_attempts:")
    assert "not a whole number" in by_field["retry.max_attempts"].message
    assert "did you mean 'urgent'" in by_field["priority"].message
    assert by_field["segments.size"].line == line_of(demo, "size: 0")


def test_bad_duration_and_window(demo: Path) -> None:
    edit(demo, "expire_after: 24h", "expire_after: 24 heures")
    edit(demo, "# schedule: ", "schedule:   ")
    edit(
        demo,
        '#   window: {days: mon-fri, hours: "09:00-19:00"',
        '  window: {days: mon-fri, hours: "19:00-09:00"',
    )
    by_field = {p.field: p.message for p in problems(demo)}
    assert "not a duration" in by_field["retry.expire_after"]
    assert "ends before it starts" in by_field["schedule.window.hours"]


def test_unknown_provider_account(demo: Path) -> None:
    edit(
        demo,
        "    provider: outbox\n    body: templates/grippe/sms",
        "    provider: outbx\n    body: templates/grippe/sms",
    )
    (p,) = problems(demo)
    assert p.field == "channels[1].provider"
    assert "did you mean 'outbox'" in p.message
    assert p.line == line_of(demo, "provider: outbx")


def test_missing_template_file(demo: Path) -> None:
    (demo / "templates/grippe/sms.txt.j2").unlink()
    (p,) = problems(demo)
    assert "templates/grippe/sms.txt.j2" in p.message and "not found" in p.message
    assert p.line == line_of(demo, "body: templates/grippe/sms.txt.j2")


def test_template_syntax_error_points_into_the_template(demo: Path) -> None:
    (demo / "templates/grippe/sms.txt.j2").write_text("Bonjour\n{{ prenom }\n", encoding="utf-8")
    (p,) = problems(demo)
    assert p.file is not None and p.file.endswith("templates/grippe/sms.txt.j2")
    assert p.line == 2


def test_undefined_variable_is_checked_against_the_columns(demo: Path) -> None:
    (demo / "templates/grippe/sms.txt.j2").write_text(
        "Bonjour {{ prénom }}, {{ date_limte }}", encoding="utf-8"
    )
    found = problems(demo)
    text = "\n".join(p.message for p in found)
    assert "prénom" in text and "did you mean 'prenom'" in text
    assert "date_limte" in text and "did you mean 'date_limite'" in text


def test_inline_template_syntax_error_names_the_campaign_line(demo: Path) -> None:
    edit(demo, 'title: "Vaccination grippe"', 'title: "Vaccination {% if %}"')
    (p,) = problems(demo)
    assert p.file is not None and p.file.endswith("rappel-vaccination-grippe.yaml")
    assert p.line == line_of(demo, "title:")


def test_sandbox_escape_is_an_invalid_campaign(demo: Path) -> None:
    edit(demo, 'title: "Vaccination grippe"', "title: \"{{ ''.__class__.__mro__[1].__subclasses__() }}\"")
    prepared = load(demo)  # compiles: attribute access is checked when rendering
    from smartpush.recipients import Evaluator

    outcome = next(
        o for o in Evaluator(prepared) if o.kind == "recipient" and o.channels[0].status != "skipped"
    )
    assert outcome.channels[0].status == "invalid"
    assert "internals" in (outcome.channels[0].reason or "")


def test_missing_audience_file(demo: Path) -> None:
    (demo / "data/assures.csv").unlink()
    found = problems(demo)
    assert any("data/assures.csv" in p.message and "not found" in p.message for p in found)


def test_missing_id_and_address_columns(demo: Path) -> None:
    edit(demo, "  id: numero_assure", "  id: numero")
    edit(demo, "    phone: phone", "    phone: telephone")
    found = problems(demo)
    assert any(p.field == "audience.id" and "did you mean 'numero_assure'" in p.message for p in found)
    assert any("telephone" in p.message and "audience.columns.phone" in p.message for p in found)


def test_where_expression_problems(demo: Path) -> None:
    edit(demo, 'where: "age >= 65"', 'where: "agee >= 65"')
    (p,) = problems(demo)
    assert "agee" in p.message and "did you mean 'age'" in p.message


def test_channel_a_driver_cannot_send(demo: Path) -> None:
    # A second channel of the same kind is refused too.
    edit(
        demo, "  - channel: email", "  - channel: sms\n    provider: outbox\n    body: x\n  - channel: email"
    )
    found = problems(demo)
    assert any("listed twice" in p.message for p in found)


def test_bad_from_address(demo: Path) -> None:
    edit(demo, "ne-pas-repondre@info.exemple.fr", "ne-pas-repondre-at-exemple")
    (p,) = problems(demo)
    assert p.field == "channels[2].from"


def test_marketing_needs_public_url_for_real_email(demo: Path) -> None:
    cfg = demo / "smartpush.yaml"
    cfg.write_text(cfg.read_text().replace("public_url:", "# public_url:"), encoding="utf-8")
    edit(demo, "category: information", "category: marketing")
    prepared = load(demo)  # outbox only: a warning, not an error
    assert any("public_url" in w.message for w in prepared.warnings)
    assert any("stop_mention" in w.message for w in prepared.warnings)
