"""French-friendly Jinja filters for smartpush templates (dates, numbers, money, names).

Every filter accepts the text a CSV file gives (``"2026-12-01"``, ``"01/12/2026"``, ``"1234,5"``) as well
as real values from JSONL or Python (``date``, ``datetime``, ``int``, ``float``, ``Decimal``). A value it
cannot use raises :class:`~smartpush.errors.TemplateError` whose message never repeats the value (it is a
recipient's data); :mod:`smartpush.templating` adds the template name and line.

Spaces: Babel follows CLDR for ``fr_FR``: thousands are grouped with U+202F NARROW NO-BREAK SPACE
(``"1\u202f234,5"``); ``€`` and ``%`` are preceded by U+00A0 NO-BREAK SPACE (``"12,50\xa0€"``,
``"25\xa0%"``). Neither is in the GSM-7 alphabet: whoever encodes SMS should replace them with a plain
space first, or the message is sent as UCS-2.

Babel :class:`~babel.Locale` objects and number patterns are built once per :class:`Filters`, not per row.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime, format_time
from babel.numbers import format_currency, format_decimal, format_percent, get_currency_precision

from smartpush.errors import ConfigError, Problem, TemplateError

__all__ = ["Filters", "french_title"]

_DMY = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})(?:[ T](\d{1,2})[:h](\d{2})(?::(\d{2}))?)?")
_SPACES = str.maketrans("", "", " \u00a0\u202f\u2009\t")
_PARTICLES = frozenset({"de", "du", "des"})
_ARTICLES = frozenset({"la", "le", "les"})
_MAX_DECIMALS = 12
#: Distinct (value, format) pairs whose formatted text is kept; cleared when full.
_FORMAT_CACHE_SIZE = 4096
_DATE_HELP = "expected a date like 2026-12-01 or 01/12/2026"
_DATETIME_HELP = "expected a date and time like 2026-12-01T09:00, 2026-12-01T09:00+01:00 or 01/12/2026 09:00"


def _fail(message: str) -> TemplateError:
    return TemplateError(Problem(message))


def _kind(value: object) -> str:
    """What a value is, for error messages that must not show the value itself."""
    if value is None:
        return "an empty value"
    if isinstance(value, str):
        return "an empty text" if not value.strip() else "a text in another form"
    return f"a value of type {type(value).__name__}"


def _title_part(part: str) -> str:
    """One hyphen-separated part of a lower-cased name: ``d'arc`` → ``D'Arc``, ``o'neil`` → ``O'Neil``."""
    return "'".join(piece[:1].title() + piece[1:] for piece in part.split("'"))


def french_title(value: object) -> str:
    """French title case; cached for text, since first and last names repeat across millions of rows."""
    if isinstance(value, str):
        return _french_title_text(value)
    return _french_title(value)


@lru_cache(maxsize=_FORMAT_CACHE_SIZE)
def _french_title_text(value: str) -> str:
    return _french_title(value)


def _french_title(value: object) -> str:
    """Title-case a French name: ``"jean-pierre de la fontaine"`` → ``"Jean-Pierre de la Fontaine"``.

    ``de``, ``du``, ``des`` and the elided ``d'`` stay lower case except at the start; ``la``, ``le``,
    ``les`` and ``l'`` only right after one of them (``de la Fontaine``, ``de l'Isle``), so Breton and
    other names keep their capital (``Le Gall``, ``L'Hermite``). Surrounding spaces are removed, runs of
    spaces become one, and the typographic apostrophe ``’`` becomes ``'`` (it is not in the SMS GSM-7
    alphabet). ``None`` gives ``""``.
    """
    if value is None:
        return ""
    words = str(value).lower().replace("’", "'").split()
    out: list[str] = []
    for i, word in enumerate(words):
        after_particle = i > 0 and words[i - 1] in _PARTICLES
        if i > 0 and (word in _PARTICLES or (word in _ARTICLES and after_particle)):
            out.append(word)
        elif i > 0 and (word.startswith("d'") or (word.startswith("l'") and after_particle)):
            out.append(word[:2] + "-".join(_title_part(p) for p in word[2:].split("-")))
        else:
            out.append("-".join(_title_part(p) for p in word.split("-")))
    return " ".join(out)


def _to_decimal(value: object, name: str) -> Decimal:
    if isinstance(value, bool):
        raise _fail(f"the {name} filter needs a number, got a true/false value")
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        number = Decimal(repr(value))
    elif isinstance(value, str):
        text = value.translate(_SPACES)
        if "," in text and "." in text:
            raise _fail(
                f"the {name} filter needs a number written like 1234.5 or 1234,5 "
                "(both ',' and '.' found in this row's value)"
            )
        try:
            number = Decimal(text.replace(",", "."))
        except InvalidOperation:
            raise _fail(
                f"the {name} filter needs a number like 1234.5 or 1234,5, got {_kind(value)}"
            ) from None
    else:
        raise _fail(f"the {name} filter needs a number, got {_kind(value)}")
    if not number.is_finite():
        raise _fail(f"the {name} filter needs a finite number")
    return number


def _round(number: Decimal, decimals: int) -> Decimal:
    return number.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)


def _check_decimals(decimals: object, name: str) -> int:
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= _MAX_DECIMALS:
        raise _fail(f"the {name} filter's decimals must be a whole number from 0 to {_MAX_DECIMALS}")
    return decimals


def _with_decimals(pattern: str, decimals: int) -> str:
    """A CLDR number pattern with exactly ``decimals`` fraction digits (``#,##0 %`` → ``#,##0.0 %``)."""
    head, dot, tail = pattern.partition(".")
    if dot:  # "#,##0.###" → keep what follows the fraction digits (a suffix, if any)
        suffix = tail.lstrip("#0")
        pattern = head + suffix
    last = pattern.rfind("0")
    fraction = "." + "0" * decimals if decimals else ""
    return pattern[: last + 1] + fraction + pattern[last + 1 :]


class Filters:
    """The French-friendly filters, bound once to a locale and a timezone."""

    def __init__(self, locale: str = "fr_FR", timezone: str = "Europe/Paris") -> None:
        try:
            self.locale = Locale.parse(locale)
        except (UnknownLocaleError, ValueError, TypeError):
            raise ConfigError(Problem(f"unknown locale {locale!r}; use a name like fr_FR")) from None
        try:
            self.tz = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                Problem(f"unknown timezone {timezone!r}; use a name like Europe/Paris")
            ) from None
        self._decimal_pattern = str(self.locale.decimal_formats[None].pattern)
        self._percent_pattern = str(self.locale.percent_formats[None].pattern)
        self._pattern = lru_cache(maxsize=64)(_with_decimals)
        # Babel takes ~20 µs a date; campaigns repeat few distinct dates over millions of rows.
        self._formatted: dict[tuple[object, ...], str] = {}

    def as_dict(self) -> dict[str, Callable[..., str]]:
        """The filters by the names templates use."""
        return {
            "date": self.date,
            "datetime": self.datetime,
            "time": self.time,
            "number": self.number,
            "currency": self.currency,
            "percent": self.percent,
            "title": self.title,
            "first_name": self.first_name,
        }

    # -- parsing ----------------------------------------------------------------------------------

    def _local(self, value: dt.datetime) -> dt.datetime:
        """Aware values are converted to the configured timezone; naive ones are taken as already in it."""
        if value.tzinfo is None:
            return value.replace(tzinfo=self.tz)
        return value.astimezone(self.tz)

    def _parse_datetime(self, value: object, name: str, help_text: str) -> dt.datetime | dt.date:
        if isinstance(value, dt.datetime | dt.date):
            return value
        if not isinstance(value, str):
            raise _fail(f"the {name} filter cannot read {_kind(value)}: {help_text}")
        text = value.strip()
        match = _DMY.fullmatch(text)
        try:
            if match:
                day, month, year, hour, minute, second = match.groups()
                if hour is None:
                    return dt.date(int(year), int(month), int(day))
                return dt.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0))
            if len(text) == len("2026-12-01"):
                return dt.date.fromisoformat(text)
            return dt.datetime.fromisoformat(text)
        except ValueError:
            raise _fail(f"the {name} filter cannot read {_kind(value)}: {help_text}") from None

    def _format(self, func: Callable[..., str], value: object, fmt: object, name: str, **kw: Any) -> str:
        if not isinstance(fmt, str) or not fmt:
            raise _fail(
                f"the {name} filter's format must be short, medium, long, full or a pattern like 'd MMMM'"
            )
        key = (func, value, fmt)  # kw only carries this instance's timezone
        done = self._formatted.get(key)
        if done is not None:
            return done
        try:
            done = func(value, fmt, locale=self.locale, **kw)
        except (ValueError, KeyError, AttributeError, TypeError):
            raise _fail(f"the {name} filter's format {fmt!r} is not a valid date/time pattern") from None
        self._remember(key, done)
        return done

    def _remember(self, key: tuple[object, ...], text: str) -> None:
        if len(self._formatted) >= _FORMAT_CACHE_SIZE:
            self._formatted.clear()
        self._formatted[key] = text

    # -- filters ----------------------------------------------------------------------------------

    def date(self, value: object, format: str = "long") -> str:
        """Format a date: ``{{ rdv | date }}`` → ``1 décembre 2026``.

        ``value`` is a date, a datetime or a text ``YYYY-MM-DD``, ``YYYY-MM-DDTHH:MM[:SS][±HH:MM]`` or
        ``DD/MM/YYYY``. ``format`` is ``short`` (01/12/2026), ``medium`` (1 déc. 2026), ``long``
        (1 décembre 2026), ``full`` (mardi 1 décembre 2026) or a Babel pattern such as ``"d MMMM"``.
        """
        if isinstance(value, str):
            key = ("date", value, format)
            done = self._formatted.get(key)
            if done is not None:
                return done
        parsed = self._parse_datetime(value, "date", _DATE_HELP)
        if isinstance(parsed, dt.datetime):
            parsed = self._local(parsed).date() if parsed.tzinfo else parsed.date()
        done = self._format(format_date, parsed, format, "date")
        if isinstance(value, str):
            self._remember(key, done)
        return done

    def datetime(self, value: object, format: str = "long") -> str:
        """Format a date and time in the configured timezone: ``{{ rdv | datetime("d MMMM 'à' HH'h'mm") }}``.

        Accepts what :meth:`date` accepts (a date alone means midnight). Aware values are converted to
        the configured timezone; naive ones are taken as local time there. ``long`` gives
        ``1 décembre 2026, 09:00:00 +0100``: for messages a pattern is usually nicer.
        """
        parsed = self._parse_datetime(value, "datetime", _DATETIME_HELP)
        if not isinstance(parsed, dt.datetime):
            parsed = dt.datetime.combine(parsed, dt.time())
        return self._format(format_datetime, self._local(parsed), format, "datetime", tzinfo=self.tz)

    def time(self, value: object, format: str = "short") -> str:
        """Format a time of day: ``{{ rdv | time }}`` → ``09:00``.

        ``value`` is a time, a datetime, a text ``HH:MM[:SS]`` or any date-and-time text :meth:`datetime`
        accepts. Aware values are shown in the configured timezone.
        """
        if isinstance(value, dt.time):
            parsed: dt.datetime | dt.date = dt.datetime.combine(dt.date.today(), value)
        elif isinstance(value, str) and ":" in value and len(value.strip()) <= len("09:00:00"):
            try:
                parsed = dt.datetime.combine(dt.date.today(), dt.time.fromisoformat(value.strip()))
            except ValueError:
                raise _fail(
                    f"the time filter cannot read {_kind(value)}: expected a time like 09:30"
                ) from None
        else:
            parsed = self._parse_datetime(value, "time", "expected a time like 09:30 or " + _DATETIME_HELP)
        if not isinstance(parsed, dt.datetime):
            raise _fail("the time filter got a date without a time: expected a time like 09:30")
        return self._format(format_time, self._local(parsed), format, "time", tzinfo=self.tz)

    def number(self, value: object, decimals: int | None = None) -> str:
        """Format a number the French way: ``{{ 1234.5 | number }}`` → ``1 234,5``.

        The thousands separator is U+202F NARROW NO-BREAK SPACE (Babel/CLDR for fr_FR). Texts such as
        ``"1234.5"``, ``"1234,5"`` or ``"1 234,5"`` are read too. ``decimals`` fixes the number of
        digits after the comma (rounded half up); by default up to 3 are shown.
        """
        number = _to_decimal(value, "number")
        if decimals is None:
            return str(format_decimal(_round(number, 3), locale=self.locale))
        places = _check_decimals(decimals, "number")
        pattern = self._pattern(self._decimal_pattern, places)
        return str(format_decimal(_round(number, places), pattern, locale=self.locale))

    def currency(self, value: object, code: str = "EUR") -> str:
        """Format an amount of money: ``{{ "12.5" | currency }}`` → ``12,50 €`` (U+00A0 before ``€``).

        ``code`` is an ISO 4217 currency code (``EUR``, ``XPF``…); amounts are rounded half up to the
        currency's usual number of decimals.
        """
        number = _to_decimal(value, "currency")
        if not isinstance(code, str) or not re.fullmatch(r"[A-Z]{3}", code):
            raise _fail("the currency filter's code must be a 3-letter ISO code such as EUR")
        number = _round(number, int(get_currency_precision(code)))
        return str(format_currency(number, code, locale=self.locale))

    def percent(self, value: object, decimals: int = 0) -> str:
        """Format a ratio as a percentage: ``{{ 0.25 | percent }}`` → ``25 %`` (U+00A0 before ``%``).

        ``value`` is a ratio (0.25 is 25 %); a text ending in ``%`` (``"25 %"``) is taken as already
        a percentage. ``decimals`` digits are kept after the comma (rounded half up).
        """
        if isinstance(value, str) and value.strip().endswith("%"):
            ratio = _to_decimal(value.strip()[:-1], "percent") / 100
        else:
            ratio = _to_decimal(value, "percent")
        places = _check_decimals(decimals, "percent")
        ratio = _round(ratio * 100, places) / 100
        pattern = self._pattern(self._percent_pattern, places)
        return str(format_percent(ratio, pattern, locale=self.locale))

    def title(self, value: object) -> str:
        """Title-case a name the French way: ``MARIE-ÉLISE D'ARC`` → ``Marie-Élise d'Arc``.

        See :func:`french_title` for the particle rules (``de``, ``du``, ``des``, ``d'`` stay lower case).
        """
        return french_title(value)

    def first_name(self, value: object, default: str = "") -> str:
        """A cleaned first name, or ``default`` when the row has none.

        ``{{ prenom | first_name("Madame, Monsieur") }}`` → ``Jean-Pierre`` for ``" JEAN-PIERRE "``,
        ``Madame, Monsieur`` for an empty cell or a JSON ``null``.
        """
        if value is None or (isinstance(value, str) and not value.strip()):
            return default
        return french_title(value)
