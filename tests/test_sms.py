"""smartpush.sms: encoding, clean-up, transliteration and the real part count."""

from __future__ import annotations

import dataclasses
import itertools
import math
import unicodedata
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartpush import sms
from smartpush.sms import (
    GSM7_BASIC,
    GSM7_CONCAT,
    GSM7_EXTENSION,
    GSM7_SINGLE,
    UCS2_CONCAT,
    UCS2_SINGLE,
    Encoding,
    SmsInfo,
    analyse,
    is_gsm7,
    split,
)

GSM7 = Encoding.GSM7
UCS2 = Encoding.UCS2
EMOJI = "😀"  # U+1F600, outside the BMP: 2 UTF-16 units
UCS = "ж"  # a BMP character outside GSM-7: 1 UTF-16 unit, forces UCS-2


def units_of(part: str, encoding: Encoding) -> int:
    """Independent re-count of a part's units."""
    if encoding is GSM7:
        return sum(2 if char in GSM7_EXTENSION else 1 for char in part)
    return len(part.encode("utf-16-le", "surrogatepass")) // 2


def limit_of(encoding: Encoding, parts: int) -> int:
    if encoding is GSM7:
        return GSM7_SINGLE if parts == 1 else GSM7_CONCAT
    return UCS2_SINGLE if parts == 1 else UCS2_CONCAT


# ---------------------------------------------------------------------------------------------------
# Boundary table
# ---------------------------------------------------------------------------------------------------


class Row(NamedTuple):
    text: str
    encoding: Encoding
    units: int
    parts: int
    pins: tuple[str, ...]  # the named constants this row pins


A = "a"
BOUNDARY_ROWS = [
    # GSM-7, plain characters: 160 fit one SMS, 161 need two parts of at most 153.
    pytest.param(Row(A * GSM7_SINGLE, GSM7, 160, 1, ("GSM7_SINGLE",)), id="gsm-160"),
    pytest.param(Row(A * (GSM7_SINGLE + 1), GSM7, 161, 2, ("GSM7_SINGLE",)), id="gsm-161"),
    # 2 x 153 = 306 is the most two parts hold; 307 needs a third.
    pytest.param(Row(A * (2 * GSM7_CONCAT), GSM7, 306, 2, ("GSM7_CONCAT",)), id="gsm-306"),
    pytest.param(Row(A * (2 * GSM7_CONCAT + 1), GSM7, 307, 3, ("GSM7_CONCAT",)), id="gsm-307"),
    # 3 x 153 = 459 is the most three parts hold; 460 needs a fourth.
    pytest.param(Row(A * (3 * GSM7_CONCAT), GSM7, 459, 3, ("GSM7_CONCAT",)), id="gsm-459"),
    pytest.param(Row(A * (3 * GSM7_CONCAT + 1), GSM7, 460, 4, ("GSM7_CONCAT",)), id="gsm-460"),
    # € is an extension character (2 septets): 80 of them are exactly 160 septets, 81 are 162.
    pytest.param(Row("€" * 80, GSM7, 160, 1, ("GSM7_SINGLE",)), id="euro-80"),
    pytest.param(Row("€" * 81, GSM7, 162, 2, ("GSM7_SINGLE",)), id="euro-81"),
    # 159 characters + "|" (extension) = 161 septets: two parts although only 160 characters.
    pytest.param(Row(A * 159 + "|", GSM7, 161, 2, ("GSM7_SINGLE",)), id="pipe-161-septets"),
    # An escape pair at septets 153-154 is pushed whole into part 2: 305 septets, still 2 parts.
    pytest.param(Row(A * 152 + "€" + A * 151, GSM7, 305, 2, ("GSM7_CONCAT",)), id="escape-at-153"),
    # Same plus one: 306 septets would fit 2 x 153, but the pushed escape pair forces a third part.
    pytest.param(Row(A * 152 + "€" + A * 152, GSM7, 306, 3, ("GSM7_CONCAT",)), id="escape-costs-a-part"),
    # UCS-2 (ж is not GSM-7): 70 units in one SMS, 71 need two parts of at most 67.
    pytest.param(Row(UCS * UCS2_SINGLE, UCS2, 70, 1, ("UCS2_SINGLE",)), id="ucs2-70"),
    pytest.param(Row(UCS * (UCS2_SINGLE + 1), UCS2, 71, 2, ("UCS2_SINGLE",)), id="ucs2-71"),
    # 2 x 67 = 134 is the most two parts hold; 135 needs a third.
    pytest.param(Row(UCS * (2 * UCS2_CONCAT), UCS2, 134, 2, ("UCS2_CONCAT",)), id="ucs2-134"),
    pytest.param(Row(UCS * (2 * UCS2_CONCAT + 1), UCS2, 135, 3, ("UCS2_CONCAT",)), id="ucs2-135"),
    # One French ê turns 160 GSM characters into 160 UCS-2 units: 3 parts instead of 1.
    pytest.param(Row("ê" + A * 159, UCS2, 160, 3, ("GSM7_SINGLE", "UCS2_CONCAT")), id="one-e-circ"),
    # An emoji is 2 UTF-16 units: 69 characters, 70 units, still one SMS; one more unit, two parts.
    pytest.param(Row(EMOJI + A * 68, UCS2, 70, 1, ("UCS2_SINGLE",)), id="emoji-70-units"),
    pytest.param(Row(EMOJI + A * 69, UCS2, 71, 2, ("UCS2_SINGLE",)), id="emoji-71-units"),
    # An emoji at units 67-68 is pushed whole into part 2 (no split surrogate pair): 133 units, 2 parts.
    pytest.param(Row(UCS * 66 + EMOJI + UCS * 65, UCS2, 133, 2, ("UCS2_CONCAT",)), id="emoji-at-67"),
    # Same plus one: 134 units would fit 2 x 67, but the pushed emoji forces a third part.
    pytest.param(Row(UCS * 66 + EMOJI + UCS * 66, UCS2, 134, 3, ("UCS2_CONCAT",)), id="emoji-costs-a-part"),
    # The research note's example: ê forces UCS-2, 54 units in one SMS.
    pytest.param(
        Row("Votre carte Vitale est prête. Rendez-vous sur ameli.fr", UCS2, 54, 1, ("UCS2_SINGLE",)),
        id="vitale-prete",
    ),
    # Empty text: 0 parts (smartpush refuses empty messages before sending).
    pytest.param(Row("", GSM7, 0, 0, ()), id="empty"),
]


@pytest.mark.parametrize("row", BOUNDARY_ROWS)
def test_boundaries(row: Row) -> None:
    info = analyse(row.text)
    assert (info.encoding, info.units, info.parts) == (row.encoding, row.units, row.parts)
    assert info.characters == len(row.text)
    parts = split(row.text)
    assert len(parts) == row.parts
    assert "".join(parts) == row.text
    for part in parts:
        assert units_of(part, row.encoding) <= limit_of(row.encoding, len(parts))


def test_every_limit_is_pinned_by_a_boundary_row() -> None:
    rows = [param.values[0] for param in BOUNDARY_ROWS]
    assert all(isinstance(row, Row) for row in rows)
    pinned = {name for row in rows if isinstance(row, Row) for name in row.pins}
    assert {"GSM7_SINGLE", "GSM7_CONCAT", "UCS2_SINGLE", "UCS2_CONCAT"} <= pinned
    assert all(isinstance(getattr(sms, name), int) for name in pinned)


def test_limits_are_the_3gpp_values() -> None:
    assert (GSM7_SINGLE, GSM7_CONCAT, UCS2_SINGLE, UCS2_CONCAT) == (160, 153, 70, 67)


def test_escape_pair_moves_whole_to_the_next_part() -> None:
    parts = split(A * 152 + "€" + "b" * 10)
    assert parts == [A * 152, "€" + "b" * 10]


def test_emoji_moves_whole_to_the_next_part() -> None:
    parts = split("ê" + "x" * 65 + EMOJI + "y" * 10)
    assert parts == ["ê" + "x" * 65, EMOJI + "y" * 10]
    assert analyse("ê" + "x" * 65 + EMOJI + "y" * 10).units == 78


@pytest.mark.parametrize(
    ("text", "remaining"),
    [
        ("", GSM7_SINGLE),  # nothing written yet: a whole SMS
        (A * 150, 10),  # one GSM-7 SMS, 10 septets left
        ("€" * 80, 0),  # full single SMS
        (A * 161, 145),  # two parts: 153 + 8
        (A * 152 + "€" + A * 151, 0),  # part 2 holds € + 151 = 153 septets
        (UCS * 60, 10),  # one UCS-2 SMS, 10 units left
        (UCS * 66 + EMOJI + UCS * 66, 66),  # third part holds 1 unit
    ],
)
def test_remaining(text: str, remaining: int) -> None:
    assert analyse(text).remaining == remaining


def test_empty_text_has_no_parts() -> None:
    info = analyse("")
    assert (info.parts, info.units, info.characters, info.encoding) == (0, 0, 0, GSM7)
    assert split("") == []
    assert analyse("\u200b").parts == 0  # only a zero-width space: empty once cleaned up


# ---------------------------------------------------------------------------------------------------
# Alphabet
# ---------------------------------------------------------------------------------------------------


def test_alphabet_is_strict_3gpp() -> None:
    assert len(sms._GSM7_TABLE) == 128
    assert len(GSM7_BASIC) == 127  # ESC (0x1B) is the escape code, not text
    assert "Ç" in GSM7_BASIC  # 0x09 is capital Ç in 3GPP TS 23.038
    assert "ç" not in GSM7_BASIC
    assert sorted(GSM7_EXTENSION) == sorted("^{}\\[~]|€")
    assert not GSM7_BASIC & GSM7_EXTENSION


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Bonjour, à demain !", True),  # à is basic
        ("Prix : 5 €", True),  # € is in the extension table
        ("{[~]}|^\\", True),  # every ASCII extension character
        ("`", False),  # backtick is not GSM-7
        ("\x1b", False),  # a literal ESC is not text
        ("\x0c", False),  # form feed is left out of the extension table
        ("\t", False),  # tab: not GSM-7 as given (analyse() turns it into a space)
        ("ça", False),  # strict ç
        ("Ça", True),  # capital Ç is 0x09
        ("l’heure", False),  # as given; analyse() cleans it up
        ("e\u0301", False),  # as given, not normalised; analyse() makes it é
    ],
)
def test_is_gsm7(text: str, expected: bool) -> None:
    assert is_gsm7(text) is expected


def test_every_gsm_character_stays_gsm7_one_septet_or_two() -> None:
    for char in GSM7_BASIC:
        info = analyse(char, transliterate=True)
        assert (info.text, info.encoding, info.units, info.replaced) == (char, GSM7, 1, ())
    for char in GSM7_EXTENSION:
        info = analyse(char, transliterate=True)
        assert (info.text, info.encoding, info.units, info.replaced) == (char, GSM7, 2, ())


@pytest.mark.parametrize("char", ["é", "è", "à", "ù", "É", "Ç", "ü", "Æ", "æ", "ä", "ñ", "ø"])
def test_gsm_characters_are_never_transliterated(char: str) -> None:
    info = analyse(f"Été {char}", transliterate=True)
    assert info.text == f"Été {char}"
    assert info.replaced == ()


# ---------------------------------------------------------------------------------------------------
# Clean-up (always on)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "sent", "encoding", "replaced"),
    [
        # The French apostrophe ’ would force UCS-2; it becomes ' and the message stays GSM-7.
        ("Rendez-vous à l’accueil", "Rendez-vous à l'accueil", GSM7, (("’", "'"),)),
        # ‘ too.
        ("‘oui’", "'oui'", GSM7, (("‘", "'"), ("’", "'"))),
        # Curly double quotes.
        ("“Ameli”", '"Ameli"', GSM7, (("“", '"'), ("”", '"'))),
        # NBSP that French typography puts before ? becomes a plain space.
        ("Une question\u00a0?", "Une question ?", GSM7, (("\u00a0", " "),)),
        # Narrow NBSP before ; and ! too.
        ("Oui\u202f; non\u202f!", "Oui ; non !", GSM7, (("\u202f", " "),)),
        # En dash, em dash, hyphen and non-breaking hyphen become -.
        (
            "9h–12h — Saint\u2011Denis\u2010Nord",
            "9h-12h - Saint-Denis-Nord",
            GSM7,
            (("–", "-"), ("—", "-"), ("\u2011", "-"), ("\u2010", "-")),
        ),
        # Ellipsis becomes three dots; ô and À are not clean-up, they keep the message UCS-2.
        ("À bientôt…", "À bientôt...", UCS2, (("…", "..."),)),
        # Zero-width characters disappear.
        (
            "a\u200bb\u200cc\u200dd\u2060e\ufefff",
            "abcdef",
            GSM7,
            (("\u200b", ""), ("\u200c", ""), ("\u200d", ""), ("\u2060", ""), ("\ufeff", "")),
        ),
        # Tab becomes a space.
        ("Nom :\tDupont", "Nom : Dupont", GSM7, (("\t", " "),)),
        # Decomposed e + U+0301 is NFC-normalised to é (GSM-7); NFC is not a replacement.
        ("Confirme\u0301", "Confirmé", GSM7, ()),
    ],
)
def test_cleanup(raw: str, sent: str, encoding: Encoding, replaced: tuple[tuple[str, str], ...]) -> None:
    info = analyse(raw)
    assert (info.text, info.encoding, info.replaced) == (sent, encoding, replaced)
    assert info.units == len(sent)
    if encoding is GSM7:
        assert info.non_gsm == ()


def test_cleanup_keeps_message_gsm7_and_one_part() -> None:
    text = "Votre rendez-vous est confirmé\u00a0: présentez-vous à l’accueil à 10h30."
    info = analyse(text)
    assert info.encoding is GSM7
    assert info.units == len(text)
    assert info.parts == 1


def test_cleanup_replaced_is_distinct_and_in_order() -> None:
    info = analyse("l’un\u00a0? l’autre\u00a0! “x”")
    assert info.replaced == (("’", "'"), ("\u00a0", " "), ("“", '"'), ("”", '"'))


def test_removal_that_lets_marks_compose_renormalises() -> None:
    info = analyse("e\u200b\u0301")  # zero-width space between e and a combining acute
    assert info.text == "é"
    assert info.encoding is GSM7


# ---------------------------------------------------------------------------------------------------
# Transliteration (opt-in)
# ---------------------------------------------------------------------------------------------------


def test_vitale_transliterated() -> None:
    text = "Votre carte Vitale est prête. Rendez-vous sur ameli.fr"
    plain = analyse(text)
    assert plain.non_gsm == ("ê",)
    assert plain.replaced == ()
    info = analyse(text, transliterate=True)
    assert info.encoding is GSM7
    assert ("ê", "e") in info.replaced
    assert info.text == "Votre carte Vitale est prete. Rendez-vous sur ameli.fr"
    assert (info.units, info.parts, info.non_gsm) == (54, 1, ())


@pytest.mark.parametrize(
    ("char", "replacement"),
    [
        ("ê", "e"),
        ("ë", "e"),
        ("â", "a"),
        ("î", "i"),
        ("ï", "i"),
        ("ô", "o"),
        ("û", "u"),
        ("ç", "c"),
        ("œ", "oe"),
        ("Œ", "OE"),
        ("À", "A"),
        ("Â", "A"),
        ("È", "E"),
        ("Ê", "E"),
        ("Ë", "E"),
        ("Î", "I"),
        ("Ï", "I"),
        ("Ô", "O"),
        ("Ù", "U"),
        ("Û", "U"),
        ("«", '"'),
        ("»", '"'),
        ("ÿ", "y"),  # via Unicode decomposition
        ("ã", "a"),  # via Unicode decomposition
        ("ǘ", "ü"),  # decomposition stops at the first GSM-7 base (ü is GSM-7)
    ],
)
def test_transliteration(char: str, replacement: str) -> None:
    info = analyse(f"x{char}y{char}", transliterate=True)
    assert info.text == f"x{replacement}y{replacement}"
    assert info.encoding is GSM7
    assert info.replaced == ((char, replacement),)
    assert analyse(char).encoding is UCS2  # never without the opt-in
    assert analyse(char).non_gsm == (char,)


def test_cedilla_is_strict_by_default() -> None:
    assert analyse("Français").encoding is UCS2
    assert analyse("Français").non_gsm == ("ç",)
    assert analyse("Français", transliterate=True).text == "Francais"
    assert analyse("FRANÇAIS").encoding is GSM7  # Ç is 0x09


def test_untransliterable_characters_are_kept() -> None:
    info = analyse("Привет ê 😀 ç", transliterate=True)
    assert info.encoding is UCS2
    assert info.text == "Привет e 😀 c"
    assert info.non_gsm == ("П", "р", "и", "в", "е", "т", "😀")
    assert info.replaced == (("ê", "e"), ("ç", "c"))


def test_cleanup_and_transliteration_share_one_order() -> None:
    info = analyse("« C’est sûr »", transliterate=True)
    assert info.text == '" C\'est sur "'
    assert info.replaced == (("«", '"'), ("’", "'"), ("û", "u"), ("»", '"'))


def test_smsinfo_is_frozen() -> None:
    info = analyse("abc")
    assert isinstance(info, SmsInfo)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.parts = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------------

INTERESTING = (
    "aZ09 .,@£$¥\n\rÉéèàùÇÄÖÑÜäöñü§¿¡ΔΦ"  # basic table
    "^{}\\[~]|€"  # extension table: 2 septets
    "ç êâîôûëïœŒÀÊ«»"  # French non-GSM
    "’‘“”–—…\u00a0\u202f\t\u200b\ufeff"  # clean-up
    "\u0301\u0327\u0323"  # combining marks
    "жЖ`\x1b"  # other non-GSM, BMP
    "😀🇫👍𝄞"  # outside the BMP: 2 UTF-16 units
)
texts = st.one_of(
    st.text(max_size=400),
    st.text(alphabet=INTERESTING, max_size=400),
    st.text(alphabet="a€|", min_size=140, max_size=480),  # GSM-7 with many escape pairs
    st.text(alphabet="ж😀a", min_size=60, max_size=220),  # UCS-2 with many surrogate pairs
)
gsm_texts = st.text(alphabet=sorted(GSM7_BASIC | GSM7_EXTENSION), max_size=700)


@given(texts, st.booleans())
def test_split_is_a_valid_greedy_partition(text: str, transliterate: bool) -> None:
    info = analyse(text, transliterate=transliterate)
    parts = split(text, transliterate=transliterate)
    assert "".join(parts) == info.text
    assert len(parts) == info.parts
    assert all(parts)  # no empty part
    limit = limit_of(info.encoding, len(parts))
    sizes = [units_of(part, info.encoding) for part in parts]
    assert all(size <= limit for size in sizes)
    assert sum(sizes) == info.units  # nothing cut: every escape pair / surrogate pair is in one part
    for part in parts:
        # each part encodes on its own: no lone half of a surrogate pair
        assert part.encode("utf-16-le").decode("utf-16-le") == part
    for part, following in itertools.pairwise(parts):
        # greedy: the next part's first character did not fit, so no split wasted a part
        assert units_of(part, info.encoding) + units_of(following[0], info.encoding) > limit


@given(texts, st.booleans())
def test_analysis_is_consistent(text: str, transliterate: bool) -> None:
    info = analyse(text, transliterate=transliterate)
    assert info.characters == len(info.text)
    assert unicodedata.is_normalized("NFC", info.text)
    assert info.units == units_of(info.text, info.encoding)
    assert (info.encoding is GSM7) == is_gsm7(info.text)
    assert info.non_gsm == tuple(dict.fromkeys(c for c in info.text if not is_gsm7(c)))
    assert len(set(info.replaced)) == len(info.replaced)
    assert not any(char in info.text for char in sms.CLEANUP)
    assert info.remaining >= 0
    # preparing again changes nothing
    again = analyse(info.text, transliterate=transliterate)
    assert (again.text, again.encoding, again.units, again.parts, again.replaced) == (
        info.text,
        info.encoding,
        info.units,
        info.parts,
        (),
    )


suffixes = st.text(min_size=1, max_size=20) | st.text(alphabet=INTERESTING, min_size=1, max_size=20)


@given(texts, suffixes, st.booleans())
def test_parts_never_decrease_when_appending(text: str, suffix: str, transliterate: bool) -> None:
    before = analyse(text, transliterate=transliterate).parts
    assert analyse(text + suffix, transliterate=transliterate).parts >= before


@given(texts.filter(bool))
def test_remaining_is_exact(text: str) -> None:
    info = analyse(text)
    if info.parts == 0:  # only characters removed by clean-up
        return
    # "@" is a 1-unit GSM-7 basic starter: it cannot compose with or change anything before it
    assert analyse(text + "@" * info.remaining).parts == info.parts
    assert analyse(text + "@" * (info.remaining + 1)).parts == info.parts + 1


@given(gsm_texts)
def test_gsm7_part_count_bounds(text: str) -> None:
    info = analyse(text)
    assert info.encoding is GSM7
    assert info.text == text
    if info.units == 0:
        assert info.parts == 0
    elif info.units <= GSM7_SINGLE:
        assert info.parts == 1
    else:
        assert info.parts >= math.ceil(info.units / GSM7_CONCAT)
        # an escape pair pushed to the next part wastes at most one septet per boundary
        assert info.parts <= math.ceil(info.units / (GSM7_CONCAT - 1))
