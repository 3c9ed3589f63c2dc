"""The layout rules of ARCHITECTURE.md, checked on the source tree."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import smartpush.errors

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every absolute module a file imports (relative imports resolved against smartpush.*)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "smartpush").rglob("*.py")), ids=lambda p: p.name)
def test_core_never_imports_cli_or_providers(path: Path) -> None:
    bad = [
        (line, mod)
        for line, mod in imports_of(path)
        if mod.startswith(("smartpush.cli", "smartpush.providers", "cli", "providers"))
    ]
    assert not bad, f"{path.name} imports {bad}: the core finds drivers through entry points only"


@pytest.mark.parametrize("path", sorted((ROOT / "providers").rglob("*.py")), ids=lambda p: p.name)
def test_providers_never_import_the_cli(path: Path) -> None:
    bad = [(line, mod) for line, mod in imports_of(path) if mod.startswith(("smartpush.cli", "cli"))]
    assert not bad


def test_the_scan_would_catch_a_bad_import(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("def f():\n    from smartpush.providers import outbox\n")
    assert (2, "smartpush.providers") in imports_of(sample)


def test_help_imports_nothing_heavy() -> None:
    code = (
        "import sys\n"
        "from smartpush.cli import main\n"
        "try:\n    main.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = {'pydantic', 'jinja2', 'rich', 'phonenumbers', 'babel', 'yaml', 'email_validator'}\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_every_error_is_a_smartpush_error_with_a_docstring() -> None:
    classes = [
        c
        for _, c in inspect.getmembers(smartpush.errors, inspect.isclass)
        if issubclass(c, Exception) and c.__module__ == "smartpush.errors"
    ]
    assert len(classes) >= 5
    for cls in classes:
        assert issubclass(cls, smartpush.errors.SmartpushError), cls
        assert cls.__doc__, cls


def test_outbox_is_registered_by_entry_point() -> None:
    from smartpush import registry

    assert "outbox" in registry.available()
    assert registry.driver("outbox").__module__ == "smartpush.providers.outbox"
