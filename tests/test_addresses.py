"""Per-channel address normalisation, and the exactness of the fast paths."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartpush import addresses
from smartpush.addresses import (
    _fast_email,
    _fast_phone,
    _normalise_email_slow,
    _normalise_phone_slow,
    normalise_email,
    normalise_phone,
    normalise_push_token,
)
from smartpush.errors import RecipientError

Codes = RecipientError.Codes
SETTINGS = settings(
    max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def outcome(fn: object, *args: str) -> tuple[str, str]:
    """("ok", value) or (code, reason): what a call gives, comparable between two implementations."""
    assert callable(fn)
    try:
        return "ok", fn(*args)
    except RecipientError as exc:
        return str(exc.code), exc.reason


# ------------------------------------------------------------------------------------------- phones

FR_MOBILE_FORMS = [
    "06 12 34 56 78",
    "06.12.34.56.78",
    "06-12-34-56-78",
    "0612345678",
    "+33 6 12 34 56 78",
    "+33612345678",
    "0033612345678",
    "00 33 6 12 34 56 78",
    "(06) 12 34 56 78",
    "+33 (0)6 12 34 56 78",
]


@pytest.mark.parametrize("raw", FR_MOBILE_FORMS)
def test_fr_mobile_in_every_usual_form(raw: str) -> None:
    assert normalise_phone(raw) == "+33612345678"
    assert _normalise_phone_slow(raw) == "+33612345678"


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("07 81 23 45 67", "FR", "+33781234567"),
        ("+32 470 12 34 56", "FR", "+32470123456"),  # foreign number in international form
        ("0470 12 34 56", "BE", "+32470123456"),  # valid in BE, read with region BE
        ("0032 470 12 34 56", "BE", "+32470123456"),
        ("+33 6 12 34 56 78", "BE", "+33612345678"),
        ("06 12 34 56 78", "fr", "+33612345678"),  # region is case-insensitive
        ("+44 7400 123456", "FR", "+447400123456"),
        ("09 51 23 45 67", "FR", "+33951234567"),  # VOIP: accepted
    ],
)
def test_valid_numbers(raw: str, region: str, expected: str) -> None:
    assert normalise_phone(raw, region) == expected
    assert _normalise_phone_slow(raw, region) == expected


@pytest.mark.parametrize(
    ("raw", "region", "code", "words"),
    [
        ("01 23 45 67 89", "FR", Codes.NOT_MOBILE, "landline (fixed line)"),
        ("+33 1 23 45 67 89", "FR", Codes.NOT_MOBILE, "landline"),
        ("0800 12 34 56", "FR", Codes.NOT_MOBILE, "toll-free"),
        ("0470 12 34 56", "FR", Codes.NOT_MOBILE, "landline"),  # a BE mobile read as French: a landline
        ("02 223 45 67", "BE", Codes.NOT_MOBILE, "landline"),
        ("06 12 34", "FR", Codes.INVALID_PHONE, "too few digits for FR"),
        ("06 12 34 56 78 90", "FR", Codes.INVALID_PHONE, "too many digits"),
        ("abcdef", "FR", Codes.INVALID_PHONE, "does not look like a phone number"),
        ("", "FR", Codes.INVALID_PHONE, "does not look like a phone number"),
        ("+999 123 456 789", "FR", Codes.INVALID_PHONE, "country code"),
        ("00 12 34 56 78", "FR", Codes.INVALID_PHONE, ""),
    ],
)
def test_invalid_numbers(raw: str, region: str, code: RecipientError.Codes, words: str) -> None:
    with pytest.raises(RecipientError) as caught:
        normalise_phone(raw, region)
    assert caught.value.code == code
    assert words in caught.value.reason
    assert outcome(_normalise_phone_slow, raw, region) == (str(code), caught.value.reason)


def test_landline_reason_is_the_documented_one() -> None:
    with pytest.raises(RecipientError) as caught:
        normalise_phone("01 23 45 67 89")
    assert caught.value.reason == "the number is a landline (fixed line) and cannot receive SMS"


@pytest.mark.parametrize("raw", [*FR_MOBILE_FORMS[:8], "07 81 23 45 67"])
def test_common_fr_forms_take_the_fast_path(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object) -> str:
        raise AssertionError("slow path used")

    monkeypatch.setattr(addresses, "_normalise_phone_slow", fail)
    assert normalise_phone(raw).startswith("+33")


def test_fast_path_declines_what_it_cannot_be_sure_of() -> None:
    assert _fast_phone("+33 (0)6 12 34 56 78", "FR") is None  # national prefix after the country code
    assert _fast_phone("01 23 45 67 89", "FR") is None
    assert _fast_phone(" " * 250 + "0612345678", "FR") is None  # phonenumbers refuses > 250 characters
    assert _fast_phone("０６１２３４５６７８", "FR") is None  # full-width digits: phonenumbers decides
    assert _fast_phone("0612345678", "US") is None  # +1 is shared by several regions


SEPARATORS = st.sampled_from(["", "", "", " ", ".", "-", "(", ")", "/", "\u00a0", "\t", "x", "+", "\u202f"])
PREFIXES = st.sampled_from(
    ["0", "+33", "0033", "+32", "0032", "", "+", "00", "+330", "33", "32", "0 0", "+3"]
)
LEADS = st.sampled_from(
    ["6", "7", "1", "2", "3", "4", "5", "8", "9", "0", "60", "69", "73", "79", "80", "47"]
)


@st.composite
def phone_like(draw: st.DrawFn) -> str:
    prefix = draw(PREFIXES)
    lead = draw(LEADS)
    rest = draw(st.text(alphabet="0123456789", min_size=max(0, 8 - len(lead)), max_size=12 - len(lead)))
    chars = list(prefix + lead + rest)
    out = draw(SEPARATORS)
    for ch in chars:
        out += ch + draw(SEPARATORS)
    return out


@SETTINGS
@given(raw=phone_like(), region=st.sampled_from(["FR", "BE"]))
def test_phone_fast_path_agrees_with_phonenumbers(raw: str, region: str) -> None:
    fast = _fast_phone(raw, region)
    if fast is not None:
        assert _normalise_phone_slow(raw, region) == fast
    assert outcome(normalise_phone, raw, region) == outcome(_normalise_phone_slow, raw, region)


@SETTINGS
@given(nsn=st.text(alphabet="0123456789", min_size=9, max_size=9), region=st.sampled_from(["FR", "BE"]))
def test_phone_fast_path_agrees_on_every_number_range(nsn: str, region: str) -> None:
    for raw in ("0" + nsn, "+33" + nsn, "0033" + nsn, "+32" + nsn[:8], "0" + nsn[:8]):
        assert outcome(normalise_phone, raw, region) == outcome(_normalise_phone_slow, raw, region)


# ------------------------------------------------------------------------------------------- emails

EMAIL_CASES: list[tuple[str, str | None]] = [
    ("jean.dupont@example.fr", "jean.dupont@example.fr"),
    ("Jean.Dupont@EXAMPLE.FR", "Jean.Dupont@example.fr"),  # domain lower-cased, local part kept
    ("user+tag@sub.example.co.uk", "user+tag@sub.example.co.uk"),
    ("o'brien@example.ie", "o'brien@example.ie"),
    ("INFO@example.fr", "info@example.fr"),  # RFC 2142 names are case-insensitive
    ("  jean@example.fr  ", "jean@example.fr"),  # surrounding whitespace ignored
    ("jean@exämple.fr", "jean@exämple.fr"),  # IDN domain
    ("jean@xn--exmple-cua.fr", "jean@exämple.fr"),  # Punycode shown as Unicode
    ("jean@ÉXÄMPLE.FR", "jean@éxämple.fr"),
    ("zoé@example.fr", "zoé@example.fr"),  # SMTPUTF8 local part
    ("a" * 65 + "@example.fr", "a" * 65 + "@example.fr"),  # long local part: accepted when not strict
    ("a" * 64 + "@example.fr", "a" * 64 + "@example.fr"),
    ("a@" + "b" * 63 + ".fr", "a@" + "b" * 63 + ".fr"),
    ("a@x.example", "a@x.example"),
    ("a..b@x.fr", None),
    (".a@x.fr", None),
    ("a.@x.fr", None),
    ("a@x", None),
    ("a@-x.fr", None),
    ("a@x-.fr", None),
    ("a@x..fr", None),
    ("a@x.fr.", None),  # trailing dot
    ("a@x.test", None),  # special-use domains and their subdomains
    ("a@mail.x.localhost", None),
    ("a@x.onion", None),
    ("a@x.ARPA", None),
    ("a@x.local", None),
    ("a@ab--cd.fr", None),  # reserved R-LDH label
    ("a@xn--zz.fr", None),  # not real Punycode
    ("a@x.123", None),
    ("a@1.2.3.4", None),
    ("a@[192.0.2.1]", None),
    ('"jean dupont"@x.fr', None),
    ("Jean <jean@x.fr>", None),
    ("a b@x.fr", None),
    ("a@x_y.fr", None),
    ("a@@x.fr", None),
    ("a@" + "b" * 64 + ".fr", None),  # label longer than 63
    ("a" * 250 + "@" + "b" * 10 + ".fr", None),  # longer than 254
    ("jean@example.fr\u200b", None),
    ("", None),
]


@pytest.mark.parametrize(("raw", "expected"), EMAIL_CASES)
def test_email_table(raw: str, expected: str | None) -> None:
    got = outcome(normalise_email, raw)
    assert got == outcome(_normalise_email_slow, raw)
    if expected is None:
        assert got[0] == str(Codes.INVALID_EMAIL)
    else:
        assert got == ("ok", expected)


def test_plain_addresses_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object) -> str:
        raise AssertionError("slow path used")

    monkeypatch.setattr(addresses, "_normalise_email_slow", fail)
    assert normalise_email("Jean.Dupont@Example.FR") == "Jean.Dupont@example.fr"
    assert normalise_email("a_b-c+d@sub.domain-x.com") == "a_b-c+d@sub.domain-x.com"


ATEXT = "abcXYZ0189!#$%&'*+/=?^_`{|}~-"
LOCAL = st.text(alphabet=ATEXT + ".", min_size=0, max_size=70) | st.text(min_size=0, max_size=8)
LABEL = st.text(alphabet="abzAZ09-", min_size=0, max_size=65) | st.text(alphabet="ab-é_", max_size=6)
TLD = st.sampled_from(
    ["fr", "COM", "test", "local", "arpa", "onion", "x", "123", "f1", "", "localhost", "museum"]
)


@st.composite
def email_like(draw: st.DrawFn) -> str:
    labels = draw(st.lists(LABEL, min_size=0, max_size=4))
    domain = ".".join([*labels, draw(TLD)])
    sep = draw(st.sampled_from(["@", "@", "@", "", "@@", " @"]))
    return draw(LOCAL) + sep + domain + draw(st.sampled_from(["", "", ".", " "]))


@SETTINGS
@given(raw=email_like())
def test_email_fast_path_agrees_with_email_validator(raw: str) -> None:
    fast = _fast_email(raw.strip())
    if fast is not None:
        assert _normalise_email_slow(raw) == fast
    assert outcome(normalise_email, raw) == outcome(_normalise_email_slow, raw)


# -------------------------------------------------------------------------------------- push tokens

FCM = "dGhpcyBpcyBhbiBleGFtcGxl:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx" + "A" * 100
SUBSCRIPTION = {
    "endpoint": "https://fcm.googleapis.com/fcm/send/abc123",
    "expirationTime": None,
    "keys": {
        "p256dh": "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u",
        "auth": "tBHItJI5svbpez7KI4CCXg",
    },
}


def test_fcm_and_apns_tokens_are_kept() -> None:
    assert normalise_push_token(FCM) == FCM
    assert normalise_push_token("  " + "ab" * 32 + "\n") == "ab" * 32


def test_web_push_subscription_is_compacted_with_sorted_keys() -> None:
    pretty = json.dumps(SUBSCRIPTION, indent=2)
    out = normalise_push_token(pretty)
    assert out == json.dumps(SUBSCRIPTION, separators=(",", ":"), sort_keys=True)
    assert " " not in out
    assert normalise_push_token(out) == out


@pytest.mark.parametrize(
    ("token", "words"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("abc def", "spaces"),
        ("abc\x00def", "control"),
        ("a" * 4097, "longer than 4096"),
        ("{not json", "not valid JSON"),
        ('{"endpoint": "http://push.example.org/x", "keys": {"p256dh": "a", "auth": "b"}}', "https"),
        ('{"endpoint": "https://", "keys": {"p256dh": "a", "auth": "b"}}', "https"),
        ('{"endpoint": "https://push.example.org/x y", "keys": {"p256dh": "a", "auth": "b"}}', "https"),
        ('{"endpoint": 42, "keys": {"p256dh": "a", "auth": "b"}}', "endpoint"),
        ('{"keys": {"p256dh": "a", "auth": "b"}}', "endpoint"),
        ('{"endpoint": "https://push.example.org/x"}', '"keys"'),
        ('{"endpoint": "https://push.example.org/x", "keys": {"p256dh": "a"}}', "keys.auth"),
        ('{"endpoint": "https://push.example.org/x", "keys": {"p256dh": "", "auth": "b"}}', "keys.p256dh"),
        ('{"endpoint": "https://push.example.org/x", "keys": ["a", "b"]}', '"keys"'),
    ],
)
def test_invalid_push_tokens(token: str, words: str) -> None:
    with pytest.raises(RecipientError) as caught:
        normalise_push_token(token)
    assert caught.value.code == Codes.INVALID_PUSH_TOKEN
    assert words in caught.value.reason


# ----------------------------------------------------------------------------- no value in messages

LEAKY = [
    (normalise_phone, "06 12 34 Zq7Xw9"),
    (normalise_phone, "01 23 45 67 89"),
    (normalise_phone, "+999 7788 1234"),
    (normalise_phone, "Zq7Xw9"),
    (normalise_email, "Zq7Xw9 dupont@example.fr"),
    (normalise_email, "jean@Zq7Xw9 .fr"),
    (normalise_email, "jean@xn--Zq7Xw9.fr"),
    (normalise_email, "jean@Zq7Xw9"),
    (normalise_email, "jean@Zq7X\u200bw9.fr"),
    (normalise_email, "Zq7Xw9.@example.fr"),
    (normalise_email, '"Zq7Xw9"@example.fr'),
    (normalise_email, "Zq7Xw9 <jean@example.fr>"),
    (normalise_email, "jean.zq7xw9@" + "b" * 250 + ".fr"),
    (normalise_email, "jean@zq7xw9.test"),
    (normalise_push_token, "Zq7Xw9 token"),
    (normalise_push_token, '{"endpoint": "http://Zq7Xw9.example", "keys": {}}'),
    (normalise_push_token, '{"Zq7Xw9": '),
]


@pytest.mark.parametrize(("fn", "raw"), LEAKY)
def test_reasons_never_contain_the_value(fn: object, raw: str) -> None:
    code, reason = outcome(fn, raw)
    assert code != "ok"
    assert raw not in reason
    assert "zq7xw9" not in reason.lower()


@SETTINGS
@given(
    marker=st.from_regex(r"[A-Za-z]{3}[0-9][A-Za-z0-9]{2,6}", fullmatch=True),
    before=st.text(max_size=6),
    after=st.text(max_size=6),
)
def test_no_reason_quotes_any_part_of_the_value(marker: str, before: str, after: str) -> None:
    for fn, raw in (
        (normalise_phone, before + marker + after),
        (normalise_email, before + marker + "@" + after),
        (normalise_email, before + "@" + marker + after),
        (normalise_push_token, before + marker + after),
    ):
        code, reason = outcome(fn, raw)
        if code != "ok":
            assert marker.lower() not in reason.lower()
