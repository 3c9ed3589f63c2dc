"""Campaign templates: compile once, render per row, in a Jinja sandbox confined to ``templates/``.

A channel field (``body``, ``subject``, ``title``, ``html``, ``text``) whose value ends in ``.j2`` is a
template file, given relative to the project folder (``templates/grippe/sms.txt.j2``); anything else is
an inline template. The audience ``where:`` option is a Jinja expression (:meth:`Templates.expression`).

Inside templates, ``{% include %}``, ``{% extends %}`` and ``{% import %}`` name files relative to the
``templates/`` folder (``{% include 'commun/signature.txt.j2' %}``), never outside it.

Rendering never shows a recipient's values in an error: messages name the template, its line and the
variable or filter at fault. A ``None`` value (a JSON ``null``) renders as an empty string, not ``None``.
The names in :data:`PROVIDED_NAMES` are not columns: the caller puts them in the render context.
"""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import os
import re
import unicodedata
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from decimal import Decimal
from pathlib import Path, PurePosixPath
from types import CodeType
from typing import Any

from jinja2 import BaseLoader, Environment, StrictUndefined, Template, TemplateNotFound, nodes
from jinja2 import TemplateSyntaxError as JinjaSyntaxError
from jinja2.environment import TemplateExpression
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.meta import find_undeclared_variables
from jinja2.parser import Parser
from jinja2.runtime import Context, Undefined, new_context
from jinja2.sandbox import MAX_RANGE, SandboxedEnvironment
from markupsafe import Markup, escape

from smartpush.errors import Problem, TemplateError
from smartpush.filters import Filters

__all__ = ["PROVIDED_NAMES", "CompiledExpression", "CompiledTemplate", "Templates", "check_variables"]

#: Names every template may use without an audience column; the caller passes them in the context:
#: ``campaign`` (dict: name, description, category), ``unsubscribe_url``, ``recipient_id``, ``now``.
PROVIDED_NAMES: frozenset[str] = frozenset({"campaign", "unsubscribe_url", "recipient_id", "now"})

TEMPLATES_FOLDER = "templates"
_UNDEFINED_NAME = re.compile(r"'([^']+)' is undefined")
_MAX_LISTED_COLUMNS = 30
_MIN_PATH_PARTS = 2  # "templates/x.j2"
_EXAMPLE = f"{TEMPLATES_FOLDER}/campagne/sms.txt.j2"
Location = tuple[str | None, int | None]


class _RefusedPath(Exception):
    """A template name that would leave the templates folder (never a TemplateNotFound: not ignorable)."""


def _finalize(value: Any) -> Any:
    return "" if value is None else value


# -- limits: a template gets a bounded amount of work and memory per message ---------------------------

#: Loop turns plus calls (macros, methods, ``loop()``) one render may make: a real message makes a few
#: hundred; nested loops over ``range()`` or a macro that calls itself twice would make billions.
MAX_STEPS = 100_000
#: Characters of any text (or items of any list) a template makes, and of its output: a whole HTML
#: newsletter is a few hundred KB; ``'x' * 10**9`` would be a gigabyte.
MAX_TEXT = 1_000_000
#: Bits of an integer ``**`` may make (``2 ** 10**9`` would take minutes and hundreds of MB).
_MAX_POWER_BITS = 4096
#: Filters whose integer arguments say how big their result is (a width, a count of lines or slices).
_SIZE_FILTERS = frozenset({"center", "indent", "wordwrap", "batch", "slice", "truncate", "format"})
#: Filters whose result can be much longer than their input, so it is measured; any other filter gives
#: at most a few times what it was given.
_GROWING_FILTERS = _SIZE_FILTERS | {"replace", "join", "list", "map", "sum", "pprint", "tojson", "urlize"}
#: ``str`` methods whose integer arguments say how big their result is.
_SIZE_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_NUMBER = re.compile(r"\d+")
_NESTED_FIELD = re.compile(r"\{[^{}]*:[^{}]*\{")
_PRINTF_STAR = re.compile(r"%[-#0 +]*(\*|\d*\.\*)")
_PRINTF_SPEC = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d*))?")


class _TooCostly(Exception):
    """A render went past :data:`MAX_STEPS` or :data:`MAX_TEXT`; the message says which, for a person."""


class _Budget:
    """The steps left to one render."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_STEPS

    def step(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _TooCostly(
                f"does too much work for one message (more than {MAX_STEPS:,} loop turns and calls); "
                "check its loops and macros"
            )


_BUDGET: ContextVar[_Budget | None] = ContextVar("smartpush_template_budget", default=None)


def _step() -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.step()


def _too_long(what: str) -> _TooCostly:
    return _TooCostly(f"makes {what} longer than {MAX_TEXT:,} characters, more than any message needs")


def _check_size(value: Any) -> Any:
    """``value`` itself, unless it is a text or a collection longer than :data:`MAX_TEXT`."""
    if isinstance(value, str | list | tuple | dict | set | bytes) and len(value) > MAX_TEXT:
        raise _too_long("a text or a list")
    return value


def _check_ints(values: Iterable[Any]) -> None:
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TEXT:
            raise _too_long("a text")


def _check_printf(fmt: Any, args: Iterable[Any]) -> None:
    """Refuse a ``%`` format whose widths or precisions would make a huge text."""
    if not isinstance(fmt, str):
        return
    for match in _PRINTF_SPEC.finditer(fmt):
        _check_ints(int(n) for n in match.groups() if n)
    if _PRINTF_STAR.search(fmt):
        _check_ints(args)


def _bounded_concat(parts: Iterable[str]) -> str:
    """``"".join(parts)``, refusing an output longer than :data:`MAX_TEXT` before it is built.

    The parts are already made (each one bounded); only their sum is checked before joining.
    """
    kept = parts if isinstance(parts, list) else list(parts)
    if sum(map(len, kept)) > MAX_TEXT:
        raise _too_long("a text")
    return "".join(kept)


def _counted(iterable: Iterable[Any]) -> Iterator[Any]:
    """The items of a ``{% for %}`` loop, each one a step of the render's budget."""
    budget = _BUDGET.get()
    for item in iterable:
        if budget is not None:
            budget.step()
        yield item


def _guarded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    sizes = name in _SIZE_FILTERS

    @functools.wraps(func)  # keeps Jinja's pass_context/pass_eval_context marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if sizes:
            values = [a for a in args if not isinstance(a, Context)]
            if name == "format":
                _check_printf(values[0] if values else None, [*values[1:], *kwargs.values()])
            else:
                _check_ints([*values[1:], *kwargs.values()])
        return _check_size(func(*args, **kwargs))

    return guarded


_TOO_DEEP = "the template is nested too deeply (brackets, operators, or more than 20 loops one in another)"

#: The name of the filter every ``{% for %}`` iterable is passed through (see :meth:`_Sandbox._parse`).
_COUNTED = "_smartpush_counted"


class _Sandbox(SandboxedEnvironment):
    """Jinja's sandbox, plus bounds on the work and the memory one render may use.

    Every loop turn and every call is a step of a per-render budget (:data:`MAX_STEPS`); ``*``, ``**``,
    ``+`` and ``%``, size-giving filters and ``str`` methods, ``str.format`` widths, attribute reads
    and the output itself are refused past :data:`MAX_TEXT`. The optimizer is off: it would run
    filters and operators on constants while compiling, before any of these checks.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(optimized=False, **options)
        self.concat = _bounded_concat  # type: ignore[method-assign]  # macros, blocks, {% set %} blocks
        self.globals.pop("lipsum", None)  # lorem ipsum has no place in a message, and n=10**6 takes minutes
        self.filters[_COUNTED] = _counted

    def add_filters(self, filters: Mapping[str, Callable[..., Any]]) -> None:
        """Install ``filters``; the ones that can grow a text are wrapped by :func:`_guarded_filter`."""
        self.filters.update(filters)
        for name in _GROWING_FILTERS & set(self.filters):
            self.filters[name] = _guarded_filter(name, self.filters[name])

    # Nesting (brackets, operators, blocks) deep enough to exhaust Python's stack, or the 20 nested
    # loops CPython compiles, is a syntax error of the template, not a crash.
    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        try:
            ast = super()._parse(source, name, filename)
            for loop in ast.find_all(nodes.For):
                loop.iter = nodes.Filter(loop.iter, _COUNTED, [], [], None, None, lineno=loop.lineno)
        except RecursionError:
            raise JinjaSyntaxError(_TOO_DEEP, 1, name, filename) from None
        return ast

    def _generate(
        self, source: nodes.Template, name: str | None, filename: str | None, defer_init: bool = False
    ) -> str:
        try:
            return super()._generate(source, name, filename, defer_init)
        except RecursionError:
            raise JinjaSyntaxError(_TOO_DEEP, 1, name, filename) from None

    def _compile(self, source: str, filename: str) -> CodeType:
        try:
            return super()._compile(source, filename)
        except (RecursionError, SyntaxError, MemoryError):
            raise JinjaSyntaxError(_TOO_DEEP, 1) from None

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        sized = (str, list, tuple)
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, sized) and isinstance(times, int) and len(seq) * times > MAX_TEXT:
                    raise _too_long("a text or a list")
        elif operator == "**":
            big = isinstance(left, int) and isinstance(right, int) and abs(left) > 1
            if big and right * abs(left).bit_length() > _MAX_POWER_BITS:
                raise _TooCostly(f"computes a number of more than {_MAX_POWER_BITS} bits")
        elif operator == "%":
            _check_printf(left, right if isinstance(right, tuple) else [right])
        elif isinstance(left, sized) and isinstance(right, sized) and len(left) + len(right) > MAX_TEXT:
            raise _too_long("a text or a list")  # "+"
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _step()
        for value in (*args, *kwargs.values()):
            _check_size(value)  # a macro calling itself with a text twice as long each time
            if isinstance(value, list | tuple):
                for item in value:
                    _check_size(item)
        if getattr(__obj, "__name__", None) in _SIZE_METHODS and isinstance(
            getattr(__obj, "__self__", None), str
        ):
            _check_ints([*args, *kwargs.values()])
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        return _check_size(super().getattr(obj, attribute))

    def getitem(self, obj: Any, argument: Any) -> Any:
        return _check_size(super().getitem(obj, argument))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt: str = value.__self__

        @functools.wraps(wrapped)
        def bounded(*args: Any, **kwargs: Any) -> str:
            _check_ints(int(n) for n in _NUMBER.findall(fmt))
            if _NESTED_FIELD.search(fmt):  # a width given as an argument: {:{}}
                given = args[0].values() if value.__name__ == "format_map" and args else kwargs.values()
                _check_ints([*args, *given])
            result: str = _check_size(wrapped(*args, **kwargs))
            return result

        return bounded


class _ConfinedLoader(BaseLoader):
    """Loads ``name`` from ``root`` only: no ``..``, no absolute path, no symlink leading outside."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, name: str) -> Path:
        pure = PurePosixPath(name)
        if not pure.parts or "\\" in name or pure.is_absolute() or ".." in pure.parts or ":" in pure.parts[0]:
            raise _RefusedPath(name)
        path = self.root.joinpath(*pure.parts)
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if real != real_root and not real.startswith(real_root + os.sep):
            raise _RefusedPath(name)
        return path

    def get_source(self, environment: Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        path = self.path_of(template)
        try:
            source, mtime = path.read_text(encoding="utf-8"), path.stat().st_mtime
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise TemplateNotFound(template) from None
        except UnicodeDecodeError:
            msg = f"template file {TEMPLATES_FOLDER}/{template} is not UTF-8 text: save it as UTF-8"
            raise TemplateError(Problem(msg)) from None
        return source, str(path), lambda: path.is_file() and path.stat().st_mtime == mtime


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a compiled template or expression comes from, for error messages."""

    origin: str  # "templates/grippe/sms.txt.j2" or "channels[1].subject (inline)"
    field: str | None
    campaign_file: str | None
    line: int | None
    loader_root: str  # to turn a template's absolute filename back into "templates/…"
    locations: Mapping[str, Location]  # variable -> (file, line) where it first appears
    kind: str = "template"  # or "expression"
    attributes: frozenset[str] = frozenset()  # attribute/key names written in the templates

    def problem(self, message: str, exc: BaseException) -> Problem:
        """``message`` about the template (file and line) where ``exc`` was raised."""
        file, line = self._template_frame(exc)
        sep = " " if message.startswith(("uses ", "tries ", "includes ")) else ": "
        if file is None:  # inline: point at the campaign field
            name = f"{self.kind} {self.origin}" + (f" (line {line})" if line and line > 1 else "")
            return Problem(name + sep + message, file=self.campaign_file, line=self.line, field=self.field)
        details = ([f"line {line}"] if line else []) + (
            [f"included by {self.origin}"] if file != self.origin else []
        )
        name = f"template {file} ({', '.join(details)})" if details else f"template {file}"
        return Problem(name + sep + message, file=file, line=line)

    def _template_frame(self, exc: BaseException) -> Location:
        """The template file (None: inline) and line of the innermost template frame of the traceback."""
        tb, prefix = exc.__traceback__, self.loader_root + os.sep
        found: Location = (None, None)
        while tb is not None:
            if "__jinja_exception__" in tb.tb_frame.f_globals:  # a frame Jinja rewrote to a template line
                name = tb.tb_frame.f_code.co_filename
                file = TEMPLATES_FOLDER + "/" + name[len(prefix) :] if name.startswith(prefix) else None
                found = (file, tb.tb_lineno)
            tb = tb.tb_next
        return found

    def translate(self, exc: Exception) -> TemplateError:
        """Turn anything raised while rendering into a TemplateError that shows no row value."""
        if isinstance(exc, UndefinedError):
            match = _UNDEFINED_NAME.fullmatch(str(exc))
            if match:
                name = match.group(1)
                msg = f"uses the variable '{name}', which the audience has no column for"
            else:  # "'dict object' has no attribute 'x'": show x only if the template spells it out
                name = str(exc).rpartition(" ")[2].strip("'")
                shown = f"'{name}'" if name in self.attributes else "an attribute or key"
                msg = f"uses {shown}, which this row's value does not have"
        elif isinstance(exc, SecurityError):
            msg = "tries to reach Python internals, which is not allowed in templates"
        elif isinstance(exc, _TooCostly):
            msg = str(exc)
        elif isinstance(exc, RecursionError):
            msg = "calls itself too deeply (a macro or an include that never stops calling itself?)"
        elif isinstance(exc, OverflowError | MemoryError):
            msg = (
                f"asks for too big a range, number or text (range() gives at most {MAX_RANGE:,} numbers, "
                f"a text at most {MAX_TEXT:,} characters)"
            )
        elif isinstance(exc, TemplateError):  # a smartpush filter refusing a value
            msg = "; ".join(p.message for p in exc.problems)
        elif isinstance(exc, _RefusedPath):
            msg = f"includes a file outside the {TEMPLATES_FOLDER}/ folder, which is not allowed"
        elif isinstance(exc, TemplateNotFound):
            msg = "includes a template file that does not exist"
        elif isinstance(exc, TypeError):
            msg = (
                "a filter or operator got a value of the wrong type (CSV values are text: "
                "convert them, e.g. age|int >= 65 or montant|float)"
            )
        else:
            msg = f"a filter or expression failed on this row ({type(exc).__name__})"
        return TemplateError(self.problem(msg, exc))


def _context(template: Template, parent: dict[str, Any]) -> Context:
    """A render context over ``parent`` as is (it already holds the globals).

    ``Template.render()`` copies the environment's globals (a ChainMap) into new dicts and sets on every
    call, which cost more than rendering a short message; this builds the same context without them.
    """
    return new_context(template.environment, template.name, template.blocks, parent, True, None, None)


#: Value types a plain template outputs without Jinja (exact types: a subclass may change ``str()``). A
#: ``jinja2.Undefined``, the ``missing`` marker, a function or any other object goes through Jinja.
_PLAIN_VALUES: frozenset[type] = frozenset(
    {str, Markup, int, float, bool, type(None), list, tuple, dict, Decimal, dt.datetime, dt.date, dt.time}
)
#: Names a template's top level does not look up in the context (``{{ self }}`` is the template).
_SPECIAL_NAMES = frozenset({"self"})
_ABSENT = object()


@dataclass(frozen=True, slots=True)
class _Plain:
    """A template that is only text and ``{{ name }}`` outputs, rendered without a Jinja context.

    Building a Jinja context per row costs more than rendering a short SMS body. This does what the
    compiled template does for such a template: each value through :func:`_finalize`, then ``str()``
    (text) or ``escape()`` (HTML), between the texts as the lexer left them.
    """

    first: str  # the text before the first output
    outputs: tuple[tuple[str, str], ...]  # (name, the text after it)
    convert: Callable[[Any], str]  # str, or markupsafe.escape when the environment autoescapes

    def render(self, context: Mapping[str, Any], globals_: Mapping[str, Any]) -> str | None:
        """The output, or None when Jinja must render instead: a name is missing or not a plain value,
        anything raises, or the output is too long. None is never a guess: Jinja gives the error."""
        if type(context) is not dict:  # a Mapping of another kind may look names up its own way
            return None
        convert, out = self.convert, [self.first]
        size = len(self.first)
        try:
            for name, text in self.outputs:
                value = context[name] if name in context else globals_.get(name, _ABSENT)
                if type(value) not in _PLAIN_VALUES:
                    return None
                shown = convert(_finalize(value))
                size += len(shown) + len(text)
                out.append(shown)
                out.append(text)
        except Exception:  # e.g. a list nested too deeply for str()
            return None
        return None if size > MAX_TEXT else "".join(out)  # measured before it is built, as Jinja does


def _plain(env: Environment, ast: nodes.Template, template: Template) -> _Plain | None:
    """A :class:`_Plain` for ``template`` when its ``ast`` is only text and ``{{ name }}`` outputs.

    ``ast`` must be the template's: a file's text is read again to parse it, and a template already in
    the environment's cache is not reloaded, so the Python code ``ast`` compiles to must be the
    template's own, or Jinja renders it.
    """
    if type(env.autoescape) is not bool or env.finalize is not _finalize:
        return None
    parts = [""]
    for output in ast.body:
        if type(output) is not nodes.Output:
            return None
        for node in output.nodes:
            if type(node) is nodes.TemplateData:
                parts[-1] += node.data
            elif type(node) is nodes.Name and node.ctx == "load" and node.name not in _SPECIAL_NAMES:
                parts += [node.name, ""]
            else:
                return None
    try:
        module = env.compile(ast, template.name, template.filename)
    except Exception:  # it compiled once already; if not again, Jinja renders it
        return None
    roots = [c for c in module.co_consts if isinstance(c, CodeType) and c.co_name == "root"]
    if roots != [getattr(template.root_render_func, "__code__", None)]:
        return None
    outputs = tuple(zip(parts[1::2], parts[2::2], strict=True))
    return _Plain(parts[0], outputs, escape if env.autoescape else str)


@dataclass(frozen=True, slots=True)
class CompiledTemplate:
    """A compiled template, reused for every row."""

    origin: str
    variables: frozenset[str]
    _template: Template = dc_field(repr=False, compare=False)
    _where: _Origin = dc_field(repr=False, compare=False)
    _globals: dict[str, Any] = dc_field(repr=False, compare=False, default_factory=dict)
    #: Set when the template is only text and ``{{ name }}`` outputs: rendered without Jinja's context.
    _plain: _Plain | None = dc_field(repr=False, compare=False, default=None)

    def render(self, context: Mapping[str, Any]) -> str:
        """Render for one row (plus :data:`PROVIDED_NAMES`); the output is exact, never stripped."""
        if self._plain is not None:
            text = self._plain.render(context, self._globals)
            if text is not None:
                return text
        return self._render_jinja(context)

    def _render_jinja(self, context: Mapping[str, Any]) -> str:
        """:meth:`render` through Jinja: any template, and every error of a plain one."""
        template = self._template
        parent = {**self._globals, **context}
        budget = _BUDGET.set(_Budget())
        try:
            try:
                return _bounded_concat(template.root_render_func(_context(template, parent)))
            except Exception:
                template.environment.handle_exception()  # re-raises with template lines in the traceback
                raise  # pragma: no cover - handle_exception always raises
        except Exception as exc:
            raise self._where.translate(exc) from None
        finally:
            _BUDGET.reset(budget)


@dataclass(frozen=True, slots=True)
class CompiledExpression:
    """A compiled ``where:`` expression; calling it on a row gives the expression's value."""

    origin: str
    variables: frozenset[str]
    _expression: TemplateExpression = dc_field(repr=False, compare=False)
    _where: _Origin = dc_field(repr=False, compare=False)
    _globals: dict[str, Any] = dc_field(repr=False, compare=False, default_factory=dict)

    def __call__(self, context: Mapping[str, Any]) -> Any:
        template = self._expression._template
        parent = {**self._globals, **context}
        budget = _BUDGET.set(_Budget())
        try:
            try:
                ctx = _context(template, parent)
                for _ in template.root_render_func(ctx):
                    pass
                value = ctx.vars["result"]
            except Exception:
                template.environment.handle_exception()
                raise  # pragma: no cover
            if isinstance(value, Undefined):
                value._fail_with_undefined_error()
            return value
        except Exception as exc:
            raise self._where.translate(exc) from None
        finally:
            _BUDGET.reset(budget)


class Templates:
    """Compiles a project's templates in two sandboxed environments sharing one confined loader."""

    def __init__(self, project_dir: Path, *, locale: str = "fr_FR", timezone: str = "Europe/Paris") -> None:
        self.project_dir = Path(project_dir)
        self.templates_dir = self.project_dir.absolute() / TEMPLATES_FOLDER
        self.loader = _ConfinedLoader(self.templates_dir)
        self.filters = Filters(locale, timezone)
        options: dict[str, Any] = {
            "loader": self.loader,
            "undefined": StrictUndefined,
            "trim_blocks": True,
            "lstrip_blocks": True,
            "keep_trailing_newline": False,
            "auto_reload": False,  # no stat() per include per row; a run uses the files as compiled
            "finalize": _finalize,
        }
        self.text_env = _Sandbox(autoescape=False, **options)
        self.html_env = _Sandbox(autoescape=True, **options)
        for env in (self.text_env, self.html_env):
            env.add_filters(self.filters.as_dict())

    def compile(
        self,
        value: str,
        *,
        field: str,
        html: bool = False,
        campaign_file: str | None = None,
        line: int | None = None,
    ) -> CompiledTemplate:
        """Compile a template file (``value`` ends in ``.j2``) or an inline template, once."""
        at: dict[str, Any] = {"file": campaign_file, "line": line, "field": field}
        try:
            return self._compile(value, html, at)
        except RecursionError:  # the analysis of a template nested too deeply
            where = "the template file" if value.endswith(".j2") else "the inline template"
            raise TemplateError(Problem(f"syntax error in {where}: {_TOO_DEEP}", **at)) from None

    def _compile(self, value: str, html: bool, at: dict[str, Any]) -> CompiledTemplate:
        field = at["field"]
        env = self.html_env if html else self.text_env
        if value.endswith(".j2"):
            name = self._template_name(value, at)
            origin = f"{TEMPLATES_FOLDER}/{name}"
            try:
                template = env.get_template(name)
            except (TemplateNotFound, _RefusedPath):
                raise TemplateError(Problem(f"template file {origin} not found", **at)) from None
            except JinjaSyntaxError as exc:
                raise TemplateError(self._syntax_problem(exc, origin, at)) from None
            ast = self._parse(env, name, origin, at)
        else:
            origin = f"{field} (inline)"
            try:
                template = env.from_string(value)
                ast = env.parse(value)
            except JinjaSyntaxError as exc:
                raise TemplateError(self._syntax_problem(exc, origin, at)) from None
        where = self._origin(env, origin, ast, at, inline=not value.endswith(".j2"))
        plain = _plain(env, ast, template)
        return CompiledTemplate(
            origin, frozenset(where.locations), template, where, dict(template.globals), plain
        )

    def expression(
        self, source: str, *, field: str, campaign_file: str | None = None, line: int | None = None
    ) -> CompiledExpression:
        """Compile a Jinja expression such as ``age|int >= 65`` (the audience's ``where:``)."""
        env, origin = self.text_env, f"{field} (expression)"
        at: dict[str, Any] = {"file": campaign_file, "line": line, "field": field}
        try:
            compiled = env.compile_expression(source, undefined_to_none=False)
            expr = Parser(env, source, state="variable").parse_expression()
            ast = nodes.Template([nodes.Output([expr])], lineno=1)
            ast.set_environment(env)
            where = replace(self._origin(env, origin, ast, at, inline=True), kind="expression")
        except JinjaSyntaxError as exc:
            raise TemplateError(Problem(f"syntax error in the expression: {exc.message}", **at)) from None
        except RecursionError:
            raise TemplateError(Problem(f"syntax error in the expression: {_TOO_DEEP}", **at)) from None
        return CompiledExpression(
            origin, frozenset(where.locations), compiled, where, dict(compiled._template.globals)
        )

    # -- helpers ----------------------------------------------------------------------------------

    def _template_name(self, value: str, at: Mapping[str, Any]) -> str:
        """``templates/a/b.j2`` → ``a/b.j2``, refusing anything that would leave ``templates/``."""
        pure = PurePosixPath(value)
        msg = f"template path {value!r} must be a file inside the project's {TEMPLATES_FOLDER}/ folder"
        refused = TemplateError(
            Problem(f"{msg} (not through a link leading elsewhere), like {_EXAMPLE}", **at)
        )
        if len(pure.parts) < _MIN_PATH_PARTS or pure.parts[0] != TEMPLATES_FOLDER:
            raise refused
        name = "/".join(pure.parts[1:])
        try:
            self.loader.path_of(name)  # no "..", no "\\", no link leading outside
        except _RefusedPath:
            raise refused from None
        return name

    @staticmethod
    def _syntax_problem(exc: JinjaSyntaxError, origin: str, at: Mapping[str, Any]) -> Problem:
        if exc.name is not None:  # in a template file (the one named, or one it includes)
            file = f"{TEMPLATES_FOLDER}/{exc.name}"
            used = f" (used by {at['field']})" if file == origin else f" (included by {origin})"
            return Problem(
                f"syntax error in template {file}{used}: {exc.message}", file=file, line=exc.lineno
            )
        inner = f" (line {exc.lineno} of the template)" if exc.lineno > 1 else ""
        return Problem(f"syntax error in the inline template{inner}: {exc.message}", **at)

    def _parse(self, env: Environment, name: str, origin: str, at: Mapping[str, Any]) -> nodes.Template:
        source, filename, _ = self.loader.get_source(env, name)
        try:
            return env.parse(source, name, filename)
        except JinjaSyntaxError as exc:
            raise TemplateError(self._syntax_problem(exc, origin, at)) from None

    def _origin(
        self, env: Environment, origin: str, ast: nodes.Template, at: Mapping[str, Any], inline: bool
    ) -> _Origin:
        """Collect every variable (with where it first appears) through includes/extends/imports.

        A variable of the inline template itself is located at ``(None, None)``: the campaign field.
        """
        trees: list[tuple[nodes.Template, str | None]] = []
        seen = {origin.removeprefix(TEMPLATES_FOLDER + "/")}
        pending: list[tuple[nodes.Template, str | None]] = [(ast, None if inline else origin)]
        while pending:
            tree, file = pending.pop()
            trees.append((tree, file))
            for ref, ref_line, required in _references(tree):
                if ref in seen:
                    continue
                seen.add(ref)
                ref_origin = f"{TEMPLATES_FOLDER}/{ref}"
                here = dict(at) if file is None else {"file": file, "line": ref_line}
                try:
                    env.get_template(ref)  # compiled now, and cached for rendering
                except _RefusedPath:
                    msg = (
                        f"template {file or origin} includes {ref!r}, outside the {TEMPLATES_FOLDER}/ folder"
                    )
                    raise TemplateError(Problem(msg + ": only files inside it can be used", **here)) from None
                except TemplateNotFound:
                    if not required:
                        continue
                    msg = f"template file {ref_origin} not found (included by {file or origin})"
                    raise TemplateError(Problem(msg, **here)) from None
                except JinjaSyntaxError as exc:
                    raise TemplateError(self._syntax_problem(exc, origin, at)) from None
                pending.append((self._parse(env, ref, origin, at), ref_origin))
        locations: dict[str, Location] = {}
        declared = [_declared(tree) for tree, _ in trees]
        for i, (tree, file) in enumerate(trees):
            others = set().union(*(names for j, names in enumerate(declared) if j != i))
            for var, var_line in _variables(tree, env, declared[i], others):
                locations.setdefault(var, (file, None if file is None else var_line))
        attributes = {n.attr for tree, _ in trees for n in tree.find_all(nodes.Getattr)}
        for tree, _ in trees:
            keys = (n.arg for n in tree.find_all(nodes.Getitem) if isinstance(n.arg, nodes.Const))
            attributes |= {k.value for k in keys if isinstance(k.value, str)}
        where = _Origin(origin, at["field"], at["file"], at["line"], str(self.loader.root), locations)
        return replace(where, attributes=frozenset(attributes))


def _variables(
    ast: nodes.Template, env: Environment, own: set[str], others: set[str]
) -> Iterator[tuple[str, int]]:
    """Undeclared variables of one template AST, with the line each first appears on.

    Jinja's analysis sees a name set or imported at the top level as undeclared inside blocks, and in
    the templates it includes: names set by ``others`` templates of the chain are dropped, and so are
    this template's ``own`` unless its top level reads them before setting them
    (``{% set prenom = prenom | first_name %}`` needs a ``prenom`` column).
    """
    top = nodes.Template([n for n in ast.body if not isinstance(n, nodes.Block)], lineno=1)
    top.set_environment(env)
    names = find_undeclared_variables(ast) - (own - find_undeclared_variables(top)) - others
    names -= set(env.globals)
    first: dict[str, int] = {}
    for node in ast.find_all(nodes.Name):
        if node.ctx == "load" and node.name in names:
            first[node.name] = min(first.get(node.name, node.lineno), node.lineno)
    for name in sorted(names):
        yield name, first.get(name, 1)


def _declared(ast: nodes.Template) -> set[str]:
    """Names a template sets (``{% set %}``), imports or defines as macros, anywhere in it."""
    names = {n.name for n in ast.find_all(nodes.Name) if n.ctx == "store"}
    names |= {n.name for n in ast.find_all(nodes.Macro)}
    names |= {n.target for n in ast.find_all(nodes.Import)}
    for node in ast.find_all(nodes.FromImport):
        names |= {alias if isinstance(alias, str) else alias[1] for alias in node.names}
    return names


def _constant_names(expr: nodes.Node | None) -> list[str]:
    """The template names an include/extends/import target can take, when written as constants."""
    if isinstance(expr, nodes.Const) and isinstance(expr.value, str):
        return [expr.value]
    if isinstance(expr, nodes.Tuple | nodes.List):
        return [name for item in expr.items for name in _constant_names(item)]
    if isinstance(expr, nodes.CondExpr):
        return _constant_names(expr.expr1) + _constant_names(expr.expr2)
    return []


def _references(ast: nodes.Template) -> Iterator[tuple[str, int, bool]]:
    """(name, line, must exist) of each template this AST includes, extends or imports by a constant name.

    A list of names (the first that exists is used) and ``ignore missing`` make a missing file acceptable.
    """
    for node in ast.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        target = getattr(node, "template", None)
        optional = getattr(node, "ignore_missing", False) or isinstance(target, nodes.Tuple | nodes.List)
        for name in _constant_names(target):
            yield name, node.lineno, not optional


def _fold(name: str) -> str:
    decomposed = unicodedata.normalize("NFKD", name.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c)).replace(" ", "_")


def check_variables(
    template: CompiledTemplate | CompiledExpression,
    columns: Collection[str],
    *,
    extra: Collection[str] = (),
) -> list[Problem]:
    """One problem per variable the template reads that is neither a column, ``extra`` nor provided."""
    known = set(columns) | set(extra) | PROVIDED_NAMES
    ordered = list(columns)
    folded = {_fold(c): c for c in ordered}
    listed = ", ".join(ordered[:_MAX_LISTED_COLUMNS]) + (", …" if len(ordered) > _MAX_LISTED_COLUMNS else "")
    where = template._where
    kind = where.kind
    problems = []
    for name in sorted(template.variables - known):
        file, line = where.locations.get(name, (None, None))
        close = folded.get(_fold(name)) or next(iter(difflib.get_close_matches(name, ordered, n=1)), None)
        hint = f" (did you mean '{close}'?)" if close else ""
        message = (
            f"{kind} {file or where.origin} uses {{{{ {name} }}}}, but the audience has no column "
            f"'{name}'{hint}; columns are: {listed or '(none)'}"
        )
        if file is None:  # the inline template itself: point at the campaign field
            problems.append(Problem(message, file=where.campaign_file, line=where.line, field=where.field))
        else:
            problems.append(Problem(message, file=file, line=line))
    return problems
