"""Hostile templates: the sandbox refuses Python internals and files outside ``templates/``, and a
render is bounded in time and memory (SPEC.md "Personal data and security", "Commands": a template
that tries to leave the sandbox is an invalid campaign, exit 1).

The bounded-render cases run in one child process with an address-space limit and a deadline: a
template that loops for hours or allocates gigabytes fails the test instead of hanging or killing
the machine. Each case must end in a :class:`~smartpush.errors.TemplateError` with a clear message,
quickly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartpush.errors import TemplateError
from smartpush.templating import MAX_STEPS, MAX_TEXT, Templates

#: The real templates folder of a project also holds this file: no template may read it.
SECRET = "contenu-secret-hors-templates"

ESCAPES = [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.mro() }}",
    "{{ prenom.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{{ range.__self__ }}",
    "{{ prenom.upper.__globals__ }}",
    "{{ prenom.func_globals }}",
    "{{ (prenom|attr('__class__')) }}",
    "{{ prenom['__class__'] }}",
    "{% set x = namespace() %}{{ x.__class__.__init__.__globals__ }}",
    "{{ dict.__subclasses__() }}",
    "{% for c in ''.__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
]
#: Names that are neither columns nor Jinja globals in smartpush: `validate` refuses them.
UNKNOWN_NAMES = ["{{ config }}", "{{ config.items() }}", "{{ lipsum() }}", "{{ request }}", "{{ os }}"]
FILES = [
    "{% include '/etc/passwd' %}",
    "{% include '../secret.txt' %}",
    "{% include 'a/../../secret.txt' %}",
    "{% import '/etc/passwd' as p %}",
    "{% from '../secret.txt' import x %}",
    "{% extends '../secret.txt' %}",
    "{% include 'C:/Windows/win.ini' %}",
    "{% include '..\\\\secret.txt' %}",
]
DYNAMIC_FILES = ["../secret.txt", "/etc/passwd", "a/../../secret.txt", "%2e%2e/secret.txt", "lien/x"]


@pytest.fixture
def templates(tmp_path: Path) -> Templates:
    (tmp_path / "templates" / "a").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text(SECRET, encoding="utf-8")
    (tmp_path / "templates" / "lien").symlink_to(tmp_path)  # a link leading out of templates/
    return Templates(tmp_path)


def outcome(templates: Templates, source: str, **row: str) -> str:
    """What a template gives: its output, or the message of the TemplateError it raises (compiled
    or rendered): never another exception."""
    try:
        compiled = templates.compile(source, field="channels[0].body", campaign_file="c.yaml", line=3)
        return compiled.render({"prenom": "Jeanne", **row})
    except TemplateError as exc:
        return "refused: " + str(exc)


@pytest.mark.parametrize("source", ESCAPES)
def test_python_internals_are_out_of_reach(templates: Templates, source: str) -> None:
    said = outcome(templates, source)
    assert said.startswith("refused: ")
    assert "Python internals" in said or "has no column" in said or "does not have" in said
    assert "<class" not in said and "function" not in said and "Jeanne" not in said


@pytest.mark.parametrize("source", UNKNOWN_NAMES)
def test_flask_and_debug_globals_do_not_exist(templates: Templates, source: str) -> None:
    compiled = templates.compile(source, field="channels[0].body")
    assert compiled.variables - {"prenom"}  # validate reports "the audience has no column ..."


@pytest.mark.parametrize("source", FILES)
def test_files_outside_templates_are_refused_when_compiled(templates: Templates, source: str) -> None:
    with pytest.raises(TemplateError) as exc:
        templates.compile(source, field="channels[0].body", campaign_file="c.yaml", line=3)
    assert SECRET not in str(exc.value) and "root:" not in str(exc.value)


@pytest.mark.parametrize("name", DYNAMIC_FILES)
def test_files_outside_templates_are_refused_when_named_by_the_row(templates: Templates, name: str) -> None:
    said = outcome(templates, "{% include fichier %}", fichier=name)
    assert said.startswith("refused: ")
    assert SECRET not in said and "root:" not in said


def test_a_template_file_path_cannot_leave_templates(templates: Templates) -> None:
    for path in ("templates/../secret.j2", "/etc/passwd.j2", "templates/lien/secret.j2", "../x.j2"):
        with pytest.raises(TemplateError, match=r"inside the project's templates/ folder|not found"):
            templates.compile(path, field="channels[0].body")


# -- bounded renders, in a child process with a memory limit and a deadline ------------------------------

#: source → what the refusal must say. Each one, unbounded, would take minutes or gigabytes.
COSTLY = {
    "{{ range(10**9)|length }}": "range",
    "{{ 'x' * 10**9 }}": "longer than",
    "{{ [0] * 10**9 }}": "longer than",
    "{{ ('x' * 10**5) * 10**5 }}": "longer than",
    "{{ 2 ** (10**9) }}": "bits",
    "{{ 'x'.center(10**9) }}": "longer than",
    "{{ 'x'|center(10**9) }}": "longer than",
    "{{ 'x'|indent(10**9, true) }}": "longer than",
    "{{ '%999999999s'|format('x') }}": "longer than",
    "{{ '%*s'|format(10**9, 'x') }}": "longer than",
    "{{ '%999999999s' % 'x' }}": "longer than",
    "{{ '{:>999999999}'.format('x') }}": "longer than",
    "{{ '{:>{}}'.format('x', 10**9) }}": "longer than",
    "{{ [1]|batch(10**9, 0)|list|length }}": "longer than",
    "{{ [1]|slice(10**9)|list|length }}": "longer than",
    "{{ ('x' * 1000)|replace('x', 'y' * 10000) }}": "longer than",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": "too much work",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(9) %}"
    "{{ k }}{% endfor %}{% endfor %}{% endfor %}": "too much work",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}": "calls itself",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
    "{{ f(64) }}": "too much work",
    "{% macro d(s) %}{{ d(s ~ s) }}{% endmacro %}{{ d('x') }}": "longer than",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
    "{{ ns.s }}": "longer than",
    "{% set b = 'x' * 900000 %}{% for i in range(2000) %}{{ b }}{% endfor %}": "longer than",
    "{% macro m() %}{% set b = 'x' * 900000 %}{% for i in range(9) %}{{ b }}{% endfor %}{% endmacro %}"
    "{{ m()|length }}": "longer than",
    "{% for x in [[1]] recursive %}{{ loop([x * 2]) }}{% endfor %}": "longer than",
    "{% for x in ['x'] recursive %}{{ loop([x ~ x]) }}{% endfor %}": "longer than",
    "{{ '(' * 3 }}" + "{% if 1 %}" * 400 + "x" + "{% endif %}" * 400: "nested too deeply",
    "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}": "nested too deeply",
    "{{ " + "1 + " * 3000 + "1 }}": "nested too deeply",
    "{{ prenom" + "|e" * 3000 + " }}": "nested too deeply",
    "{% for i in [1] %}" * 25 + "x" + "{% endfor %}" * 25: "nested too deeply",
}

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    from smartpush.errors import TemplateError
    from smartpush.templating import Templates
    templates = Templates(Path(sys.argv[1]))
    for source in json.loads(sys.stdin.read()):
        print(json.dumps({"started": source}), flush=True)
        began = time.monotonic()
        try:
            out = templates.compile(source, field="body").render({"prenom": "Jeanne"})
            said = {"rendered": len(out)}
        except TemplateError as exc:
            said = {"refused": str(exc)}
        except BaseException as exc:
            said = {"crashed": type(exc).__name__}
        print(json.dumps({"source": source, "seconds": time.monotonic() - began, **said}), flush=True)
    """
)


def run_child(project: Path, sources: list[str], timeout: float) -> list[dict[str, object]]:
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(project)],
            input=json.dumps(sources),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        out = done.stdout
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        last = [json.loads(line) for line in partial.splitlines() if line.startswith("{")][-1:]
        raise AssertionError(f"a render ran past {timeout} s: {last}") from None
    assert done.returncode == 0, f"the child died ({done.returncode}): {done.stderr[-2000:]}"
    return [r for r in map(json.loads, out.splitlines()) if "source" in r]


def test_costly_templates_are_refused_within_bounds(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    results = run_child(tmp_path, list(COSTLY), timeout=60)
    assert [r["source"] for r in results] == list(COSTLY)  # every case finished, none killed the child
    for result in results:
        source = str(result["source"])
        assert "refused" in result, f"{source[:80]!r} was not refused: {result}"
        assert COSTLY[source] in str(result["refused"]), result
        assert float(str(result["seconds"])) < 5, result  # the bound is reached fast, not after minutes


def test_the_bounds_leave_room_for_real_messages(templates: Templates) -> None:
    """What a real campaign does still works: a 100-item loop, a few hundred KB of HTML, big amounts."""
    source = (
        "{% for r in rdv %}{{ loop.index }}/{{ loop.length }} {{ r }}\n{% endfor %}"
        "{{ '%d €'|format(1500000) }} {{ '{:,}'.format(123456789) }} {{ 'x' * 300000 }}"
        "{% for i in range(1000) %}{% for j in range(50) %}{% endfor %}{% endfor %}"
    )
    out = templates.compile(source, field="html").render({"rdv": [f"rdv{i}" for i in range(100)]})
    assert "100/100 rdv99" in out and "1500000 €" in out and "123,456,789" in out
    assert len(out) > 300000
    assert MAX_STEPS > 50_000 and MAX_TEXT >= 1_000_000


# -- random template sources ---------------------------------------------------------------------------

JINJA_BITS = st.sampled_from(
    [
        "{{ ",
        " }}",
        "{% ",
        " %}",
        "{# ",
        " #}",
        "for x in ",
        "endfor",
        "if ",
        "endif",
        "macro m(a)",
        "endmacro",
        "include ",
        "extends ",
        "import ",
        "set ",
        "prenom",
        "'../x'",
        "__class__",
        ".",
        "|",
        "(",
        ")",
        "[",
        "]",
        "*",
        "**",
        "~",
        "range(",
        "9",
        "10**9",
        "'x'",
        "\x00",
        "\ud800",
        "é",
    ]
)
SOURCES = st.one_of(st.text(max_size=200), st.lists(JINJA_BITS, max_size=40).map("".join))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=SOURCES)
def test_any_source_compiles_and_renders_or_gives_a_template_error(templates: Templates, source: str) -> None:
    said = outcome(templates, source)  # anything but a TemplateError fails the test
    assert SECRET not in said


# -- through the command: `validate` refuses the campaign, exit 1 ----------------------------------------


def test_validate_refuses_a_campaign_whose_templates_leave_the_sandbox(
    project: Path, run_cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    campaign = project / "campaigns" / "hostile.yaml"
    campaign.write_text(
        textwrap.dedent(
            """\
            name: hostile
            category: service
            audience: {source: data/assures.csv, id: numero_assure}
            strategy: all
            channels:
              - channel: sms
                provider: outbox
                body: "{{ prenom.__class__.__mro__[1].__subclasses__() }}"
              - channel: email
                provider: outbox
                from: "Mairie <ne-pas-repondre@mairie.example>"
                subject: "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                text: "{% include '../smartpush.yaml' %}"
            """
        ),
        encoding="utf-8",
    )
    done = run_cli("validate", campaign, cwd=project, timeout=120)
    shown = " ".join((done.stdout + done.stderr).split())  # the terminal wraps long lines
    assert done.returncode == 1, shown[-3000:]
    assert "Traceback" not in shown
    assert "outside the templates/ folder" in shown
    # the include is refused when compiling; fixed, the other two are refused on every row
    campaign.write_text(
        campaign.read_text(encoding="utf-8").replace("{% include '../smartpush.yaml' %}", "Bonjour"),
        encoding="utf-8",
    )
    done = run_cli("validate", campaign, cwd=project, timeout=120)
    shown = " ".join((done.stdout + done.stderr).split())  # the terminal wraps long lines
    assert done.returncode == 1, shown[-3000:]
    assert "Traceback" not in shown
    assert "Python internals" in shown and "too much work" in shown
