"""The SMS part counter against the 3GPP definitions, on any ``str`` at all: lone surrogates, emoji,
control characters, megabytes of text. tests/test_sms.py pins the boundaries and the splitting; this
file checks the counts against an independent reading of TS 23.038 / TS 23.040 and that nothing
raises or takes long.
"""

from __future__ import annotations

import math
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from smartpush.sms import Encoding, analyse, split

#: TS 23.038 default alphabet, written out again here rather than imported.
BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
EXTENSION = set("^{}\\[~]|€")

ANY_STR = st.text(st.characters(blacklist_categories=()), max_size=500)  # surrogates included
WIDE = st.text(alphabet="a€|😀ж\ud800\udfff", max_size=600)


def units(text: str, encoding: Encoding) -> int:
    if encoding is Encoding.GSM7:
        return sum(2 if c in EXTENSION else 1 for c in text)
    return sum(2 if ord(c) > 0xFFFF else 1 for c in text)


def expected_parts(text: str, encoding: Encoding) -> int:
    """Greedy split by the definitions: 160/153 septets or 70/67 UTF-16 units, a 2-unit character
    never cut between two parts."""
    single, concat = (160, 153) if encoding is Encoding.GSM7 else (70, 67)
    total = units(text, encoding)
    if total == 0:
        return 0
    if total <= single:
        return 1
    parts, used = 1, 0
    for c in text:
        cost = units(c, encoding)
        if used + cost > concat:
            parts, used = parts + 1, 0
        used += cost
    return parts


@settings(max_examples=400, deadline=None)
@given(text=ANY_STR | WIDE, transliterate=st.booleans())
def test_counts_follow_the_definitions_on_any_str(text: str, transliterate: bool) -> None:
    info = analyse(text, transliterate=transliterate)  # never raises, surrogates included
    sent = info.text
    gsm = all(c in BASIC or c in EXTENSION for c in sent)
    assert info.encoding is (Encoding.GSM7 if gsm else Encoding.UCS2)
    assert info.units == units(sent, info.encoding)
    assert info.parts == expected_parts(sent, info.encoding)
    assert set(info.non_gsm) == {c for c in sent if c not in BASIC and c not in EXTENSION}
    parts = split(text, transliterate=transliterate)
    assert "".join(parts) == sent and len(parts) == info.parts
    single, concat = (160, 153) if info.encoding is Encoding.GSM7 else (70, 67)
    assert all(units(p, info.encoding) <= (single if len(parts) == 1 else concat) for p in parts)
    if info.units > single:
        assert info.parts >= math.ceil(info.units / concat)


def test_boundaries_by_the_definitions() -> None:
    for text, parts in [
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("€" * 80, 1),  # 160 septets
        ("€" * 81, 2),
        ("a" * 159 + "€", 2),  # 161 septets
        ("a" * 152 + "€" + "a" * 150, 2),  # the escape pair moves whole to part 2: 152 + 152
        ("a" * 152 + "€" + "a" * 152, 3),
        ("ж" * 70, 1),
        ("ж" * 71, 2),
        ("ж" * 134, 2),
        ("ж" * 135, 3),
        ("😀" * 35, 1),  # 70 UTF-16 units
        ("😀" * 36, 2),
        ("ж" * 66 + "😀" + "ж" * 3, 2),  # 71 units; the pair moves whole to part 2: 66 + 5
        ("ж" * 66 + "😀" + "ж" * 65, 2),  # 66 + (2 + 65)
        ("ж" * 66 + "😀" + "ж" * 66, 3),
        ("\ud800" * 70, 1),  # a lone surrogate is one UTF-16 unit
        ("\ud800" * 71, 2),
    ]:
        assert analyse(text).parts == parts, (text[:5], len(text))


def test_megabytes_of_text_are_counted_quickly() -> None:
    began = time.monotonic()
    for text in ("€a" * 500_000, "ж😀" * 300_000, "\ud800x" * 300_000, "\x00" * 1_000_000):
        info = analyse(text)
        assert info.parts == len(split(text))
    assert time.monotonic() - began < 15
