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


def test_a_measured_command_s_peak_memory_is_its_own_not_the_harness_s() -> None:
    """Linux gives a child's peak RSS as at least what its parent held when it forked: a harness that
    holds 300 MB must still report about 60 MB for a command that uses 50."""
    import pytest

    if not Path("/usr/bin/time").exists():
        pytest.skip("GNU time (/usr/bin/time) is not installed: peak RSS includes the harness's")
    harness = (
        "import sys\n"
        "from pathlib import Path\n"
        "from bench.harness import run_measured\n"
        "held = bytearray(300 << 20)\n"
        "held[::4096] = b'\\1' * len(held[::4096])\n"
        "script = \"x = bytearray(50 << 20); x[::4096] = b'\\\\1' * len(x[::4096]); print('{}')\"\n"
        "done = run_measured([sys.executable, '-c', script], Path('.'))\n"
        "print(done.code, done.json(), round(done.peak_rss_mib))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", harness], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    code, answer, peak = done.stdout.split(" ", 2)
    assert (code, answer) == ("0", "{}")
    assert 50 <= int(peak) < 150, done.stdout
