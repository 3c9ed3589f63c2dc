"""End to end: the real `smartpush` command on a project made by `smartpush init`."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

Run = Callable[..., subprocess.CompletedProcess[str]]
CAMPAIGN = "campaigns/rappel-vaccination-grippe.yaml"


def test_help_lists_the_commands(run_cli: Run) -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("init", "validate", "preview", "plan"):
        assert command in result.stdout
    assert "Exit codes" in result.stdout


def test_usage_error_exits_2(run_cli: Run) -> None:
    assert run_cli("plan").returncode == 2
    assert run_cli("no-such-command").returncode == 2


def test_init_writes_a_project_and_refuses_to_overwrite(tmp_path: Path, run_cli: Run) -> None:
    target = tmp_path / "p"
    assert run_cli("init", target).returncode == 0
    for rel in (
        "smartpush.yaml",
        CAMPAIGN,
        "templates/layouts/email.html.j2",
        "templates/grippe/sms.txt.j2",
        "data/assures.csv",
    ):
        assert (target / rel).is_file(), rel
    assert not list(target.rglob("__init__.py"))
    again = run_cli("init", target)
    assert again.returncode == 1
    assert "--force" in again.stderr
    assert run_cli("init", target, "--force").returncode == 0


def test_validate_plan_preview_on_the_example(project: Path, run_cli: Run) -> None:
    result = run_cli("validate", CAMPAIGN, cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout

    result = run_cli("plan", CAMPAIGN, cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Plan for rappel-vaccination-grippe" in result.stdout
    assert "SMS:" in result.stdout and "parts" in result.stdout

    result = run_cli("preview", CAMPAIGN, "--sample", "5", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "GSM-7" in result.stdout or "UCS-2" in result.stdout
    assert "part(s)" in result.stdout


def test_json_goes_before_or_after_the_command(project: Path, run_cli: Run) -> None:
    after = run_cli("plan", CAMPAIGN, "--json", cwd=project)
    before = run_cli("--json", "plan", CAMPAIGN, cwd=project)
    assert after.returncode == before.returncode == 0
    a, b = json.loads(after.stdout), json.loads(before.stdout)
    for d in (a, b):  # timings and moments counted from now differ between the two runs
        for key in ("elapsed_s", "start", "done_by"):
            d.pop(key)
        for provider in d["providers"]:
            provider.pop("starts_at"), provider.pop("done_by")
    assert a["processes"] == 1  # a 300-row file is too small to split
    assert a == b
    assert a["campaign"] == "rappel-vaccination-grippe"
    assert a["audience"]["rows"] == 300
    channels = {c["channel"]: c for c in a["channels"]}
    assert set(channels) == {"push", "sms", "email"}
    # Counts add up: each channel's statuses cover every recipient.
    for c in channels.values():
        assert c["send"] + c["fallback"] + c["skipped"] + c["invalid"] == a["recipients"]
    assert a["recipients"] + a["filtered_out"] == 300


def test_config_option_after_the_command(project: Path, run_cli: Run, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    result = run_cli("plan", project / CAMPAIGN, "--config", project / "smartpush.yaml", "--json", cwd=other)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["recipients"] > 0


def test_preview_masks_addresses_unless_asked(project: Path, run_cli: Run) -> None:
    masked = json.loads(run_cli("preview", CAMPAIGN, "--json", "--sample", "10", cwd=project).stdout)
    full = json.loads(
        run_cli("preview", CAMPAIGN, "--json", "--sample", "10", "--show-addresses", cwd=project).stdout
    )
    masked_to = [c["to"] for r in masked["recipients"] for c in r["channels"] if c["to"]]
    full_to = [c["to"] for r in full["recipients"] for c in r["channels"] if c["to"]]
    assert len(masked_to) == len(full_to) > 0
    assert all(m != f for m, f in zip(masked_to, full_to, strict=True))
    assert any(t.startswith("+33") and len(t) == 12 for t in full_to)


def test_preview_one_recipient(project: Path, run_cli: Run) -> None:
    first_id = (project / "data/assures.csv").read_text().splitlines()[1].split(";")[0]
    result = run_cli("preview", CAMPAIGN, "--recipient", first_id, "--json", cwd=project)
    assert result.returncode == 0
    (recipient,) = json.loads(result.stdout)["recipients"]
    assert recipient["recipient_id"] == first_id and recipient["line"] == 2
    missing = run_cli("preview", CAMPAIGN, "--recipient", "nobody", cwd=project)
    assert missing.returncode == 1
    assert "not found" in missing.stderr


def test_bad_rows_are_listed_with_lines_and_exit_1(project: Path, run_cli: Run) -> None:
    data = project / "data/assures.csv"
    lines = data.read_text(encoding="utf-8").splitlines()
    cells = lines[1].split(";")
    cells[3], cells[4] = "70", "06 12"  # aged 70 with a truncated phone
    lines[1] = ";".join(cells)
    lines.append("9999999999;Trop;De;Cellules;70;x;y;z;w")
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for command in ("validate", "plan"):
        result = run_cli(command, CAMPAIGN, "--json", cwd=project)
        assert result.returncode == 1, command
        report = json.loads(result.stdout)
        assert report["ok"] is False
        lines_reported = {e["line"] for e in report["invalid_rows"]} | {
            e["line"] for e in report["invalid_messages"]
        }
        assert {2, len(lines)} <= lines_reported
    human = run_cli("validate", CAMPAIGN, cwd=project)
    assert "data/assures.csv:2: sms:" in human.stdout
    assert "06 12" not in human.stdout  # the bad value itself is never echoed


def test_campaign_errors_name_file_and_line(project: Path, run_cli: Run) -> None:
    path = project / CAMPAIGN
    path.write_text(path.read_text().replace("priority: normal", "priority: normal\ncolour: blue"))
    result = run_cli("validate", CAMPAIGN, cwd=project)
    assert result.returncode == 1
    assert f"{CAMPAIGN}:" in result.stderr and "unknown field 'colour'" in result.stderr
    as_json = json.loads(run_cli("validate", CAMPAIGN, "--json", cwd=project).stdout)
    assert as_json["ok"] is False
    assert as_json["problems"][0]["field"] == "colour"
    assert as_json["problems"][0]["line"] > 1


def test_missing_environment_variable(project: Path, run_cli: Run) -> None:
    cfg = project / "smartpush.yaml"
    cfg.write_text(cfg.read_text().replace("sender: AMELI", "sender: ${SMS_SENDER}"))
    result = run_cli("plan", CAMPAIGN, cwd=project, env={"SMS_SENDER": ""})
    assert result.returncode == 1  # set but empty: an invalid sender
    result = run_cli("plan", CAMPAIGN, cwd=project)
    assert "SMS_SENDER" in result.stderr and "smartpush.yaml:" in result.stderr
    ok = run_cli("plan", CAMPAIGN, cwd=project, env={"SMS_SENDER": "CPAM75"})
    assert ok.returncode == 0, ok.stderr


def test_wrong_encoding_names_the_line(project: Path, run_cli: Run) -> None:
    data = project / "data/assures.csv"
    raw = data.read_bytes().splitlines(keepends=True)
    raw[150] = raw[150].replace(b"2026", "2026 Hélène".encode("cp1252"))
    data.write_bytes(b"".join(raw))
    path = project / CAMPAIGN
    path.write_text(path.read_text().replace("  id: numero_assure", "  id: numero_assure\n  encoding: utf-8"))
    result = run_cli("plan", CAMPAIGN, cwd=project)
    assert result.returncode == 1
    assert "data/assures.csv:151" in result.stderr
    assert "encoding" in result.stderr


def test_french_export_in_cp1252_is_detected(project: Path, run_cli: Run) -> None:
    data = project / "data/assures.csv"
    data.write_bytes(data.read_text(encoding="utf-8").encode("cp1252", errors="replace"))
    result = run_cli("plan", CAMPAIGN, "--json", cwd=project)
    assert json.loads(result.stdout)["audience"]["encoding"] == "cp1252"


def test_several_campaigns_at_once(project: Path, run_cli: Run) -> None:
    broken = project / "campaigns" / "broken.yaml"
    broken.write_text(
        (project / CAMPAIGN).read_text().replace("name: rappel-vaccination-grippe", "name: Cassé")
    )
    result = run_cli("plan", CAMPAIGN, "campaigns/broken.yaml", "--json", cwd=project)
    assert result.returncode == 1  # the worst of the two
    good, bad = json.loads(result.stdout)
    assert good["ok"] is True and good["campaign"] == "rappel-vaccination-grippe"
    assert bad["ok"] is False and bad["problems"][0]["field"] == "name"
    human = run_cli("validate", CAMPAIGN, "campaigns/broken.yaml", cwd=project)
    assert "is valid" in human.stdout and "broken.yaml:2:7: name:" in human.stderr
