from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def smartpush_exe() -> str:
    exe = BIN / "smartpush"
    if exe.exists():
        return str(exe)
    found = shutil.which("smartpush")
    assert found, "the smartpush command is not installed (pip install -e .)"
    return found


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real `smartpush` command; returns the completed process (never raises on exit codes)."""

    def run(
        *args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
        return subprocess.run(
            [smartpush_exe(), *map(str, args)],
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    return run


@pytest.fixture
def project(tmp_path: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]) -> Path:
    """A fresh `smartpush init` project."""
    result = run_cli("init", tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    return tmp_path / "demo"
