"""Per-channel address normalisation: phone numbers (E.164), email addresses, push tokens.

Each function returns the normalised address or raises :class:`RecipientError` with a reason written
for a person. Reasons never repeat the address, not even a fragment of it.

``plan`` checks every row of audiences of millions, and the reference libraries are slow
(``phonenumbers`` ~30 µs, ``email_validator`` ~24 µs a call), so both phones and emails have an exact
fast path for the common shapes: it answers only when it is certain to give the same result as the
library, and hands every other input to the library (``_normalise_phone_slow``,
``_normalise_email_slow``). The tests check the equivalence on generated inputs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import email_validator
import phonenumbers
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from phonenumbers import NumberParseException, PhoneNumberType, ValidationResult

from smartpush.errors import RecipientError

__all__ = ["normalise_email", "normalise_phone", "normalise_push_token"]

Codes = RecipientError.Codes

# --------------------------------------------------------------------------------------------- phones

_REJECTED_TYPES = {
    PhoneNumberType.FIXED_LINE: "the number is a landline (fixed line) and cannot receive SMS",
    PhoneNumberType.TOLL_FREE: "the number is a toll-free service number and cannot receive SMS",
    PhoneNumberType.PREMIUM_RATE: "the number is a premium-rate service number and cannot receive SMS",
    PhoneNumberType.SHARED_COST: "the number is a shared-cost service number and cannot receive SMS",
    PhoneNumberType.UAN: "the number is a company switchboard number (UAN) and cannot receive SMS",
    PhoneNumberType.VOICEMAIL: "the number is a voicemail access number and cannot receive SMS",
}

_PARSE_REASONS = {
    NumberParseException.INVALID_COUNTRY_CODE: (
        "the phone number has no valid country code (write foreign numbers with + and the country code)"
    ),
    NumberParseException.NOT_A_NUMBER: "the value does not look like a phone number",
    NumberParseException.TOO_SHORT_AFTER_IDD: "the phone number is too short after the international prefix",
    NumberParseException.TOO_SHORT_NSN: "the phone number has too few digits",
    NumberParseException.TOO_LONG: "the phone number is too long",
}

# Characters phonenumbers treats as punctuation, removed before the fast path looks at the digits.
_SEPARATORS = str.maketrans("", "", " .-()/\u00a0")
_MAX_INPUT = 250  # phonenumbers' _MAX_INPUT_STRING_LENGTH: longer strings are rejected unparsed


@dataclass(frozen=True, slots=True)
class _FastPhone:
    """What the fast path needs for one default region, derived from phonenumbers' own metadata."""

    plus_cc: str  # "+33"
    idd: str  # "00"
    idd_cc: str | None  # "0033", None when the region's international prefix is not a plain digit string
    national: str | None  # "0", None when the national form cannot be taken without phonenumbers
    nsn: re.Pattern[str]  # a national significant number certain to be valid and not of a rejected type


def _desc_regex(desc: object) -> str | None:
    pattern = getattr(desc, "national_number_pattern", None) if desc is not None else None
    return pattern or None


def _lengths(desc: object) -> set[int]:
    return set(getattr(desc, "possible_length", ()) or ())


def _build_fast_phone(region: str) -> _FastPhone | None:
    """Compile the fast path of ``region``, or None when its metadata is not simple enough to be exact."""
    if region not in phonenumbers.SUPPORTED_REGIONS:
        return None
    md = phonenumbers.PhoneMetadata.metadata_for_region(region)
    if md is None:
        return None
    cc = md.country_code
    if cc is None:
        return None
    cc_str = str(cc)
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(cc, ())
    if len(regions) != 1 or md.same_mobile_and_fixed_line_pattern:
        return None  # a shared country code (+1, +44, +7...) needs phonenumbers to find the region
    if any(int(cc_str[:k]) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE for k in range(1, len(cc_str))):
        return None
    general, mobile = _desc_regex(md.general_desc), _desc_regex(md.mobile)
    npfp = md.national_prefix_for_parsing or None
    if general is None or mobile is None or md.national_prefix_transform_rule:
        return None
    if npfp is not None and not npfp.isdigit():
        return None
    lengths = _lengths(md.general_desc)
    if _lengths(md.mobile):
        lengths &= _lengths(md.mobile)
    lengths -= set(getattr(md.general_desc, "possible_length_local_only", ()) or ())
    if not lengths:
        return None
    rejected = [
        p
        for d in (md.premium_rate, md.toll_free, md.shared_cost, md.uan, md.voicemail)
        if (p := _desc_regex(d)) is not None
    ]
    parts = [f"(?=(?:{'|'.join(f'[0-9]{{{n}}}' for n in sorted(lengths))})\\Z)"]
    parts.append(f"(?=(?:{general})\\Z)")
    if rejected:
        parts.append(f"(?!(?:{'|'.join(f'(?:{p})' for p in rejected)})\\Z)")
    if npfp is not None:
        parts.append(f"(?!{npfp})")  # phonenumbers would try to strip it as a national prefix
    parts.append(f"(?:{mobile})\\Z")
    nsn = re.compile("".join(parts), re.ASCII)
    if nsn.groups:
        return None
    idd = md.international_prefix
    idd_cc = idd + cc_str if idd and idd.isdigit() else None
    national = npfp
    # The national form is only certain when it cannot be mistaken for an IDD or a country code.
    if national is not None and (idd_cc is None or national[0] == cc_str[0]):
        national = None
    return _FastPhone("+" + cc_str, idd or "", idd_cc, national, nsn)


_FAST_PHONE: dict[str, _FastPhone | None] = {}


def normalise_phone(raw: str, region: str = "FR") -> str:
    """Return ``raw`` in E.164 form (``+33612345678``), reading national numbers as of ``region``.

    Raises ``RecipientError`` with ``INVALID_PHONE`` when the number cannot be parsed or is not a valid
    number, and ``NOT_MOBILE`` when it is a landline or a service number that cannot receive SMS.
    """
    region = region.upper()
    return _fast_phone(raw, region) or _normalise_phone_slow(raw, region)


def _fast_phone(raw: str, region: str) -> str | None:
    """The E.164 form when ``raw`` is a plain mobile number of ``region`` (then exactly phonenumbers'
    answer), else None: the caller asks phonenumbers."""
    try:
        fast = _FAST_PHONE[region]
    except KeyError:
        fast = _FAST_PHONE[region] = _build_fast_phone(region)
    if fast is None or len(raw) > _MAX_INPUT:
        return None
    s = raw.translate(_SEPARATORS)
    if s.startswith("+"):
        if not s.startswith(fast.plus_cc):
            return None
        nsn = s[len(fast.plus_cc) :]
    elif fast.idd_cc is not None and s.startswith(fast.idd_cc):
        nsn = s[len(fast.idd_cc) :]
    elif fast.national is not None and s.startswith(fast.national) and not s.startswith(fast.idd):
        nsn = s[len(fast.national) :]
    else:
        return None
    return fast.plus_cc + nsn if fast.nsn.match(nsn) is not None else None


def _normalise_phone_slow(raw: str, region: str = "FR") -> str:
    """The reference answer: phonenumbers' parse, is_valid_number, number_type, format E.164."""
    region = region.upper()
    try:
        number = phonenumbers.parse(raw, region)
    except NumberParseException as exc:
        reason = _PARSE_REASONS.get(exc.error_type, "the value does not look like a phone number")
        raise RecipientError(Codes.INVALID_PHONE, reason) from None
    if not phonenumbers.is_valid_number(number):
        cc = number.country_code or 0
        where = phonenumbers.region_code_for_country_code(cc)
        where = where if where not in (None, "ZZ", "001") else f"+{cc}"
        possible = phonenumbers.is_possible_number_with_reason(number)
        if possible == ValidationResult.TOO_SHORT:
            reason = f"the phone number has too few digits for {where}"
        elif possible == ValidationResult.TOO_LONG:
            reason = f"the phone number has too many digits for {where}"
        elif possible == ValidationResult.INVALID_LENGTH:
            reason = f"the phone number has the wrong number of digits for {where}"
        elif possible == ValidationResult.INVALID_COUNTRY_CODE:
            reason = "the phone number's country code does not exist"
        else:
            reason = f"the phone number is not a valid number for {where} (no such number range)"
        raise RecipientError(Codes.INVALID_PHONE, reason)
    kind = phonenumbers.number_type(number)
    if kind in _REJECTED_TYPES:
        raise RecipientError(Codes.NOT_MOBILE, _REJECTED_TYPES[kind])
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


# --------------------------------------------------------------------------------------------- emails

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: The common ASCII address: dot-atom local part of at most 64 characters, LDH labels, alphabetic TLD.
_EMAIL_FAST = re.compile(
    rf"(?=[^@]{{1,64}}@)([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@((?:{_LABEL}\.)+[A-Za-z]{{2,63}})", re.ASCII
)
_EMAIL_MAX = 254
# email_validator's special-use names (read once, at import): reject the name and its subdomains.
_SPECIAL_TLDS = frozenset(d for d in email_validator.SPECIAL_USE_DOMAIN_NAMES if "." not in d)
_SPECIAL_SUFFIXES = tuple(
    s for d in email_validator.SPECIAL_USE_DOMAIN_NAMES if "." in d for s in (d, "." + d)
)
# RFC 2142 mailbox names that email_validator lower-cases ("INFO@..." -> "info@...").
_CASE_INSENSITIVE = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)
_ECHO_MIN = 4  # pieces of the address this long are searched for in reasons
_PARENTHESES = re.compile(r"\s*\(([^()]*)\)")


def normalise_email(raw: str) -> str:
    """Return the normalised address (domain lower-cased, IDNA handled as email_validator does).

    Surrounding whitespace is ignored. Deliverability (DNS) is not checked. Raises ``RecipientError``
    with ``INVALID_EMAIL``.
    """
    s = raw.strip()
    return _fast_email(s) or _normalise_email_slow(s)


def _fast_email(s: str) -> str | None:
    """The normalised form when ``s`` is a plain ASCII address (then exactly email_validator's
    answer), else None: the caller asks email_validator."""
    m = _EMAIL_FAST.fullmatch(s)
    if m is None or len(s) > _EMAIL_MAX:
        return None
    local, domain = m.groups()
    # "--" in positions 3-4 of a label is Punycode or a reserved R-LDH label: email_validator decides.
    if "--" in domain:
        return None
    domain = domain.lower()
    if domain[domain.rfind(".") + 1 :] in _SPECIAL_TLDS or (
        _SPECIAL_SUFFIXES and domain.endswith(_SPECIAL_SUFFIXES)
    ):
        return None
    if local.lower() in _CASE_INSENSITIVE:
        local = local.lower()
    return local + "@" + domain


def _normalise_email_slow(raw: str) -> str:
    """The reference answer: email_validator without DNS checks."""
    s = raw.strip()
    try:
        info = email_validator.validate_email(
            s,
            check_deliverability=False,
            allow_smtputf8=True,
            allow_quoted_local=False,
            allow_domain_literal=False,
            allow_display_name=False,
            allow_empty_local=False,
            strict=False,
            globally_deliverable=True,
            test_environment=False,
        )
    except email_validator.EmailNotValidError as exc:
        raise RecipientError(Codes.INVALID_EMAIL, _email_reason(str(exc), s)) from None
    return str(info.normalized)


def _email_reason(message: str, value: str) -> str:
    """email_validator's message without what it quotes from the address (characters, IDNA labels)."""

    def keep_counts(m: re.Match[str]) -> str:
        return m.group(0) if re.fullmatch(r"[\d-]+ (character|byte)s? too many", m.group(1)) else ""

    text = _PARENTHESES.sub(keep_counts, message)
    text = text.split(":", 1)[0].strip().rstrip(".")
    if not text:
        return "the email address is not valid"
    text = text[0].lower() + text[1:]
    pieces = [value, *value.rpartition("@")[::2]]
    if any(len(p) >= _ECHO_MIN and p in text for p in pieces):  # belt and braces: never echo the address
        return "the email address is not valid"
    return text


# ----------------------------------------------------------------------------------------- push tokens

_PUSH_MAX = 4096
_WHITESPACE = re.compile(r"\s")


def normalise_push_token(raw: str) -> str:
    """Return a push token (FCM/APNs) as is, or a Web Push subscription JSON compacted with sorted keys.

    Raises ``RecipientError`` with ``INVALID_PUSH_TOKEN``.
    """
    s = raw.strip()
    if not s:
        raise RecipientError(Codes.INVALID_PUSH_TOKEN, "the push token is empty")
    if len(s) > _PUSH_MAX:
        raise RecipientError(
            Codes.INVALID_PUSH_TOKEN, f"the push token is longer than {_PUSH_MAX} characters"
        )
    if s.startswith("{"):
        return _web_push_subscription(s)
    if _WHITESPACE.search(s):
        raise RecipientError(Codes.INVALID_PUSH_TOKEN, "the push token contains spaces or line breaks")
    if not s.isprintable():
        raise RecipientError(Codes.INVALID_PUSH_TOKEN, "the push token contains control characters")
    return s


def _web_push_subscription(s: str) -> str:
    def bad(why: str) -> RecipientError:
        return RecipientError(Codes.INVALID_PUSH_TOKEN, f"the Web Push subscription {why}")

    try:
        sub = json.loads(s)
    except ValueError as exc:
        msg = getattr(exc, "msg", "syntax error")
        col = getattr(exc, "colno", None)
        where = f" at column {col}" if col is not None else ""
        raise bad(f"is not valid JSON ({msg}{where})") from None
    if not isinstance(sub, dict):
        raise bad("is not a JSON object")
    endpoint = sub.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise bad('has no "endpoint" text')
    try:
        url = urlsplit(endpoint)
        host = url.hostname
    except ValueError:
        raise bad('"endpoint" is not a valid URL') from None
    if url.scheme != "https" or not host or _WHITESPACE.search(endpoint):
        raise bad('"endpoint" is not an https:// URL')
    keys = sub.get("keys")
    if not isinstance(keys, dict):
        raise bad('has no "keys" object')
    for name in ("p256dh", "auth"):
        value = keys.get(name)
        if not isinstance(value, str) or not value.strip():
            raise bad(f'has no "keys.{name}" text')
    out = json.dumps(sub, separators=(",", ":"), sort_keys=True)
    if len(out) > _PUSH_MAX:
        raise bad(f"is longer than {_PUSH_MAX} characters")
    return out
