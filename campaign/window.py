"""The sending window in the recipient's local time: pure, with the clock passed in.

A window is a range of local wall-clock times [start, end); one whose end is before its
start wraps midnight (22:00-06:00). A number's zones come from phonenumbers' time zone
data for its prefix; a prefix that spans several zones (a US number without a more
precise area code, Russia, Australia ...) is open only when the window is open in every
zone the recipient may be in, so nobody is woken whichever zone they are really in.
Local times are computed with zoneinfo, so daylight-saving changes are honoured.
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import phonenumbers
from phonenumbers import timezone as phone_timezone
from phonenumbers.tzdata import TIMEZONE_DATA, TIMEZONE_LONGEST_PREFIX

# phonenumbers' answer when its data has no zone for a number.
UNKNOWN_ZONE = "Etc/Unknown"
# How far ahead an opening is looked for: a window open at least once a day in every zone
# of a number opens within two days, so eight days is a margin, not a limit in practice.
HORIZON_DAYS = 8
_WINDOW = re.compile(r"^\s*(\d{1,2}:\d{2})\s*-\s*(\d{1,2}:\d{2})\s*$")


class WindowError(ValueError):
    """A window written wrongly ('09:00-21:00' is right)."""


@dataclass(frozen=True, slots=True)
class Window:
    """Allowed local times [start, end); end < start wraps midnight; start == end is refused."""

    start: time
    end: time

    def __post_init__(self) -> None:
        if self.start == self.end:
            raise WindowError(f"a window from {self.start:%H:%M} to itself is empty")

    @classmethod
    def parse(cls, text: str) -> Window | None:
        """'09:00-21:00' -> a Window; '' -> None (no window)."""
        if not text.strip():
            return None
        match = _WINDOW.match(text)
        if match is None:
            raise WindowError(f"{text!r} is not a window like '09:00-21:00'")
        try:
            start, end = (time.fromisoformat(part.zfill(5)) for part in match.groups())
        except ValueError:
            raise WindowError(f"{text!r} holds a time that does not exist") from None
        return cls(start, end)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def contains(self, local: time) -> bool:
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def is_open(self, zone: zoneinfo.ZoneInfo, at: datetime) -> bool:
        """Whether the window is open in `zone` at the instant `at` (an aware datetime)."""
        return self.contains(at.astimezone(zone).time().replace(tzinfo=None))

    def openings(self, zone: zoneinfo.ZoneInfo, after: datetime) -> Iterable[datetime]:
        """The instants (UTC) the window opens in `zone` from the day before `after` on."""
        first = after.astimezone(zone).date() - timedelta(days=1)
        for offset in range(HORIZON_DAYS + 1):
            day: date = first + timedelta(days=offset)
            yield _first_instant(datetime.combine(day, self.start, tzinfo=zone))


def _first_instant(local: datetime) -> datetime:
    """The first UTC instant at which the wall clock of `local`'s zone reads `local` or later.

    A time inside a spring-forward gap never appears on the clock: the window then opens
    when the gap ends (the clock jumps from before the start to after it).
    """
    later = local.astimezone(UTC)
    if later.astimezone(local.tzinfo).replace(tzinfo=None) == local.replace(tzinfo=None):
        return later
    # In the gap: fold=0 reads the time with the offset before the change (an instant
    # after it), fold=1 with the offset after the change (an instant before it). The
    # change lies between the two; find it to the second.
    earlier = local.replace(fold=1).astimezone(UTC)
    low, high = min(earlier, later), max(earlier, later)
    after = high.astimezone(local.tzinfo).utcoffset()
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(local.tzinfo).utcoffset() == after:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0)


@functools.lru_cache(maxsize=4096)
def zone(name: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(name)


def zones_of(e164: str, default_timezone: str = "UTC") -> tuple[str, ...]:
    """The IANA zones a valid E.164 number may be in (phonenumbers' data), else
    `default_timezone`.

    Names the running system's zoneinfo does not know are dropped (an old tzdata); a
    number left with none takes the default. Most countries have one answer for every
    number (India, Germany, France ...): those are answered from the country calling code
    alone, without parsing the number (which cost about 50 us a number, most of a batch's
    time with a sending window on); the others are parsed and looked up by prefix.
    """
    country = _country_code(e164)
    if country is not None:
        zones = _country_zones(country)
        if zones is not None:
            return _usable(zones, default_timezone)
    return _zones_of_parsed(e164, default_timezone)


@functools.lru_cache(maxsize=65_536)
def _zones_of_parsed(e164: str, default_timezone: str = "UTC") -> tuple[str, ...]:
    """zones_of the long way: parse the number, then phonenumbers' own lookup (by its type
    and its longest prefix in the time zone data)."""
    try:
        number = phonenumbers.parse(e164)
    except phonenumbers.NumberParseException:
        return (default_timezone,)
    return _usable(tuple(phone_timezone.time_zones_for_number(number)), default_timezone)


def _usable(zones: tuple[str, ...], default_timezone: str) -> tuple[str, ...]:
    names = tuple(name for name in zones if name != UNKNOWN_ZONE and _known(name))
    return names or (default_timezone,)


def _country_code(e164: str) -> str | None:
    """The calling code of '+<digits>' (codes are prefix-free: 1 to 3 digits), or None."""
    if not e164.startswith("+"):
        return None
    for length in (1, 2, 3):
        code = e164[1 : 1 + length]
        if code.isdigit() and int(code) in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            return code
    return None


@functools.lru_cache(maxsize=512)
def _country_zones(country: str) -> tuple[str, ...] | None:
    """The zones of every valid number with this calling code, when they are all the same;
    None when they depend on the number. phonenumbers answers a number with the entry of
    its longest prefix in TIMEZONE_DATA (a geographic number), or of its country code alone
    (any other type); so when every entry under the code, and the code's own answer, agree,
    that is every number's answer."""
    answers = {zones for prefix, zones in TIMEZONE_DATA.items() if prefix.startswith(country)}
    answers.add(_longest_prefix_entry(country))
    return answers.pop() if len(answers) == 1 else None


def _longest_prefix_entry(digits: str) -> tuple[str, ...]:
    for length in range(min(TIMEZONE_LONGEST_PREFIX, len(digits)), 0, -1):
        zones = TIMEZONE_DATA.get(digits[:length])
        if zones is not None:
            return tuple(zones)
    return (UNKNOWN_ZONE,)


@functools.lru_cache(maxsize=1024)
def _known(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def next_opening(window: Window, zones: Sequence[str], now: datetime) -> datetime | None:
    """The first instant at or after `now` (UTC) when the window is open in every zone.

    `now` when it is open already; None when the zones' windows never overlap (a window
    shorter than the spread of the zones' offsets). The intersection of the zones' open
    intervals starts either now or at one zone's opening, so those are the only
    candidates to test.
    """
    infos = [zone(name) for name in zones]
    if all(window.is_open(z, now) for z in infos):
        return now
    candidates = sorted({t for z in infos for t in window.openings(z, now) if t > now})
    for candidate in candidates:
        if all(window.is_open(z, candidate) for z in infos):
            return candidate
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    """A number's window now: send, wait until `opens_at`, or never in the horizon."""

    zones: tuple[str, ...]
    opens_at: datetime | None

    def is_open(self, now: datetime) -> bool:
        return self.opens_at is not None and self.opens_at <= now


class Planner:
    """Decisions for one batch at one instant, cached per set of zones (a batch holds few)."""

    def __init__(self, window: Window, *, default_timezone: str, now: datetime) -> None:
        self.window = window
        self.now = now
        self._default_timezone = default_timezone
        self._by_zones: dict[tuple[str, ...], datetime | None] = {}

    def decide(self, e164: str) -> Decision:
        zones = zones_of(e164, self._default_timezone)
        if zones not in self._by_zones:
            self._by_zones[zones] = next_opening(self.window, zones, self.now)
        return Decision(zones, self._by_zones[zones])
