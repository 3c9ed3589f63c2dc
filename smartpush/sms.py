"""SMS text analysis: GSM-7 or UCS-2, length in septets or UTF-16 units, and the real part count.

Policy (see research/protocols.md §1.1–1.2):

- Text is normalised to NFC, then typographic characters are always cleaned up, GOV.UK Notify style
  (:data:`CLEANUP`: curly quotes, dashes, ellipsis, non-breaking spaces, zero-width characters, tab).
- The alphabet is strict 3GPP TS 23.038: 0x09 is capital Ç, so lowercase ç forces UCS-2. ESC (U+001B)
  and form feed are not message text and force UCS-2 too. Extension characters ``^{}\\[~]|€`` cost
  2 septets.
- Transliteration to GSM-7 (ê→e, ç→c, œ→oe, « »→") is opt-in (campaign ``sms.transliterate: true``);
  characters already in GSM-7 (é è à ù É Ç…) are never touched, and characters with no GSM-7 mapping
  (emoji, Cyrillic…) are kept, so the message still goes UCS-2.
- Parts are counted by actually splitting: an escape pair or a surrogate pair never straddles two
  parts, so the count can exceed ``ceil(units / 153)``. Empty text has 0 parts (smartpush refuses
  empty messages elsewhere).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from types import MappingProxyType
from typing import Final, NamedTuple

__all__ = [
    "CLEANUP",
    "GSM7_BASIC",
    "GSM7_CONCAT",
    "GSM7_ESCAPE_COST",
    "GSM7_EXTENSION",
    "GSM7_SINGLE",
    "TRANSLITERATION",
    "UCS2_CONCAT",
    "UCS2_SINGLE",
    "Encoding",
    "SmsInfo",
    "analyse",
    "is_gsm7",
    "split",
]

GSM7_SINGLE: Final = 160  #: septets in a single GSM-7 SMS (140 octets x 8 / 7)
GSM7_CONCAT: Final = 153  #: septets per part of a concatenated GSM-7 SMS (7 lost to the 6-octet UDH)
UCS2_SINGLE: Final = 70  #: UTF-16 units in a single UCS-2 SMS (140 octets / 2)
UCS2_CONCAT: Final = 67  #: UTF-16 units per part of a concatenated UCS-2 SMS (134 octets / 2)
GSM7_ESCAPE_COST: Final = 2  #: septets of an extension character: ESC (0x1B) then its code

_UTF16_UNIT_BYTES: Final = 2  #: bytes in one UTF-16 code unit
_SURROGATE_PAIR_UNITS: Final = 2  #: UTF-16 units of a character outside the BMP
_TRANSLITERATION_CACHE: Final = 4096  #: distinct non-GSM characters whose transliteration is remembered

#: The 3GPP TS 23.038 default alphabet in code order, 16 per row (0x1B is ESC, excluded below).
_GSM7_TABLE: Final = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)
_EXTENSION_CHARS: Final = "^{}\\[~]|€"

#: Characters of the basic table (1 septet each); ESC is the escape code, not text.
GSM7_BASIC: Final = frozenset(_GSM7_TABLE) - {"\x1b"}
#: Characters of the extension table (:data:`GSM7_ESCAPE_COST` septets each); form feed is left out.
GSM7_EXTENSION: Final = frozenset(_EXTENSION_CHARS)
_GSM7: Final = GSM7_BASIC | GSM7_EXTENSION

#: Always-on typographic clean-up (GOV.UK Notify's list, plus the Unicode hyphens U+2010/U+2011).
CLEANUP: Final[Mapping[str, str]] = MappingProxyType(
    {
        "\u2018": "'",  # left single quotation mark
        "\u2019": "'",  # right single quotation mark (French apostrophe)
        "\u201c": '"',  # left double quotation mark
        "\u201d": '"',  # right double quotation mark
        "\u2010": "-",  # hyphen
        "\u2011": "-",  # non-breaking hyphen (word processors insert it)
        "\u2013": "-",  # en dash
        "\u2014": "-",  # em dash
        "\u2026": "...",  # horizontal ellipsis
        "\u00a0": " ",  # no-break space (French typography before : ; ! ?)
        "\u202f": " ",  # narrow no-break space (same)
        "\t": " ",  # tab
        "\u200b": "",  # zero width space
        "\u200c": "",  # zero width non-joiner
        "\u200d": "",  # zero width joiner
        "\u2060": "",  # word joiner
        "\ufeff": "",  # zero width no-break space (BOM)
    }
)

#: Opt-in transliterations that a Unicode decomposition does not give. Any other non-GSM character
#: whose canonical decomposition starts with a GSM-7 character (ê, Â, ÿ, ã…) maps to that character.
TRANSLITERATION: Final[Mapping[str, str]] = MappingProxyType(
    {
        "œ": "oe",
        "Œ": "OE",
        "«": '"',
        "»": '"',
        "„": '"',
        "‹": "'",
        "›": "'",
        "‚": "'",
    }
)

_NON_GSM7_RE: Final = re.compile("[^" + re.escape("".join(sorted(_GSM7))) + "]")
#: Anything outside the basic table: extension characters, clean-up candidates and non-GSM characters.
_NON_BASIC_RE: Final = re.compile("[^" + re.escape("".join(sorted(GSM7_BASIC))) + "]")
_EXTENSION_RE: Final = re.compile("[" + re.escape(_EXTENSION_CHARS) + "]")
_NON_BMP_RE: Final = re.compile("[\U00010000-\U0010ffff]")  # written as a UTF-16 surrogate pair


class Encoding(StrEnum):
    """The data coding of an SMS."""

    GSM7 = "GSM-7"
    UCS2 = "UCS-2"


def _limits(encoding: Encoding) -> tuple[int, int]:
    """(single-SMS limit, per-part limit) in the encoding's units."""
    if encoding is Encoding.GSM7:
        return GSM7_SINGLE, GSM7_CONCAT
    return UCS2_SINGLE, UCS2_CONCAT


@dataclass(frozen=True, slots=True)
class SmsInfo:
    """What an SMS text costs once prepared for sending."""

    text: str  #: the text sent: NFC, cleaned up and, if asked, transliterated
    encoding: Encoding
    characters: int  #: len(text) in code points
    units: int  #: septets (extension characters count 2) for GSM-7, UTF-16 code units for UCS-2
    parts: int  #: the real number of parts after splitting; 0 for empty text
    non_gsm: tuple[str, ...]  #: distinct characters that forced UCS-2, in order of first appearance
    replaced: tuple[tuple[str, str], ...]  #: distinct (original, replacement) pairs applied, in order

    @property
    def remaining(self) -> int:
        """Units that still fit in the last part before another part is needed."""
        single, concat = _limits(self.encoding)
        if self.parts <= 1:
            return single - self.units
        if self.units == self.characters:  # every character costs 1 unit
            return concat - (self.units - (self.parts - 1) * concat)
        return concat - _boundaries(self.text, self.encoding)[1]


@lru_cache(maxsize=_TRANSLITERATION_CACHE)
def _transliteration(char: str) -> str | None:
    """The GSM-7 replacement of a non-GSM character, or None when it has none."""
    explicit = TRANSLITERATION.get(char)
    if explicit is not None:
        return explicit
    base = char
    while True:
        decomposition = unicodedata.decomposition(base)
        if not decomposition or decomposition.startswith("<"):  # none, or a compatibility one
            return None
        base = chr(int(decomposition.split(" ", 1)[0], 16))
        if base in _GSM7:
            return base


class _Prepared(NamedTuple):
    text: str  # the text to send
    non_gsm: tuple[str, ...]  # distinct characters forcing UCS-2
    replaced: tuple[tuple[str, str], ...]  # distinct replacements applied
    extensions: int  # extension characters in text (they cost 2 septets in GSM-7)


def _prepare(text: str, transliterate: bool) -> _Prepared:
    """NFC, clean-up and optional transliteration, in one scan of the characters outside the basic table.

    Fast path: ASCII text skips normalisation, and text made only of basic-table characters (most
    French messages: é è à ù are basic) stops after the scan.
    """
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    specials = _NON_BASIC_RE.findall(text)
    if not specials:
        return _Prepared(text, (), (), 0)
    extensions = 0
    replaced: list[tuple[str, str]] = []
    kept: list[str] = []
    for char in dict.fromkeys(specials):
        if char in GSM7_EXTENSION:
            extensions += specials.count(char)
            continue
        replacement = CLEANUP.get(char)
        if replacement is None and transliterate:
            replacement = _transliteration(char)
        if replacement is None:
            kept.append(char)
        else:
            # str.replace per distinct character is several times faster than str.translate; the
            # replacements are GSM-7 basic characters, so no later replacement can touch them.
            text = text.replace(char, replacement)
            replaced.append((char, replacement))
    if replaced and not text.isascii() and not unicodedata.is_normalized("NFC", text):
        # A removal or a new base letter let combining marks compose ("e", U+200B, U+0301): go again.
        again = _prepare(text, transliterate)
        return again._replace(replaced=tuple(dict.fromkeys((*replaced, *again.replaced))))
    return _Prepared(text, tuple(kept), tuple(replaced), extensions)


def _boundaries(text: str, encoding: Encoding) -> tuple[list[int], int]:
    """Greedy split of a multi-part text: (start index of each part, units in the last part).

    Each part is the longest run of whole characters that fits: take the per-part limit in characters,
    then drop trailing characters until the 2-unit ones (escape pairs, surrogate pairs) fit too.
    """
    limit = _limits(encoding)[1]
    gsm7 = encoding is Encoding.GSM7
    wide = _EXTENSION_RE if gsm7 else _NON_BMP_RE
    extra = (GSM7_ESCAPE_COST if gsm7 else _SURROGATE_PAIR_UNITS) - 1  # a wide character's cost above 1
    length = len(text)
    starts: list[int] = []
    start = 0
    while True:
        starts.append(start)
        end = min(start + limit, length)
        used = end - start + extra * len(wide.findall(text, start, end))
        while used > limit:
            end -= 1
            char = text[end]
            if gsm7:
                used -= GSM7_ESCAPE_COST if char in GSM7_EXTENSION else 1
            else:
                used -= _SURROGATE_PAIR_UNITS if char > "\uffff" else 1
        if end >= length:
            return starts, used
        start = end


def _measure(prepared: _Prepared) -> tuple[Encoding, int, int]:
    """(encoding, units, parts) of a prepared text."""
    text = prepared.text
    characters = len(text)
    if prepared.non_gsm:
        encoding = Encoding.UCS2
        units = len(text.encode("utf-16-le", "surrogatepass")) // _UTF16_UNIT_BYTES
    else:
        encoding = Encoding.GSM7
        units = characters + (GSM7_ESCAPE_COST - 1) * prepared.extensions
    single, concat = _limits(encoding)
    if units == 0:
        parts = 0
    elif units <= single:
        parts = 1
    elif units == characters:  # no 2-unit character: nothing can straddle a boundary
        parts = -(-units // concat)
    else:
        parts = len(_boundaries(text, encoding)[0])
    return encoding, units, parts


def analyse(text: str, *, transliterate: bool = False) -> SmsInfo:
    """Prepare ``text`` for sending (NFC, clean-up, optional transliteration) and measure it."""
    prepared = _prepare(text, transliterate)
    encoding, units, parts = _measure(prepared)
    return SmsInfo(
        prepared.text, encoding, len(prepared.text), units, parts, prepared.non_gsm, prepared.replaced
    )


def split(text: str, *, transliterate: bool = False) -> list[str]:
    """The parts as they would be sent, after the same preparation as :func:`analyse`.

    Joined, they give ``analyse(text).text``; empty text gives ``[]`` (0 parts).
    """
    prepared = _prepare(text, transliterate)
    encoding, _, parts = _measure(prepared)
    if parts <= 1:
        return [prepared.text] if parts else []
    starts = _boundaries(prepared.text, encoding)[0]
    ends = [*starts[1:], len(prepared.text)]
    return [prepared.text[start:end] for start, end in zip(starts, ends, strict=True)]


def is_gsm7(text: str) -> bool:
    """Whether every character of ``text``, as given, is in the GSM-7 basic or extension table.

    No normalisation or clean-up is applied: ``analyse(text).encoding`` tells what will be sent.
    """
    return _NON_GSM7_RE.search(text) is None
