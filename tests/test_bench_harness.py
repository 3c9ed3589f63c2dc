"""``python -m bench --scale tiny --scenarios sms``: the harness runs end to end and counts what it sends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from servers import needs_services

ROOT = Path(__file__).resolve().parent.parent


@needs_services(10)
def test_tiny_sms_run_prints_its_row_and_the_sink_got_every_message() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--scale", "tiny", "--scenarios", "sms"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| sms ")]
    assert len(rows) == 1, done.stdout
    assert rows[0][1].strip() == "500"
    assert "- sms: ledger {'sms:sent': 500}, sinks received 500" in done.stdout
    peers = [line for line in done.stdout.splitlines() if line.startswith("| peer: aiohttp loop")]
    assert peers and "| 500 |" in peers[0]
