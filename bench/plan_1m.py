"""Benchmark: `smartpush plan` over a generated audience, against what a user would otherwise write.

    .venv/bin/python bench/plan_1m.py [--rows 1000000] [--out bench/results/plan.md]

It makes a project with `smartpush init`, writes an audience of N rows (bench/gen_audience.py, 0.1 %
invalid rows), then runs in separate processes, measuring wall time and peak RSS of each:

- ``smartpush plan`` on the example campaign (``where: age >= 65``: ~42 % of rows go on to the channels);
- the same campaign without ``where`` (every row normalised and rendered);
- baseline ``csv.reader``: only reading the file (the floor for any tool);
- baseline ``naive script``: csv.DictReader + phonenumbers + email_validator + jinja2 render per row, the
  loop a developer would write by hand for the same checks (no dedup, no part counting).

Prints a Markdown table; ratios are smartpush / baseline in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent

CSV_ONLY = """
import csv, sys
n = 0
with open(sys.argv[1], encoding="utf-8", newline="") as f:
    for row in csv.reader(f, delimiter=";"):
        n += 1
print(n)
"""

NAIVE = """
import csv, sys
import phonenumbers, email_validator, jinja2
env = jinja2.Environment(undefined=jinja2.StrictUndefined)
sms = env.from_string(
    "Assurance Maladie : {{ prenom }}, votre vaccin contre la grippe est pris en charge à 100 % "
    "jusqu'au {{ date_limite }}. Parlez-en à votre pharmacien ou médecin."
)
ok = bad = 0
with open(sys.argv[1], encoding="utf-8", newline="") as f:
    for row in csv.DictReader(f, delimiter=";"):
        try:
            if row["phone"]:
                p = phonenumbers.parse(row["phone"], "FR")
                if not phonenumbers.is_valid_number(p):
                    raise ValueError
                phonenumbers.format_number(p, phonenumbers.PhoneNumberFormat.E164)
            if row["email"]:
                email_validator.validate_email(row["email"], check_deliverability=False)
            sms.render(**row)
            ok += 1
        except Exception:
            bad += 1
print(ok, bad)
"""


def make_project(project: Path, rows: int) -> tuple[Path, Path, Path]:
    """`smartpush init` into ``project`` with an audience of ``rows`` (0.1 % invalid): the example
    campaign, the same campaign without ``where`` (every row), and the audience file."""
    subprocess.run([BIN / "smartpush", "init", project], check=True, stdout=subprocess.DEVNULL)
    audience = project / "data" / "assures.csv"
    try:
        from bench.gen_audience import write_audience
    except ImportError:  # run as a script: bench/ is on sys.path
        from gen_audience import write_audience  # type: ignore[no-redef]

    write_audience(audience, rows, invalid=0.001)
    campaign = project / "campaigns" / "rappel-vaccination-grippe.yaml"
    everyone = campaign.with_name("everyone.yaml")
    everyone.write_text(
        campaign.read_text(encoding="utf-8").replace("  where:", "  # where:"), encoding="utf-8"
    )
    return campaign, everyone, audience


def measure(cmd: list[str], cwd: Path) -> tuple[float, int, int]:
    """Wall seconds, peak RSS in MiB and exit code of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    return wall, usage.ru_maxrss // 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "p"
        campaign, everyone, audience = make_project(project, args.rows)

        runs = {
            "smartpush plan (where: age >= 65)": [str(BIN / "smartpush"), "plan", str(campaign), "--json"],
            "smartpush plan (every row)": [str(BIN / "smartpush"), "plan", str(everyone), "--json"],
            "smartpush plan (every row, 1 process)": [
                str(BIN / "smartpush"),
                "plan",
                str(everyone),
                "--json",
                "--processes",
                "1",
            ],
            "baseline: csv.reader only": [sys.executable, "-c", CSV_ONLY, str(audience)],
            "baseline: naive script": [sys.executable, "-c", NAIVE, str(audience)],
        }
        results = {name: measure(cmd, project) for name, cmd in runs.items()}

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    lines = [
        (
            f"### plan over {args.rows:,} rows — {dt.date.today()} — {os.cpu_count()} cores, {cpu}, "
            f"Python {platform.python_version()}"
        ),
        "",
        "| run | wall s | rows/s | peak RSS MiB | exit |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, (wall, rss, code) in results.items():
        lines.append(f"| {name} | {wall:.1f} | {args.rows / wall:,.0f} | {rss} | {code} |")
    naive = results["baseline: naive script"][0]
    floor = results["baseline: csv.reader only"][0]
    for name in list(results)[:3]:
        wall = results[name][0]
        lines.append("")
        lines.append(
            f"- {name}: {naive / wall:.2f}× the naive script's speed, {wall / floor:.1f}× the time of "
            "reading the file alone"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as f:
            f.write(table + "\n\n")


if __name__ == "__main__":
    main()
