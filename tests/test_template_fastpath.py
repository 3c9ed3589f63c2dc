"""Templates of only text and ``{{ name }}`` render without Jinja's context, byte for byte as Jinja does.

The reference is :meth:`CompiledTemplate._render_jinja`, the full Jinja render the fast path falls back
to: every output must be its output, and every error its error.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import ChainMap
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from jinja2 import StrictUndefined, Undefined
from jinja2.utils import missing
from markupsafe import Markup

from smartpush.errors import TemplateError
from smartpush.templating import MAX_TEXT, PROVIDED_NAMES, CompiledTemplate, Templates

SMS = "Bonjour {{ first_name }}, votre rendez-vous est le {{ date }}."


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fastpath")
    (path / "templates").mkdir()
    return path


@pytest.fixture(scope="module")
def templates(project: Path) -> Templates:
    return Templates(project)


_files = itertools.count()


def compile_both(templates: Templates, source: str, *, html: bool, as_file: bool = False) -> CompiledTemplate:
    if as_file:  # a new name each time: a name already compiled is served from Jinja's cache
        name = f"t{next(_files)}.j2"
        (templates.templates_dir / name).write_text(source, encoding="utf-8")
        source = f"templates/{name}"
    return templates.compile(source, field="channels[0].body", html=html)


def outcome(render: Callable[[Mapping[str, Any]], str], context: Mapping[str, Any]) -> tuple[Any, ...]:
    try:
        text = render(context)
    except Exception as exc:  # the type and the message are what is compared
        return ("raised", type(exc), str(exc), getattr(exc, "problems", None))
    return ("rendered", type(text), text)


def note(what: str) -> None:
    if currently_in_test_context():  # --hypothesis-show-statistics counts them
        event(what)


def assert_same_as_jinja(compiled: CompiledTemplate, context: Mapping[str, Any]) -> None:
    reference = outcome(compiled._render_jinja, context)
    assert outcome(compiled.render, context) == reference
    if compiled._plain is not None:
        fast = compiled._plain.render(context, compiled._globals)
        if fast is None:
            note("fell back to Jinja")
        else:
            note("fast path")
            assert reference == ("rendered", str, fast)


# -- the property: any plain template, any row ------------------------------------------------------

NAMES = [
    "first_name",
    "date",
    "x",
    "_",
    "prénom",
    *sorted(PROVIDED_NAMES),
    "range",  # Jinja globals
    "dict",
    "cycler",
    "self",  # special or constant names: never looked up in the row
    "loop",
    "super",
    "caller",
    "varargs",
    "true",
    "none",
    "None",
]
IDENTIFIERS = st.sampled_from(NAMES) | st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
TEXT = st.text(st.characters(blacklist_characters="{", blacklist_categories=("Cs",)), max_size=12) | (
    st.sampled_from(["\n", " \n  ", "\n\n", "\r\n", "\r", "<>&\"'", "é à € 😀", "\t", "}}", " %} #}"])
)
OUTPUT_FORMS = ["{{ %s }}", "{{%s}}", "{{- %s -}}", "{{- %s }}", "{{ %s -}}", "{{  %s\n}}"]
RAW = st.sampled_from(["{{ x }}", "{% if x %}", "{#", "a\n"]).map(lambda s: f"{{% raw %}}{s}{{% endraw %}}")
COMMENT = st.sampled_from(["{# note #}", "{#- trim -#}", "{# {{ x }} #}\n"])


@st.composite
def plain_templates(draw: st.DrawFn) -> tuple[str, list[str]]:
    """(source, names it outputs): text, raw blocks and comments around 0 to 5 ``{{ name }}``."""
    names = draw(st.lists(IDENTIFIERS, max_size=5))
    pieces: list[str] = []
    for name in [*names, None]:
        pieces.extend(draw(st.lists(TEXT | RAW | COMMENT, max_size=3)))
        if name is not None:
            pieces.append(draw(st.sampled_from(OUTPUT_FORMS)) % name)
    return "".join(pieces), names


SCALARS = (
    st.text(max_size=20)
    | st.sampled_from(["<b>Dupont & fils</b>", '"l\'été"', ""])
    | st.integers()
    | st.floats()
    | st.none()
    | st.booleans()
    | st.builds(Markup, st.text(max_size=10))
    | st.decimals()
    | st.datetimes()
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def rows(draw: st.DrawFn, names: list[str]) -> dict[str, Any]:
    """Values for most of ``names`` (some left missing), plus a few other columns."""
    row = draw(st.dictionaries(IDENTIFIERS, VALUES, max_size=3))
    for name in names:
        if draw(st.integers(0, 5)):  # one name in six is missing
            row[name] = draw(VALUES)
        else:
            row.pop(name, None)
    return row


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=plain_templates(), html=st.booleans(), as_file=st.booleans(), data=st.data())
def test_plain_templates_render_as_jinja_does(
    templates: Templates, template: tuple[str, list[str]], html: bool, as_file: bool, data: st.DataObject
) -> None:
    source, names = template
    try:
        compiled = compile_both(templates, source, html=html, as_file=as_file)
    except TemplateError:  # {{ if }}, {{ not }}: a name the grammar refuses
        note("syntax error")
        return
    note("plain" if compiled._plain is not None else "not plain")
    assert_same_as_jinja(compiled, data.draw(rows(names)))


# -- which templates take the fast path -------------------------------------------------------------


@pytest.mark.parametrize("html", [False, True])
def test_a_typical_sms_body_takes_the_fast_path(templates: Templates, html: bool) -> None:
    compiled = compile_both(templates, SMS, html=html)
    assert compiled._plain is not None
    assert compiled._plain.first == "Bonjour "
    assert compiled._plain.outputs == (("first_name", ", votre rendez-vous est le "), ("date", "."))
    row = {"first_name": "Zoé", "date": "12/03", "age": 70, **{n: "p" for n in PROVIDED_NAMES}}
    assert compiled._plain.render(row, compiled._globals) == "Bonjour Zoé, votre rendez-vous est le 12/03."
    assert compiled.render(row) == "Bonjour Zoé, votre rendez-vous est le 12/03."


def test_a_template_file_takes_the_fast_path_and_keeps_the_lexers_text(templates: Templates) -> None:
    source = "Bonjour {{- first_name -}} ,\r\n{# note #}{% raw %}{{ x }}{% endraw %} {{ date }}\n\n"
    compiled = compile_both(templates, source, html=False, as_file=True)
    assert compiled._plain is not None
    assert compiled._plain.first == "Bonjour"
    assert compiled._plain.outputs == (("first_name", ",\n{{ x }} "), ("date", "\n"))
    assert compiled.render({"first_name": "Zoé", "date": None}) == "BonjourZoé,\n{{ x }} \n"
    assert_same_as_jinja(compiled, {"first_name": "Zoé", "date": None})


def test_a_file_changed_after_jinja_cached_it_renders_what_jinja_cached(templates: Templates) -> None:
    path = templates.templates_dir / "cached.j2"
    path.write_text("v1 {{ x }}", encoding="utf-8")
    first = templates.compile("templates/cached.j2", field="body")
    path.write_text("v2 {{ y }}", encoding="utf-8")  # not reloaded: the campaign uses what it compiled
    again = templates.compile("templates/cached.j2", field="body")
    assert first._plain is not None
    assert again._plain is None  # the text read again is not what Jinja compiled
    assert again.render({"x": 1, "y": 2}) == first.render({"x": 1, "y": 2}) == "v1 1"


@pytest.mark.parametrize(
    ("source", "row", "expected"),
    [
        ("{{ x|upper }}", {"x": "a"}, "A"),
        ("{% if x %}oui{% endif %}", {"x": 1}, "oui"),
        ("{% for i in x %}{{ i }}{% endfor %}", {"x": [1, 2]}, "12"),
        ("{{ x.nom }}", {"x": {"nom": "Dupont"}}, "Dupont"),
        ("{{ x['nom'] }}", {"x": {"nom": "Dupont"}}, "Dupont"),
        ("{{ 'a' }}{{ x }}", {"x": "b"}, "ab"),
        ("{{ x ~ '!' }}", {"x": "b"}, "b!"),
        ("{{ true }}", {}, "True"),
        ("{% set y = x %}{{ y }}", {"x": "b"}, "b"),
        ("{% macro m() %}m{% endmacro %}{{ m() }}", {}, "m"),
        ("{% block b %}{{ x }}{% endblock %}", {"x": "b"}, "b"),
        ("{{ self.b() }}{% block b %}{{ x }}{% endblock %}", {"x": "b"}, "bb"),
        ("{{ x() }}", {"x": lambda: "appel"}, "appel"),
        ("{% autoescape false %}{{ x }}{% endautoescape %}", {"x": "<"}, "<"),
    ],
)
def test_other_templates_are_rendered_by_jinja(
    templates: Templates, source: str, row: dict[str, Any], expected: str
) -> None:
    compiled = compile_both(templates, source, html=False)
    assert compiled._plain is None
    assert compiled.render(row) == expected


def test_self_is_the_template_not_a_column(templates: Templates) -> None:
    compiled = compile_both(templates, "{{ self }}", html=False)
    assert compiled._plain is None
    assert compiled.render({"self": "colonne"}).startswith("<TemplateReference")


# -- values and rows the fast path leaves to Jinja -----------------------------------------------------


class Shouting:
    def __str__(self) -> str:
        return "FORT"


class Text(str):
    def __str__(self) -> str:
        return "autre"


@pytest.mark.parametrize("html", [False, True])
@pytest.mark.parametrize(
    "value",
    [
        Undefined(),
        StrictUndefined(),
        Undefined(name="x"),
        missing,
        Shouting(),
        Text("texte"),
        Markup("<b>gras</b>"),
        "<b>gras</b>",
        b"octets",
        dt.date(2024, 3, 12),
        Decimal("1.50"),
        float("nan"),
        -0.0,
        [None, Markup("<i>"), {"a": "<"}],
        len,
        range,
    ],
    ids=repr,
)
def test_any_value_renders_as_jinja_renders_it(templates: Templates, html: bool, value: object) -> None:
    compiled = compile_both(templates, "<{{ x }}>", html=html)
    assert compiled._plain is not None
    assert_same_as_jinja(compiled, {"x": value})


@pytest.mark.parametrize("html", [False, True])
def test_globals_and_rows_of_other_kinds_render_as_jinja_renders_them(
    templates: Templates, html: bool
) -> None:
    compiled = compile_both(templates, "{{ range }} {{ x }}", html=html)
    for row in (
        {"x": 1},  # range is the Jinja global: a class, left to Jinja
        {"x": 1, "range": "colonne"},  # a column named like a global wins
        ChainMap({"x": 1}, {"range": "r"}),  # not a dict: left to Jinja
        {"range": "r"},  # x missing
        {"range": "r", "x": missing},
    ):
        assert_same_as_jinja(compiled, row)
    assert compiled._plain is not None
    assert compiled._plain.render({"x": 1, "range": "colonne"}, compiled._globals) == "colonne 1"


def test_a_missing_variable_is_jinjas_error_with_its_line(templates: Templates) -> None:
    compiled = compile_both(templates, "Bonjour\n{{ prenom }}", html=False, as_file=True)
    assert compiled._plain is not None
    with pytest.raises(TemplateError) as exc:
        compiled.render({"nom": "Dupont"})
    (problem,) = exc.value.problems
    assert "uses the variable 'prenom', which the audience has no column for" in problem.message
    assert problem.line == 2
    assert_same_as_jinja(compiled, {"nom": "Dupont"})


@pytest.mark.parametrize("html", [False, True])
def test_an_output_longer_than_max_text_is_the_same_error(templates: Templates, html: bool) -> None:
    compiled = compile_both(templates, "{{ a }}{{ b }}.", html=html)
    assert compiled._plain is not None
    half = "x" * (MAX_TEXT // 2)
    assert compiled.render({"a": half, "b": half[1:]}) == half + half[1:] + "."  # exactly MAX_TEXT
    too_long = {"a": half, "b": half}
    assert compiled._plain.render(too_long, compiled._globals) is None
    with pytest.raises(TemplateError) as exc:
        compiled.render(too_long)
    assert "longer than 1,000,000 characters" in str(exc.value)
    assert_same_as_jinja(compiled, too_long)


def test_a_value_str_cannot_show_is_jinjas_error(templates: Templates) -> None:
    nested: list[Any] = []
    for _ in range(100_000):
        nested = [nested]
    compiled = compile_both(templates, "{{ x }}", html=False)
    assert compiled._plain is not None
    assert compiled._plain.render({"x": nested}, compiled._globals) is None
    assert_same_as_jinja(compiled, {"x": nested})
