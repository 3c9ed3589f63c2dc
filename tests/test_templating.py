"""Templates: compile once, render per row, sandboxed and confined to the project's templates/ folder."""

from __future__ import annotations

import datetime as dt
import os
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartpush.errors import TemplateError
from smartpush.filters import Filters, french_title
from smartpush.templating import PROVIDED_NAMES, Templates, check_variables

NNBSP = "\u202f"  # Babel's fr_FR thousands separator
NBSP = "\u00a0"  # Babel's fr_FR space before € and %


def write(project: Path, name: str, text: str) -> Path:
    path = project / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "templates").mkdir()
    return tmp_path


@pytest.fixture
def templates(project: Path) -> Templates:
    return Templates(project)


def render(templates: Templates, source: str, **row: object) -> str:
    return templates.compile(source, field="channels[0].body").render(row)


def problem_of(exc: pytest.ExceptionInfo[TemplateError]) -> tuple[str, str | None, int | None, str | None]:
    (problem,) = exc.value.problems
    return problem.message, problem.file, problem.line, problem.field


# -- compiling and rendering -----------------------------------------------------------------------


def test_inline_and_file_templates_render(project: Path, templates: Templates) -> None:
    source = "Bonjour {{ prenom }},\n{% if age|int >= 65 %}venez{% endif %}\n"
    write(project, "templates/grippe/sms.txt.j2", source)
    file = templates.compile("templates/grippe/sms.txt.j2", field="channels[1].body")
    inline = templates.compile("{{ prenom }}, votre invitation", field="channels[2].subject")
    row = {"prenom": "Jean", "age": "70"}
    assert file.origin == "templates/grippe/sms.txt.j2"
    assert file.render(row) == "Bonjour Jean,\nvenez"  # trim_blocks, no trailing newline kept
    assert inline.origin == "channels[2].subject (inline)"
    assert inline.render(row) == "Jean, votre invitation"
    assert file.variables == {"prenom", "age"}


def test_compiled_once_file_changes_do_not_matter(project: Path, templates: Templates) -> None:
    path = write(project, "templates/a.j2", "v1 {{ x }}")
    compiled = templates.compile("templates/a.j2", field="body")
    path.write_text("v2 {{ x }}", encoding="utf-8")
    assert compiled.render({"x": 1}) == "v1 1"


def test_none_renders_as_empty_text(templates: Templates) -> None:
    assert render(templates, "Bonjour {{ prenom }}!", prenom=None) == "Bonjour !"


def test_html_is_autoescaped_and_text_is_not(templates: Templates) -> None:
    row = {"nom": "<b>Dupont & fils</b>"}
    html = templates.compile("<p>{{ nom }}</p>", field="channels[0].html", html=True)
    text = templates.compile("{{ nom }}", field="channels[0].text")
    assert html.render(row) == "<p>&lt;b&gt;Dupont &amp; fils&lt;/b&gt;</p>"
    assert text.render(row) == "<b>Dupont & fils</b>"


def test_undefined_variable_at_render_names_variable_and_origin(project: Path, templates: Templates) -> None:
    write(project, "templates/sms.txt.j2", "Bonjour {{ prenom }}")
    compiled = templates.compile("templates/sms.txt.j2", field="channels[0].body")
    with pytest.raises(TemplateError) as exc:
        compiled.render({"nom": "Dupont"})
    message, file, line, _ = problem_of(exc)
    assert "'prenom'" in message
    assert "templates/sms.txt.j2" in message
    assert "Dupont" not in message
    assert (file, line) == ("templates/sms.txt.j2", 1)


def test_syntax_error_in_file_names_file_and_line(project: Path, templates: Templates) -> None:
    write(project, "templates/email.html.j2", "<p>Bonjour</p>\n\n{% if prenom %}\n{{ prenom }\n")
    with pytest.raises(TemplateError) as exc:
        templates.compile(
            "templates/email.html.j2", field="channels[2].html", html=True, campaign_file="c.yaml", line=30
        )
    message, file, line, _ = problem_of(exc)
    assert file == "templates/email.html.j2"
    assert line == 4
    assert "syntax error" in message
    assert "unexpected '}'" in message


def test_syntax_error_in_included_file_names_that_file(project: Path, templates: Templates) -> None:
    write(project, "templates/main.j2", "{% include 'commun/pied.j2' %}")
    write(project, "templates/commun/pied.j2", "ok\n{% for %}")
    with pytest.raises(TemplateError) as exc:
        templates.compile("templates/main.j2", field="channels[0].body")
    message, file, line, _ = problem_of(exc)
    assert (file, line) == ("templates/commun/pied.j2", 2)
    assert "included by templates/main.j2" in message


def test_syntax_error_inline_names_campaign_file_line_and_field(templates: Templates) -> None:
    with pytest.raises(TemplateError) as exc:
        templates.compile(
            "{{ prenom }, votre invitation",
            field="channels[2].subject",
            campaign_file="campaigns/g.yaml",
            line=27,
        )
    message, file, line, field = problem_of(exc)
    assert (file, line, field) == ("campaigns/g.yaml", 27, "channels[2].subject")
    assert "syntax error" in message
    assert "unexpected '}'" in message


def test_unknown_filter_is_a_compile_error(templates: Templates) -> None:
    with pytest.raises(TemplateError) as exc:
        templates.compile("{{ x | nope }}", field="channels[0].body", campaign_file="c.yaml", line=3)
    assert "nope" in problem_of(exc)[0]


def test_missing_template_file(templates: Templates) -> None:
    with pytest.raises(TemplateError) as exc:
        templates.compile("templates/x.j2", field="channels[0].body", campaign_file="c.yaml", line=9)
    assert problem_of(exc) == ("template file templates/x.j2 not found", "c.yaml", 9, "channels[0].body")


# -- confinement -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["templates/../secret.j2", "../secret.j2", "secret.j2", "data/x.j2", "templates/a/../../secret.j2"],
)
def test_paths_leaving_templates_are_refused(project: Path, templates: Templates, value: str) -> None:
    write(project, "secret.j2", "secret")
    write(project, "data/x.j2", "secret")
    with pytest.raises(TemplateError) as exc:
        templates.compile(value, field="channels[0].body", campaign_file="c.yaml", line=4)
    message, file, line, field = problem_of(exc)
    assert (file, line, field) == ("c.yaml", 4, "channels[0].body")
    assert "templates/ folder" in message


def test_absolute_path_is_refused(project: Path, templates: Templates) -> None:
    inside = write(project, "templates/ok.j2", "ok")
    with pytest.raises(TemplateError, match="templates/ folder"):
        templates.compile(str(inside), field="channels[0].body")


def test_symlink_pointing_outside_is_refused(project: Path, templates: Templates) -> None:
    outside = write(project, "data/secret.j2", "secret")
    os.symlink(outside, project / "templates" / "link.j2")
    os.symlink(project / "data", project / "templates" / "dir")
    for value in ("templates/link.j2", "templates/dir/secret.j2"):
        with pytest.raises(TemplateError, match="templates/ folder"):
            templates.compile(value, field="channels[0].body")


def test_symlink_inside_templates_is_allowed(project: Path, templates: Templates) -> None:
    target = write(project, "templates/real.j2", "réel")
    os.symlink(target, project / "templates" / "alias.j2")
    assert templates.compile("templates/alias.j2", field="body").render({}) == "réel"


@pytest.mark.parametrize(
    "tag",
    [
        "{% include '../x.j2' %}",
        "{% extends '../x.j2' %}",
        "{% import '../x.j2' as x %}",
        "{% from '../x.j2' import y %}",
        "{% include 'link.j2' %}",
    ],
)
def test_include_outside_templates_is_refused(project: Path, templates: Templates, tag: str) -> None:
    outside = write(project, "x.j2", "secret")
    os.symlink(outside, project / "templates" / "link.j2")
    write(project, "templates/main.j2", "Bonjour\n" + tag)
    with pytest.raises(TemplateError) as exc:
        templates.compile("templates/main.j2", field="channels[0].body")
    message, file, line, _ = problem_of(exc)
    assert (file, line) == ("templates/main.j2", 2)
    assert "outside the templates/ folder" in message


def test_dynamic_include_outside_templates_is_refused_at_render(project: Path, templates: Templates) -> None:
    write(project, "x.j2", "secret")
    compiled = templates.compile("{% include nom_du_fichier %}", field="channels[0].body")
    with pytest.raises(TemplateError, match="outside the templates/ folder"):
        compiled.render({"nom_du_fichier": "../x.j2"})


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ prenom.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ self._TemplateReference__context }}",
    ],
)
def test_sandbox_escape_is_refused(templates: Templates, source: str) -> None:
    compiled = templates.compile(source, field="channels[0].body", campaign_file="c.yaml", line=5)
    with pytest.raises(TemplateError) as exc:
        compiled.render({"prenom": "Jean"})
    message, file, line, field = problem_of(exc)
    assert "Python internals" in message
    assert (file, line, field) == ("c.yaml", 5, "channels[0].body")


def test_templates_cannot_open_files(templates: Templates) -> None:
    compiled = templates.compile("{{ open('/etc/passwd').read() }}", field="channels[0].body")
    with pytest.raises(TemplateError, match="'open'"):
        compiled.render({})


# -- variables -------------------------------------------------------------------------------------


def test_variables_follow_includes_extends_and_imports(project: Path, templates: Templates) -> None:
    base = "{{ organisme }}\n{% block corps %}{% endblock %}\n{% include 'pied.j2' %}"
    write(project, "templates/base.j2", base)
    write(project, "templates/pied.j2", "{{ signature }}{% include 'pied.j2' if false else 'vide.j2' %}")
    write(project, "templates/vide.j2", "{{ lien }}")
    write(project, "templates/macros.j2", "{% macro salut(nom) %}{{ civilite }} {{ nom }}{% endmacro %}")
    write(
        project,
        "templates/sms.j2",
        "{% extends 'base.j2' %}{% import 'macros.j2' as m with context %}"
        "{% block corps %}{% set x = 1 %}{{ m.salut(prenom) }} {{ x }} {{ unsubscribe_url }}{% endblock %}",
    )
    compiled = templates.compile("templates/sms.j2", field="channels[0].body")
    assert compiled.variables == {"organisme", "signature", "lien", "civilite", "prenom", "unsubscribe_url"}
    row = {"organisme": "CPAM", "signature": "-- S", "lien": "", "civilite": "M.", "prenom": "Jean"}
    # trim_blocks eats the newline after a tag
    assert compiled.render({**row, "unsubscribe_url": "u"}) == "CPAM\nM. Jean 1 u-- S"


def test_check_variables_reports_missing_columns(project: Path, templates: Templates) -> None:
    write(project, "templates/sms.txt.j2", "Bonjour\n\n{{ prenom }} {{ nom }}\n{{ prenom }}")
    compiled = templates.compile("templates/sms.txt.j2", field="channels[1].body")
    (problem,) = check_variables(compiled, ["prénom", "nom", "phone"])
    assert problem.message == (
        "template templates/sms.txt.j2 uses {{ prenom }}, but the audience has no column 'prenom' "
        "(did you mean 'prénom'?); columns are: prénom, nom, phone"
    )
    assert (problem.file, problem.line) == ("templates/sms.txt.j2", 3)


def test_check_variables_points_inline_templates_at_the_campaign(templates: Templates) -> None:
    compiled = templates.compile(
        "{{ Prenom }}, {{ zzz }}", field="channels[2].subject", campaign_file="campaigns/g.yaml", line=31
    )
    problems = check_variables(compiled, ["prenom"])
    expected = ("campaigns/g.yaml", 31, "channels[2].subject")
    assert [(p.file, p.line, p.field) for p in problems] == [expected, expected]
    assert "did you mean 'prenom'?" in problems[0].message
    assert "did you mean" not in problems[1].message


def test_check_variables_points_at_the_included_file(project: Path, templates: Templates) -> None:
    write(project, "templates/pied.j2", "\n{{ signatur }}")
    compiled = templates.compile("{% include 'pied.j2' %}", field="channels[0].body", campaign_file="c.yaml")
    (problem,) = check_variables(compiled, ["signature"])
    assert (problem.file, problem.line, problem.field) == ("templates/pied.j2", 2, None)


def test_provided_names_and_extra_are_not_reported(templates: Templates) -> None:
    source = " ".join(f"{{{{ {name} }}}}" for name in sorted(PROVIDED_NAMES))
    source += " {{ lien }} {{ range(2)|list }}"
    compiled = templates.compile(source, field="channels[0].body")
    assert compiled.variables >= PROVIDED_NAMES
    assert "range" not in compiled.variables
    assert check_variables(compiled, ["prenom"], extra=["lien"]) == []
    assert {"campaign", "unsubscribe_url", "recipient_id", "now"} == PROVIDED_NAMES


# -- where expressions -----------------------------------------------------------------------------


def test_where_expression(templates: Templates) -> None:
    where = templates.expression("age|int >= 65", field="audience.where", campaign_file="c.yaml", line=8)
    assert where.variables == {"age"}
    assert where({"age": "70"}) is True
    assert where({"age": "64"}) is False
    assert where({"age": 65}) is True
    region = templates.expression('region == "IDF" and age|int >= 65', field="audience.where")
    assert region({"region": "IDF", "age": "80"}) is True
    assert region({"region": "PACA", "age": "80"}) is False
    assert check_variables(region, ["age", "regions"])[0].message.startswith("expression audience.where")


def test_where_expression_errors(templates: Templates) -> None:
    with pytest.raises(TemplateError) as exc:
        templates.expression("age >=", field="audience.where", campaign_file="c.yaml", line=8)
    message, file, line, field = problem_of(exc)
    assert (file, line, field) == ("c.yaml", 8, "audience.where")
    assert "syntax error" in message
    where = templates.expression("age >= 65", field="audience.where", campaign_file="c.yaml", line=8)
    with pytest.raises(TemplateError, match=r"\|int"):  # CSV text compared with a number: say how to fix it
        where({"age": "70"})
    with pytest.raises(TemplateError, match="'age'"):
        where({})
    bare = templates.expression("age", field="audience.where")
    with pytest.raises(TemplateError, match="'age'"):
        bare({})


# -- filters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "row", "expected"),
    [
        ("{{ d | date }}", {"d": "2026-12-01"}, "1 décembre 2026"),
        ("{{ d | date }}", {"d": "01/12/2026"}, "1 décembre 2026"),
        ("{{ d | date }}", {"d": dt.date(2026, 12, 1)}, "1 décembre 2026"),
        ("{{ d | date('short') }}", {"d": "2026-12-01T09:00"}, "01/12/2026"),
        ("{{ d | date('full') }}", {"d": dt.datetime(2026, 12, 1, 9)}, "mardi 1 décembre 2026"),
        ("{{ d | date('d MMMM') }}", {"d": "1/12/2026"}, "1 décembre"),
        ("{{ d | date }}", {"d": "2026-11-30T23:30:00-02:00"}, "1 décembre 2026"),  # in Europe/Paris
        ("{{ d | datetime(\"d MMMM 'à' HH'h'mm\") }}", {"d": "2026-12-01T08:00Z"}, "1 décembre à 09h00"),
        ("{{ d | datetime('short') }}", {"d": "01/12/2026 09:30"}, "01/12/2026 09:30"),
        ("{{ d | datetime('short') }}", {"d": dt.datetime(2026, 7, 1, 9, 30)}, "01/07/2026 09:30"),
        ("{{ d | datetime }}", {"d": "2026-12-01T09:00:00+01:00"}, "1 décembre 2026, 09:00:00 +0100"),
        (
            "{{ d | datetime('short') }}",
            {"d": dt.datetime(2026, 7, 1, 7, 30, tzinfo=ZoneInfo("UTC"))},
            "01/07/2026 09:30",
        ),
        ("{{ d | time }}", {"d": "09:30"}, "09:30"),
        ("{{ d | time }}", {"d": "2026-12-01T08:15:00Z"}, "09:15"),
        ("{{ d | time }}", {"d": dt.time(9, 5)}, "09:05"),
        ("{{ d | time('HH:mm:ss') }}", {"d": dt.datetime(2026, 12, 1, 9, 5, 7)}, "09:05:07"),
        ("{{ n | number }}", {"n": "1234.5"}, f"1{NNBSP}234,5"),
        ("{{ n | number }}", {"n": "1 234,5"}, f"1{NNBSP}234,5"),
        ("{{ n | number }}", {"n": 1234.5}, f"1{NNBSP}234,5"),
        ("{{ n | number(2) }}", {"n": Decimal("0.125")}, "0,13"),
        ("{{ n | number(0) }}", {"n": "-2500"}, f"-2{NNBSP}500"),
        ("{{ n | currency }}", {"n": "12.5"}, f"12,50{NBSP}€"),
        ("{{ n | currency }}", {"n": 12.5}, f"12,50{NBSP}€"),
        ("{{ n | currency }}", {"n": "1234,567"}, f"1{NNBSP}234,57{NBSP}€"),
        ("{{ n | percent }}", {"n": 0.25}, f"25{NBSP}%"),
        ("{{ n | percent(1) }}", {"n": "0,125"}, f"12,5{NBSP}%"),
        ("{{ n | percent }}", {"n": "25 %"}, f"25{NBSP}%"),
        ("{{ n | title }}", {"n": "jean-pierre de la fontaine"}, "Jean-Pierre de la Fontaine"),
        ("{{ n | title }}", {"n": "MARIE-ÉLISE D'ARC"}, "Marie-Élise d'Arc"),
        ("{{ n | title }}", {"n": "  yann   LE GALL "}, "Yann Le Gall"),
        ("{{ n | title }}", {"n": "d’artagnan de l’isle"}, "D'Artagnan de l'Isle"),
        ("{{ n | first_name('Madame, Monsieur') }}", {"n": " JEAN-PIERRE "}, "Jean-Pierre"),
        ("{{ n | first_name('Madame, Monsieur') }}", {"n": ""}, "Madame, Monsieur"),
        ("{{ n | first_name('Madame, Monsieur') }}", {"n": None}, "Madame, Monsieur"),
        ("{{ n | first_name }}", {"n": "   "}, ""),
    ],
)
def test_filters(templates: Templates, source: str, row: dict[str, object], expected: str) -> None:
    assert render(templates, source, **row) == expected


def test_filters_work_in_the_html_environment(templates: Templates) -> None:
    compiled = templates.compile("{{ n | currency }} {{ d | date }}", field="html", html=True)
    assert compiled.render({"n": 3, "d": "2026-12-01"}) == f"3,00{NBSP}€ 1 décembre 2026"


@pytest.mark.parametrize(
    ("source", "bad", "expected"),
    [
        ("{{ v | date }}", "31/02/2026", "the date filter"),
        ("{{ v | date }}", "2026-13-45", "the date filter"),
        ("{{ v | date }}", "demain 06 12 34 56 78", "the date filter"),
        ("{{ v | date }}", 20261201, "type int"),
        ("{{ v | date('qqqqqqqqq') }}", "2026-12-01", "not a valid date/time pattern"),
        ("{{ v | datetime }}", "jean@exemple.fr", "the datetime filter"),
        ("{{ v | time }}", "25:99", "the time filter"),
        ("{{ v | time }}", "2026-12-01", "without a time"),
        ("{{ v | number }}", "06 12 34 56 78 x", "the number filter"),
        ("{{ v | number }}", "1.234,5", "the number filter"),
        ("{{ v | number }}", "NaN", "finite"),
        ("{{ v | number(-1) }}", "5", "decimals"),
        ("{{ v | currency }}", "douze euros", "the currency filter"),
        ("{{ v | currency('euro') }}", "12", "3-letter"),
        ("{{ v | percent }}", True, "true/false"),
    ],
)
def test_bad_filter_input_is_a_template_error_without_the_value(
    templates: Templates, source: str, bad: object, expected: str
) -> None:
    source = "Bonjour\n" + source
    compiled = templates.compile(source, field="channels[0].body", campaign_file="c.yaml", line=7)
    with pytest.raises(TemplateError) as exc:
        compiled.render({"v": bad})
    message, file, line, field = problem_of(exc)
    assert expected in message
    assert "line 2" in message
    assert (file, line, field) == ("c.yaml", 7, "channels[0].body")
    assert str(bad) not in str(exc.value)
    assert exc.value.__cause__ is None
    assert exc.value.__suppress_context__


def test_other_filter_failures_do_not_show_the_value(project: Path, templates: Templates) -> None:
    write(project, "templates/t.j2", "a\nb\n{{ v | round }}")
    compiled = templates.compile("templates/t.j2", field="channels[0].body")
    with pytest.raises(TemplateError) as exc:
        compiled.render({"v": "jean.dupont@exemple.fr"})
    message, file, line, _ = problem_of(exc)
    assert (file, line) == ("templates/t.j2", 3)
    assert "exemple" not in message
    failing = templates.compile("{{ (v | int) // 0 }}", field="channels[0].body")
    with pytest.raises(TemplateError, match="ZeroDivisionError"):
        failing.render({"v": "7"})


def test_bad_locale_or_timezone_is_a_config_error(project: Path) -> None:
    with pytest.raises(Exception, match="timezone"):
        Templates(project, timezone="Mars/Olympus")
    with pytest.raises(Exception, match="locale"):
        Templates(project, locale="xx_YY_ZZ")


FRENCH_LETTERS = "abcdefghijklmnopqrstuvwxyzàâäçéèêëîïôöùûüÿœæ"


@given(st.text(alphabet=FRENCH_LETTERS + FRENCH_LETTERS.upper() + " \t-'’", max_size=40))
def test_title_is_idempotent_and_stripped(name: str) -> None:
    once = french_title(name)
    assert french_title(once) == once
    assert once == once.strip()


@given(st.decimals(min_value=-(10**12), max_value=10**12, places=3, allow_nan=False, allow_infinity=False))
def test_number_output_reads_back(value: Decimal) -> None:
    filters = Filters()
    shown = filters.number(value)
    assert Decimal(shown.replace(NNBSP, "").replace(",", ".")) == value
    assert filters.number(shown, 3) == filters.number(value, 3)


def test_variables_set_in_templates_are_not_columns(project: Path, templates: Templates) -> None:
    write(project, "templates/pied.j2", "{{ signature }} {{ titre }}")
    source = (
        "{% set prenom = prenom | first_name %}{% set titre = 'M.' %}{% from 'macros.j2' import f %}"
        "{{ prenom }}{% include 'pied.j2' %}"
    )
    write(project, "templates/macros.j2", "{% macro f() %}{% endmacro %}")
    compiled = templates.compile(source, field="channels[0].body")
    assert compiled.variables == {"prenom", "signature"}
    assert compiled.render({"prenom": "JEAN", "signature": "S"}) == "JeanS M."


def test_missing_attribute_or_element_does_not_show_the_row(templates: Templates) -> None:
    compiled = templates.compile("{{ campaign.nom }}", field="channels[0].body")
    with pytest.raises(TemplateError, match="uses 'nom', which"):
        compiled.render({"campaign": {"name": "grippe"}})
    lookup = templates.compile("{{ tarifs[code] }}", field="channels[0].body")
    with pytest.raises(TemplateError) as exc:
        lookup.render({"tarifs": {}, "code": "75011"})
    assert "75011" not in str(exc.value)
