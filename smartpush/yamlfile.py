"""YAML files that remember where each value was written.

:func:`load` returns the plain data and a :class:`Locations` map from a path such as
``("channels", 1, "provider")`` to the line and column where it sits, so a validation error can
point the user at the exact spot in their file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, Problem

__all__ = ["MAX_FILE_BYTES", "MAX_VALUES", "Locations", "load", "load_text"]

PathPart = str | int

#: The largest YAML file read: a campaign or a config is a few KB; a file of this size is a mistake
#: (a data file given as a campaign) and would be read whole into memory.
MAX_FILE_BYTES = 4 << 20
#: Keys, values and list items of one document, each use of an ``&anchor`` counted again: a file with
#: more is refused before it is expanded (nine nested anchors of nine items each make 387 million).
MAX_VALUES = 100_000


@dataclass
class Locations:
    """Where each key and value of a loaded YAML document was written (1-based lines and columns)."""

    file: str
    marks: dict[tuple[PathPart, ...], tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[tuple[PathPart, ...], tuple[int, int]] = field(default_factory=dict)

    def find(self, path: Sequence[PathPart], *, key: bool = False) -> tuple[int | None, int | None]:
        """The line and column of ``path``, or of its nearest ancestor that exists in the file.

        With ``key=True`` the position of the mapping key is preferred (for "unknown field" errors).
        """
        parts = tuple(path)
        if key and parts in self.key_marks:
            return self.key_marks[parts]
        while parts:
            if parts in self.marks:
                return self.marks[parts]
            parts = parts[:-1]
        return self.marks.get((), (None, None))

    def problem(self, message: str, path: Sequence[PathPart], *, key: bool = False) -> Problem:
        line, column = self.find(path, key=key)
        return Problem(message, file=self.file, line=line, column=column, field=dotted(path) or None)


def dotted(path: Sequence[PathPart]) -> str:
    """``("channels", 1, "provider")`` as the user reads it: ``channels[1].provider``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _Loader(yaml.SafeLoader):
    """SafeLoader whose timestamps stay strings: pydantic parses dates with the user's field in mind."""


# Keep `2026-12-01` and `09:00` as written; the models decide what they mean.
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


class _Budget:
    """How many more values :func:`_walk` may expand."""

    def __init__(self) -> None:
        self.left = MAX_VALUES


def _walk(
    node: yaml.Node, loader: _Loader, path: tuple[PathPart, ...], locs: Locations, budget: _Budget
) -> Any:
    budget.left -= 1
    if budget.left < 0:
        raise ConfigError(
            Problem(
                f"the file holds more than {MAX_VALUES:,} values (each use of an &anchor counts again); "
                "a campaign or a config needs a few hundred",
                file=locs.file,
                line=node.start_mark.line + 1,
                column=node.start_mark.column + 1,
            )
        )
    locs.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        loader.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = _scalar(key_node, loader, locs)
            if not isinstance(key, str | int | float | bool) or key is None:
                raise ConfigError(
                    Problem(
                        "a key must be plain text",
                        file=locs.file,
                        line=key_node.start_mark.line + 1,
                        column=key_node.start_mark.column + 1,
                    )
                )
            key = str(key) if not isinstance(key, str) else key
            child = (*path, key)
            if key in out:
                raise ConfigError(
                    Problem(
                        f"the key '{key}' is written twice in the same block; keep one",
                        file=locs.file,
                        line=key_node.start_mark.line + 1,
                        column=key_node.start_mark.column + 1,
                        field=dotted(child),
                    )
                )
            locs.key_marks[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _walk(value_node, loader, child, locs, budget)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, loader, (*path, i), locs, budget) for i, item in enumerate(node.value)]
    return _scalar(node, loader, locs)


def _scalar(node: yaml.Node, loader: _Loader, locs: Locations) -> Any:
    """The value of a node; a value its tag cannot read (``!!int 0xzz``, a 5,000-digit number,
    ``!!timestamp 2026-13-45``) is a :class:`ConfigError` at its line, not a traceback."""
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError:
        raise
    except Exception:  # PyYAML's constructors let ValueError, IndexError ("!!int ''") and others out
        raise ConfigError(
            Problem(
                f"this value cannot be read as {node.tag.rpartition(':')[2] or 'YAML'}",
                file=locs.file,
                line=node.start_mark.line + 1,
                column=node.start_mark.column + 1,
            )
        ) from None


def load_text(text: str, display_name: str) -> tuple[Any, Locations]:
    """Parse ``text``; YAML syntax errors become a :class:`ConfigError` with the line and column."""
    locs = Locations(display_name)
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # refuses control characters (a ReaderError) before anything is parsed
        node = loader.get_single_node()
        if node is None:
            return None, locs
        return _walk(node, loader, (), locs, _Budget()), locs
    except RecursionError:
        raise ConfigError(
            Problem("the file is nested too deeply (brackets or indented blocks)", file=display_name)
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or "this is not valid YAML"
        hint = ""
        if "\t" in text and ("tab" in str(exc).lower() or "'\\t'" in str(exc)):
            hint = " (YAML does not allow tabs for indentation: use spaces)"
        raise ConfigError(
            Problem(
                f"YAML syntax error: {what}{hint}",
                file=display_name,
                line=mark.line + 1 if mark else None,
                column=mark.column + 1 if mark else None,
            )
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(Problem(f"YAML error: {exc}", file=display_name)) from None
    finally:
        if loader is not None:
            loader.dispose()


def load(path: Path, display_name: str | None = None) -> tuple[Any, Locations]:
    """Read and parse a YAML file; a missing or unreadable file is a :class:`ConfigError`."""
    name = display_name or str(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(
                Problem(f"the file is larger than {MAX_FILE_BYTES >> 20} MiB: is it really YAML?", file=name)
            )
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(Problem(f"file not found: {name}", file=name)) from None
    except IsADirectoryError:
        raise ConfigError(Problem(f"{name} is a folder, not a YAML file", file=name)) from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            Problem("the file is not UTF-8 text; save it as UTF-8", file=name, line=line)
        ) from None
    except (OSError, ValueError) as exc:  # no permission, a name too long, a NUL in the name
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a usable file name"
        raise ConfigError(Problem(f"{name} cannot be read ({why})", file=name)) from None
    return load_text(text, name)
