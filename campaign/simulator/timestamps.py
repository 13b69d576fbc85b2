"""Timestamps as the API writes them (reports, MO) and reads them (`expiry`)."""

from __future__ import annotations

import functools
import re
import time
from datetime import UTC, datetime, timedelta, timezone, tzinfo

_OFFSET = re.compile(r"([+-])(\d{1,2}):?(\d{2})")
_EXPIRY = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(Z|[+-]\d{1,2}:?\d{2})?"
)


@functools.lru_cache(maxsize=64)
def _offset_parts(offset: str) -> tuple[int, str]:
    """Seconds east of UTC and the canonical `+HH:MM` text of an offset."""
    match = _OFFSET.fullmatch(offset)
    if match is None:
        raise ValueError(f"bad offset {offset!r}")
    sign = -1 if match.group(1) == "-" else 1
    hours, minutes = int(match.group(2)), int(match.group(3))
    return sign * (hours * 3600 + minutes * 60), f"{match.group(1)}{hours:02d}:{minutes:02d}"


@functools.lru_cache(maxsize=4096)
def _second_text(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def format_timestamp(epoch_s: float, offset: str = "", *, zone: tzinfo | None = None) -> str:
    """`2016-07-20T17:13:17.908` in UTC, or local to `offset` with the offset appended, or
    (no offset given) local to `zone` without one, as a tenant outside UTC may send."""
    if offset:
        shift, suffix = _offset_parts(offset)
    elif zone is not None:
        local = datetime.fromtimestamp(epoch_s, zone).utcoffset()
        shift, suffix = (int(local.total_seconds()) if local else 0), ""
    else:
        shift, suffix = 0, ""
    second, millis = divmod(round((epoch_s + shift) * 1000), 1000)
    return f"{_second_text(second)}.{millis:03d}{suffix}"


def parse_expiry(value: str) -> datetime | None:
    """An `expiry` as the API takes it (no zone means UTC); None when it is not one."""
    match = _EXPIRY.fullmatch(value.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    fraction = match.group(7)
    micro = int((fraction[1:] + "000000")[:6]) if fraction else 0
    zone_text = match.group(8)
    zone: timezone = UTC
    if zone_text and zone_text != "Z":
        zone_match = _OFFSET.fullmatch(zone_text)
        if zone_match is None:
            return None
        hours, minutes = int(zone_match.group(2)), int(zone_match.group(3))
        if hours > 23 or minutes > 59:
            return None
        sign = -1 if zone_match.group(1) == "-" else 1
        zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=zone)
    except ValueError:
        return None
