"""SMS text and number rules, pure: msisdn normalisation, `$(var)` substitution,
smartlink references, GSM-7 / UCS-2 detection and part counting.

Every check that makes a recipient unsendable raises `InvalidRecipient` with a short
machine code (kept in recipients.error_code) and a sentence for people (error_message).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import phonenumbers
from phonenumbers.phonemetadata import PhoneMetadata

MAX_TEXT_CHARS = 1024

Encoding = Literal["gsm7", "ucs2"]

# GSM 03.38 basic character set (the escape 0x1B itself is not a character one can send).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Extension table: each is sent as escape + character, so it takes two septets.
GSM7_EXTENDED = frozenset("^{}[]~|\\€\f")

GSM7_SINGLE_UNITS = 160
GSM7_PART_UNITS = 153
UCS2_SINGLE_UNITS = 70
UCS2_PART_UNITS = 67

# Any $(...) counts, even with spaces in it: a text must never reach a phone with one left.
_VARIABLE = re.compile(r"\$\(([^()]*)\)")
_LINK = re.compile(r"\{\{link_([A-Za-z0-9_-]+)\}\}")

_PARSE_REASONS = {
    phonenumbers.NumberParseException.INVALID_COUNTRY_CODE: "unknown country code",
    phonenumbers.NumberParseException.NOT_A_NUMBER: "not a phone number",
    phonenumbers.NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
    phonenumbers.NumberParseException.TOO_SHORT_NSN: "too short",
    phonenumbers.NumberParseException.TOO_LONG: "too long",
}
_POSSIBLE_REASONS = {
    phonenumbers.ValidationResult.INVALID_COUNTRY_CODE: "unknown country code",
    phonenumbers.ValidationResult.TOO_SHORT: "too short",
    phonenumbers.ValidationResult.TOO_LONG: "too long",
    phonenumbers.ValidationResult.INVALID_LENGTH: "wrong length for its country",
}


class InvalidRecipient(ValueError):
    """A recipient that must not be sent; `code` goes to error_code, the text to error_message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Segments:
    encoding: Encoding
    # Septets for GSM-7 (escaped characters count two), UTF-16 code units for UCS-2.
    units: int
    parts: int


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    encoding: Encoding
    parts: int
    link_ids: tuple[str, ...]


def normalise_msisdn(raw: str, *, default_region: str = "") -> str:
    """E.164 with a leading '+' (the form suppressions use), or InvalidRecipient.

    Numbers starting with '+' or '00' are international. Other numbers are tried as
    national numbers of `default_region` when it is set, then as digits that already
    carry a country code (the API's own msisdn form, e.g. 919812345678).
    """
    text = raw.strip()
    if not text:
        raise InvalidRecipient("invalid_msisdn", "empty msisdn")
    if text.startswith("00"):
        text = "+" + text[2:]
    candidates: list[tuple[str, str | None]] = []
    if text.startswith("+"):
        candidates.append((text, None))
    else:
        if default_region:
            candidates.append((text, default_region.upper()))
        if not text.startswith("0"):
            candidates.append(("+" + text, None))
    if not candidates:
        raise InvalidRecipient(
            "invalid_msisdn", f"{raw!r}: national number and no default_region is configured"
        )
    reason = ""
    for candidate, region in candidates:
        quick = _plain_digits_e164(candidate, region)
        if quick is not None:
            return quick
        try:
            number = phonenumbers.parse(candidate, region)
        except phonenumbers.NumberParseException as exc:
            reason = reason or _PARSE_REASONS.get(exc.error_type, "not a phone number")
            continue
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        possible = phonenumbers.is_possible_number_with_reason(number)
        reason = reason or _POSSIBLE_REASONS.get(possible, "not a valid number for its country")
    raise InvalidRecipient("invalid_msisdn", f"{raw!r}: {reason}")


# phonenumbers.parse and is_valid_number are most of a batch's preparation
# (docs/performance.md); a campaign's numbers are almost always plain digits ('+' and country code,
# or national). For those the PhoneNumber that parse would build is built directly when no
# rule of parse could change the digits (no leading zero, no national prefix or carrier
# code, no international prefix, a national number not starting with its own country
# code), and checked against phonenumbers' own metadata with its patterns compiled once
# and the common types tried first. Anything else, and any number found invalid here,
# goes through parse and is_valid_number as before, so the answer is always theirs
# (tests/unit/test_sms.py compares the two on every region's example numbers).


@dataclass(frozen=True, slots=True)
class _Desc:
    """A PhoneNumberDesc: possible lengths (none = any) and its national number pattern."""

    lengths: frozenset[int]
    pattern: re.Pattern[str]

    def matches(self, national: str) -> bool:
        if self.lengths and len(national) not in self.lengths:
            return False
        return self.pattern.fullmatch(national) is not None


def _desc(desc: Any) -> _Desc | None:
    if desc is None or not desc.national_number_pattern:
        return None
    return _Desc(frozenset(desc.possible_length), re.compile(desc.national_number_pattern))


@dataclass(frozen=True, slots=True)
class _Region:
    leading_digits: re.Pattern[str] | None
    general: _Desc | None
    # Every type that makes a number valid (is_valid_number: its type is not UNKNOWN),
    # mobile and fixed line first: the order changes the cost, not the answer.
    kinds: tuple[_Desc, ...]

    @classmethod
    def of(cls, metadata: Any) -> _Region:
        kinds = [metadata.fixed_line]
        if not metadata.same_mobile_and_fixed_line_pattern:
            kinds.insert(0, metadata.mobile)
        kinds += [
            metadata.premium_rate,
            metadata.toll_free,
            metadata.shared_cost,
            metadata.voip,
            metadata.personal_number,
            metadata.pager,
            metadata.uan,
            metadata.voicemail,
        ]
        leading = metadata.leading_digits
        return cls(
            leading_digits=re.compile(leading) if leading is not None else None,
            general=_desc(metadata.general_desc),
            kinds=tuple(d for d in map(_desc, kinds) if d is not None),
        )

    def valid(self, national: str) -> bool:
        if self.general is None or not self.general.matches(national):
            return False
        return any(kind.matches(national) for kind in self.kinds)


@dataclass(frozen=True, slots=True)
class _Country:
    code: int
    prefix: str  # the country code as digits
    national_prefix: re.Pattern[str] | None
    international_prefix: re.Pattern[str] | None
    # The regions sharing the code, as region_code_for_number tries them; one = no choice.
    regions: tuple[_Region, ...]

    def valid(self, national: str) -> bool:
        if len(self.regions) == 1:
            return self.regions[0].valid(national)
        for region in self.regions:
            if region.leading_digits is not None:
                if region.leading_digits.match(national):
                    return region.valid(national)
            elif region.valid(national):
                return True
        return False


@functools.cache
def _country(code: int, region: str) -> _Country | None:
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region)
    if metadata is None:
        return None
    names = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(code, ())
    if len(names) > 1:
        shared = (PhoneMetadata.metadata_for_region(name.upper(), None) for name in names)
        regions = tuple(_Region.of(m) for m in shared if m is not None)
    else:
        regions = (_Region.of(metadata),)
    national = metadata.national_prefix_for_parsing
    international = metadata.international_prefix
    return _Country(
        code=code,
        prefix=str(code),
        national_prefix=re.compile(national) if national else None,
        international_prefix=re.compile(international) if international else None,
        regions=regions,
    )


@functools.cache
def _country_of_region(region: str) -> _Country | None:
    code = phonenumbers.country_code_for_valid_region(region) if region else 0
    return _country(code, region) if code else None


@functools.cache
def _country_of_code(code: int) -> _Country | None:
    if code not in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
        return None
    return _country(code, phonenumbers.region_code_for_country_code(code))


def _plain_digits_e164(candidate: str, region: str | None) -> str | None:
    """E.164 of a valid plain-digit number that parse would take as it is, else None."""
    if region is None:
        digits = candidate[1:]
        # parse reads no country code from digits starting with 0 (int() would drop it).
        if not (digits.isascii() and digits.isdigit()) or digits[0] == "0":
            return None
        country = None
        for length in (1, 2, 3):
            country = _country_of_code(int(digits[:length]))
            if country is not None:
                break
        if country is None:
            return None
        national = digits[len(country.prefix) :]
    else:
        if not (candidate.isascii() and candidate.isdigit()):
            return None
        country = _country_of_region(region)
        if country is None or candidate.startswith(country.prefix):
            return None
        if country.international_prefix and country.international_prefix.match(candidate):
            return None
        national = candidate
    if not 2 <= len(national) <= 17 or national[0] == "0":
        return None
    if country.national_prefix and country.national_prefix.match(national):
        return None
    if not country.valid(national):
        return None
    return "+" + country.prefix + national


def api_msisdn(e164: str, *, plus_prefix: bool) -> str:
    """The msisdn as the API wants it: '+' and digits, or bare digits (the default)."""
    digits = e164.removeprefix("+")
    return "+" + digits if plus_prefix else digits


def _variable_text(name: str, value: Any) -> str:
    # bool is an int: refuse it explicitly rather than sending "True" to a customer.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        kind = "null" if value is None else type(value).__name__
        raise InvalidRecipient("invalid_variable", f"variable {name} is {kind}, not text")
    return str(value)


def substitute(text: str, variables: Mapping[str, Any]) -> str:
    """Replace every `$(name)` with its value in one pass; a missing name is an error.

    Values are not scanned again, so a value holding `$(x)` is sent as written.
    """
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in variables:
            missing.append(name)
            return ""
        return _variable_text(name, variables[name])

    result = _VARIABLE.sub(replace, text)
    if missing:
        names = ", ".join(sorted(set(missing)))
        raise InvalidRecipient("missing_variable", f"missing variable: {names}")
    return result


def link_ids(text: str) -> tuple[str, ...]:
    """The link ids of every `{{link_N}}` in the text, in order, without repeats."""
    return tuple(dict.fromkeys(_LINK.findall(text)))


_GSM7 = GSM7_BASIC | GSM7_EXTENDED


def is_gsm7(text: str) -> bool:
    return _GSM7.issuperset(text)


def _units(text: str, encoding: Encoding) -> list[int]:
    if encoding == "gsm7":
        return [2 if ch in GSM7_EXTENDED else 1 for ch in text]
    return [2 if ord(ch) > 0xFFFF else 1 for ch in text]


def _count_parts(units: Sequence[int], single: int, per_part: int) -> int:
    total = sum(units)
    if total <= single:
        return 1
    # Concatenated parts never split an escape pair or a surrogate pair, so fill greedily.
    parts, used = 1, 0
    for size in units:
        if used + size > per_part:
            parts += 1
            used = 0
        used += size
    return parts


def segments(text: str) -> Segments:
    """Encoding and number of SMS parts of a text."""
    if is_gsm7(text):
        encoding: Encoding = "gsm7"
        single, per_part = GSM7_SINGLE_UNITS, GSM7_PART_UNITS
        simple = GSM7_EXTENDED.isdisjoint(text)
    else:
        encoding = "ucs2"
        single, per_part = UCS2_SINGLE_UNITS, UCS2_PART_UNITS
        simple = max(text) <= "\uffff"
    if simple:
        # Every character is one unit: no pair to keep together, parts are a division.
        units = len(text)
        return Segments(encoding, units, 1 if units <= single else -(-units // per_part))
    sizes = _units(text, encoding)
    return Segments(encoding, sum(sizes), _count_parts(sizes, single, per_part))


def render(body: str, variables: Mapping[str, Any], *, smartlink_length: int = 0) -> Rendered:
    """The text one recipient receives, checked for length, with its encoding and parts.

    The platform replaces each `{{link_N}}` with a short URL: with `smartlink_length` > 0
    parts and encoding are counted as if it had, with a URL of that many characters.
    """
    return _checked(substitute(body, variables) if "$(" in body else body, smartlink_length)


# Texts repeat (a body without variables is the same for every recipient): each distinct
# text is measured once. Rendered is immutable, so sharing it is safe.
@functools.lru_cache(maxsize=4096)
def _checked(text: str, smartlink_length: int = 0) -> Rendered:
    if not text.strip():
        raise InvalidRecipient("empty_text", "the text is empty after substitution")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidRecipient(
            "text_too_long", f"text is {len(text)} characters, the limit is {MAX_TEXT_CHARS}"
        )
    measured = text
    if smartlink_length > 0 and "{{link_" in text:
        # A short URL is plain ASCII, GSM-7 like the placeholder it replaces.
        measured = _LINK.sub("x" * smartlink_length, text)
    seg = segments(measured)
    return Rendered(text=text, encoding=seg.encoding, parts=seg.parts, link_ids=link_ids(text))
