from pathlib import Path

import pytest

from smartpush.errors import ConfigError
from smartpush.yamlfile import dotted, load, load_text


def test_locations_of_nested_values() -> None:
    data, locs = load_text("a: 1\nlist:\n  - name: x\n    when: 2026-12-01\n", "f.yaml")
    assert data == {"a": 1, "list": [{"name": "x", "when": "2026-12-01"}]}  # dates stay text
    assert locs.find(("list", 0, "when")) == (4, 11)
    assert locs.find(("list", 0, "when"), key=True) == (4, 5)
    assert locs.find(("list", 0, "missing")) == (3, 5)  # nearest ancestor


def test_syntax_error_names_file_and_line() -> None:
    with pytest.raises(ConfigError) as exc:
        load_text("name: x\nchannels:\n  - channel: sms\n   body: [unclosed\n", "c.yaml")
    (problem,) = exc.value.problems
    assert problem.file == "c.yaml"
    assert problem.line is not None and problem.line >= 3
    assert "YAML syntax error" in problem.message


def test_tabs_get_a_hint() -> None:
    with pytest.raises(ConfigError, match="tabs"):
        load_text("a:\n\tb: 1\n", "c.yaml")


def test_duplicate_key_is_an_error() -> None:
    with pytest.raises(ConfigError) as exc:
        load_text("name: a\nname: b\n", "c.yaml")
    assert exc.value.problems[0].line == 2
    assert "twice" in exc.value.problems[0].message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"file not found: .*nope\.yaml"):
        load(tmp_path / "nope.yaml")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"name: a\ndescription: caf\xe9\n")
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert exc.value.problems[0].line == 2


def test_dotted() -> None:
    assert dotted(("channels", 1, "provider", 0)) == "channels[1].provider[0]"
