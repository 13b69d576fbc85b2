"""SMS text and number rules, pure: msisdn normalisation, `$(var)` substitution,
smartlink references, GSM-7 / UCS-2 detection and part counting.

Every check that makes a recipient unsendable raises `InvalidRecipient` with a short
machine code (kept in recipients.error_code) and a sentence for people (error_message).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import phonenumbers

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


def is_gsm7(text: str) -> bool:
    return all(ch in GSM7_BASIC or ch in GSM7_EXTENDED for ch in text)


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
        units = _units(text, "gsm7")
        return Segments("gsm7", sum(units), _count_parts(units, GSM7_SINGLE_UNITS, GSM7_PART_UNITS))
    units = _units(text, "ucs2")
    return Segments("ucs2", sum(units), _count_parts(units, UCS2_SINGLE_UNITS, UCS2_PART_UNITS))


def render(body: str, variables: Mapping[str, Any]) -> Rendered:
    """The text one recipient receives, checked for length, with its encoding and parts."""
    text = substitute(body, variables)
    if not text.strip():
        raise InvalidRecipient("empty_text", "the text is empty after substitution")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidRecipient(
            "text_too_long", f"text is {len(text)} characters, the limit is {MAX_TEXT_CHARS}"
        )
    seg = segments(text)
    return Rendered(text=text, encoding=seg.encoding, parts=seg.parts, link_ids=link_ids(text))
