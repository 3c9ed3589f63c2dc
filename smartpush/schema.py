"""Turning pydantic's validation errors into problems a communications officer can act on.

Each problem names the file, the line and column (from :mod:`smartpush.yamlfile`), the field as a
dotted path, and says what to write instead, with a "did you mean" for misspelt keys.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Sequence
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from .errors import Problem
from .yamlfile import Locations, PathPart

__all__ = ["did_you_mean", "problems_from"]


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'subject'?)`` when a choice is close to ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _literal_values(model: type[BaseModel]) -> dict[str, set[Any]]:
    out: dict[str, set[Any]] = {}
    for name, f in model.model_fields.items():
        tp = f.annotation
        if get_origin(tp) is not None and str(get_origin(tp)) == "typing.Literal":
            out[f.alias or name] = set(get_args(tp))
    return out


def _strip(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _type_at(tp: Any, part: PathPart, data: Any) -> Any:
    """The annotation of ``part`` inside a value of annotation ``tp`` holding ``data``."""
    tp = _resolve_union(_strip(tp), data)
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, f in tp.model_fields.items():
            if part in (name, f.alias):
                return f.annotation
        return None
    if origin in (list, tuple, Sequence) and isinstance(part, int):
        return get_args(tp)[0] if get_args(tp) else None
    if origin is dict:
        return get_args(tp)[1] if get_args(tp) else None
    return None


def _resolve_union(tp: Any, data: Any) -> Any:
    if get_origin(tp) not in (Union, types.UnionType):
        return tp
    members = [_strip(a) for a in get_args(tp) if a is not type(None)]
    models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
    if isinstance(data, dict):
        for m in models:
            literals = _literal_values(m)
            if literals and all(data.get(k) in v for k, v in literals.items() if k in data):
                return m
    return members[0] if len(members) == 1 else (models[0] if len(models) == 1 else tp)


def _clean_loc(loc: Sequence[PathPart], data: Any) -> tuple[PathPart, ...]:
    """Drop the tags pydantic inserts for unions (``channels.1.sms.body`` → ``channels.1.body``)."""
    out: list[PathPart] = []
    cur = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(cur, dict):
            if part in cur:
                out.append(part)
                cur = cur[part]
                continue
            if not last and isinstance(part, str) and part in {str(v) for v in cur.values()}:
                continue  # a discriminator tag, e.g. the value of `channel:`
            if not last and isinstance(part, str) and ("[" in part or part in ("str", "int", "list")):
                continue  # a union member name
            out.append(part)
            cur = None
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            out.append(part)
            cur = cur[part]
        elif isinstance(part, str) and not last and ("[" in part or "function-" in part):
            continue
        else:
            out.append(part)
            cur = None
    return tuple(out)


def _value_at(data: Any, path: Sequence[PathPart]) -> Any:
    cur = data
    for part in path:
        in_dict = isinstance(cur, dict) and part in cur
        in_list = isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur)
        if in_dict or in_list:
            cur = cur[part]
        else:
            return None
    return cur


def _allowed_keys(model: type[BaseModel], path: Sequence[PathPart], data: Any) -> list[str] | None:
    tp: Any = model
    cur = data
    for part in path:
        tp = _type_at(tp, part, cur)
        if tp is None:
            return None
        cur = _value_at(cur, [part])
    tp = _resolve_union(_strip(tp), cur)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return _field_names(tp)
    return None


def _message(err: ErrorDetails, path: tuple[PathPart, ...], allowed: list[str] | None) -> str:
    kind = err["type"]
    msg = err["msg"]
    if kind == "missing":
        return f"the required field '{path[-1]}' is missing"
    if kind == "extra_forbidden":
        key = str(path[-1])
        hint = did_you_mean(key, allowed or [])
        listing = f"; allowed here: {', '.join(sorted(allowed))}" if allowed else ""
        return f"unknown field '{key}'{hint}{listing}"
    if kind in ("literal_error", "enum"):
        expected = err.get("ctx", {}).get("expected", "")
        hint = ""
        if isinstance(err["input"], str):
            choices = [c.strip(" '") for c in expected.replace(" or ", ",").split(",")]
            hint = did_you_mean(err["input"], choices)
        return f"'{err['input']}' is not allowed{hint}; write one of: {expected}"
    if kind in ("value_error", "assertion_error"):
        return msg.split(", ", 1)[1] if ", " in msg else msg
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "this must be a block of 'key: value' lines"
    if kind == "list_type":
        return "this must be a list (lines starting with '- ')"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"'{err['input']}' is not a whole number"
    if kind in ("string_type",):
        return "this must be text"
    if kind in ("bool_parsing", "bool_type"):
        return f"'{err['input']}' is not true or false"
    return msg[0].lower() + msg[1:] if msg else kind


def problems_from(
    exc: ValidationError,
    locations: Locations,
    model: type[BaseModel],
    data: Any,
    prefix: tuple[PathPart, ...] = (),
) -> list[Problem]:
    """One :class:`Problem` per pydantic error, located in the YAML file; sorted by line."""
    problems: list[Problem] = []
    for err in exc.errors():
        path = _clean_loc(err["loc"], data)
        allowed = None
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, path[:-1], data)
        full = (*prefix, *path)
        problems.append(
            locations.problem(_message(err, path, allowed), full, key=err["type"] == "extra_forbidden")
        )
    return sorted(problems, key=lambda p: (p.line or 0, p.column or 0))
