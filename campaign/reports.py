"""Delivery reports (DR) and incoming messages (MO), pure: parsing, the code table, opt-outs.

Parsers take the raw request body and either return frozen dataclasses or raise
`ParseError` with a reason an operator can read; they never raise anything else, whatever
JSON arrives. Field names are matched case-insensitively (`Description` / `description`,
`timeStamp` / `timestamp`), because the platform's payloads vary between versions.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any, Literal, TypeVar

import orjson

from campaign import sms
from campaign.config import ServiceSettings
from campaign.statuses import RecipientStatus

_Item = TypeVar("_Item")

# The code -> recipient status table, the only place it exists. The reconciler passes it
# to its SQL as parameters. `queued` marks an interim report: the message is on its way,
# the recipient keeps waiting for a final one.
DELIVERED: RecipientStatus = "delivered"
EXPIRED: RecipientStatus = "expired"
FAILED: RecipientStatus = "failed"
INTERIM: RecipientStatus = "queued"
CODE_STATUS: Mapping[str, RecipientStatus] = {"7500": DELIVERED, "7208": EXPIRED, "7501": INTERIM}
# Every code not in the table is a final failure (7004, 7101, 7201, ... and any new one).
OTHER_CODE_STATUS = FAILED

OptOutAction = Literal["opt_out", "opt_in"]

# Text columns cannot hold NUL; a body carrying one would fail the whole group's INSERT.
_NUL = "\x00"
_MAX_INT4 = 2**31 - 1
# orjson, which writes the raw jsonb column, refuses deeper nesting ("Recursion limit
# reached"); the top level counts as one.
MAX_DEPTH = 254
_E164_DIGITS = re.compile(r"^\+?([1-9][0-9]{6,14})$")
# Epoch numbers above this are milliseconds (1e11 seconds is the year 5138).
_EPOCH_MS_THRESHOLD = 100_000_000_000


class ParseError(ValueError):
    """A body that cannot be stored as reports or messages; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# One per report, thousands a second: not frozen, whose __init__ is slower (performance.md).
@dataclass(slots=True)
class DeliveryReport:
    transid: str | None
    correlation_id: str | None
    code: str
    delivery_status: str | None
    description: str | None
    destination: str | None
    reported_at: datetime | None
    callback_data: str | None
    message_count: int | None
    carrier: str | None
    subtid: str | None
    additional_info: Any
    # The notification object as received, kept in delivery_reports.raw.
    raw: Mapping[str, Any]

    @property
    def dedup_key(self) -> tuple[str, str, str, str]:
        """The stored identity (transid, correlation_id, code, reported_at), as strings for
        sorting: the columns of delivery_reports_dedup_key."""
        at = self.reported_at.isoformat() if self.reported_at else ""
        return (self.transid or "", self.correlation_id or "", self.code, at)


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    oa: str
    da: str | None
    message: str
    tid: str | None
    user_id: str | None
    channel: str | None
    # The platform's `datetime` as sent: its format and zone are not documented.
    sent_at: str | None
    raw: Mapping[str, Any]


def status_for_code(code: str) -> str:
    """The recipient status a report code leads to; `queued` means interim."""
    return CODE_STATUS.get(code, OTHER_CODE_STATUS)


def is_final(code: str) -> bool:
    return status_for_code(code) != INTERIM


def parse_delivery_reports(body: bytes, *, zone: tzinfo = UTC) -> list[DeliveryReport]:
    """One DR notification or a JSON array of them; all of them or ParseError.

    `zone` is the zone of a `timeStamp` without an offset ([webhooks] report_timezone):
    the documented sample has none, and a tenant outside UTC may send local time.
    """
    return _parse_all(body, lambda item: _delivery_report(item, zone))


def parse_incoming_messages(body: bytes) -> list[IncomingMessage]:
    """One MO or a JSON array of them; all of them or ParseError."""
    return _parse_all(body, _incoming_message)


def _parse_all(body: bytes, parse_one: Callable[[Any], _Item]) -> list[_Item]:
    items = _items(body)
    parsed = []
    for index, item in enumerate(items):
        try:
            parsed.append(parse_one(item))
        except ParseError as exc:
            where = f"item {index}: " if len(items) > 1 else ""
            raise ParseError(f"{where}{exc.reason}") from None
    return parsed


def optout_action(
    message: str, *, stop_keywords: Iterable[str], start_keywords: Iterable[str]
) -> OptOutAction | None:
    """`opt_out` / `opt_in` when the first word is a keyword (any case), else None.

    Punctuation around the word is ignored, so "Stop." and "STOP!" count; "stopping" does not.
    """
    words = message.split(maxsplit=1)
    if not words:
        return None
    word = words[0].strip(".,;:!?'\"()[]{}-_*").casefold()
    if not word:
        return None
    if word in {k.casefold() for k in stop_keywords}:
        return "opt_out"
    if word in {k.casefold() for k in start_keywords}:
        return "opt_in"
    return None


@dataclass(frozen=True, slots=True)
class OptOutRegions:
    """The region whose national numbers an MO's `oa` may be written in.

    The producer reads a service's recipients with its `default_region`; an opt-out must
    read the number the same way or it suppresses a number no recipient has. An MO names
    the short code it was sent to (`da`): the service whose `sender_id` that is gives the
    region; failing that, the one region every service that sets one agrees on; else none.
    """

    by_da: Mapping[str, str] = field(default_factory=dict)
    fallback: str = ""

    @classmethod
    def from_services(cls, services: Iterable[ServiceSettings]) -> OptOutRegions:
        with_region = [s for s in services if s.default_region]
        by_da = {_short_code(s.sender_id): s.default_region for s in with_region if s.sender_id}
        regions = {s.default_region.upper() for s in with_region}
        return cls(by_da=by_da, fallback=regions.pop() if len(regions) == 1 else "")

    def region_for(self, da: str | None) -> str:
        return self.by_da.get(_short_code(da or ""), self.fallback)


def _short_code(value: str) -> str:
    """'+1 555 0100', '15550100' and '15550100 ' name one number; a sender name any case."""
    return "".join(value.split()).lstrip("+").casefold()


def normalise_oa(oa: str, *, default_region: str = "") -> str | None:
    """The sender of an MO as E.164 with '+', the form campaign.suppressions holds.

    Uses the sending pipeline's normaliser, with the region the producer uses for the
    service, so a suppression matches the recipients' msisdn_e164; a number it refuses
    (phonenumbers' metadata may lag new ranges) is still kept as '+digits' when it looks
    like E.164, because losing an opt-out is the worse error. None when `oa` is not a phone
    number at all (a short code, an alphanumeric sender, a national number and no region).
    """
    try:
        return sms.normalise_msisdn(oa, default_region=default_region)
    except ValueError:
        pass
    match = _E164_DIGITS.match(oa.strip().replace(" ", ""))
    return "+" + match.group(1) if match else None


def _items(body: bytes) -> list[Mapping[str, Any]]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ParseError(f"not valid JSON: {exc}") from None
    items = data if isinstance(data, list) else [data]
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ParseError(f"item {index}: expected a JSON object, got {_kind(item)}")
    # JSON can only carry a NUL escaped (orjson refuses a raw one), so a body without the
    # escape needs no walk through every string.
    if b"\\u0000" in body and _has_nul(data):
        raise ParseError("a string holds a NUL character")
    # Nesting cannot exceed the number of brackets: most bodies need no check at all.
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH:
        try:
            orjson.dumps(data)
        except orjson.JSONEncodeError:
            raise ParseError(f"nested deeper than {MAX_DEPTH} levels: cannot be stored") from None
    return items


def _delivery_report(item: Mapping[str, Any], zone: tzinfo) -> DeliveryReport:
    top = _folded(item)
    notification = top.get("deliveryinfonotification")
    if not isinstance(notification, dict):
        raise ParseError("deliveryInfoNotification: missing or not an object")
    outer = _folded(notification)
    info_value = outer.get("deliveryinfo")
    if not isinstance(info_value, dict):
        raise ParseError("deliveryInfo: missing or not an object")
    info = _folded(info_value)

    def pick(key: str) -> Any:
        # Fields documented at one level have been seen at the other; the outer one wins.
        value = outer.get(key)
        return info.get(key) if value is None else value

    code = _text(info.get("code"), "code")
    if not code:
        raise ParseError("deliveryInfo.code: missing")
    transid = _text(pick("transid"), "transid")
    correlation_id = _text(pick("correlationid"), "correlationid")
    if not transid and not correlation_id:
        raise ParseError("neither transid nor correlationid: the report cannot be matched")
    return DeliveryReport(
        transid=transid or None,
        correlation_id=correlation_id or None,
        code=code,
        delivery_status=_text(info.get("deliverystatus"), "deliveryStatus"),
        description=_text(info.get("description"), "description"),
        destination=_text(info.get("destination"), "destination"),
        reported_at=_timestamp(info.get("timestamp"), "timeStamp", zone),
        callback_data=_text(pick("callbackdata"), "callbackData"),
        message_count=_count(pick("messagecount")),
        carrier=_loose_text(pick("carrier")),
        subtid=_loose_text(pick("subtid")),
        additional_info=pick("additionalinfo"),
        raw=item,
    )


def _incoming_message(item: Mapping[str, Any]) -> IncomingMessage:
    fields = _folded(item)
    oa = _text(fields.get("oa"), "oa")
    if not oa:
        raise ParseError("oa: missing")
    return IncomingMessage(
        oa=oa,
        da=_text(fields.get("da"), "da"),
        message=_text(fields.get("message"), "message") or "",
        tid=_text(fields.get("tid"), "tid") or None,
        user_id=_text(fields.get("userid"), "userId"),
        channel=_text(fields.get("channel"), "channel"),
        sent_at=_text(fields.get("datetime"), "datetime"),
        raw=item,
    )


def _folded(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {key.casefold(): value for key, value in obj.items()}


def _text(value: Any, name: str) -> str | None:
    """A field the reconciler or an operator relies on: text or a number, else an error."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ParseError(f"{name}: expected text, got {_kind(value)}")


def _loose_text(value: Any) -> str | None:
    """An informational field: an odd value is dropped (raw keeps it), never an error."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _count(value: Any) -> int | None:
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_INT4:
        return value
    return None


def _timestamp(value: Any, name: str, zone: tzinfo = UTC) -> datetime | None:
    """ISO 8601 with or without an offset (none means `zone`), or epoch seconds /
    milliseconds; returned in UTC."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = value / 1000 if abs(value) >= _EPOCH_MS_THRESHOLD else value
            return datetime.fromtimestamp(seconds, UTC)
        if isinstance(value, str):
            text = value.strip()
            if text.isdecimal():
                return _timestamp(int(text), name)
            return _iso_utc(text, zone)
    except (ValueError, OverflowError, OSError):
        raise ParseError(f"{name}: not a timestamp: {str(value)[:64]!r}") from None
    raise ParseError(f"{name}: expected a timestamp, got {_kind(value)}")


@functools.lru_cache(maxsize=4096)
def _iso_utc(text: str, zone: tzinfo) -> datetime:
    """An ISO 8601 timestamp in UTC. Cached: reports of one burst share their seconds."""
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone)
    return parsed.astimezone(UTC)


def _has_nul(data: Any) -> bool:
    # A loop, not recursion: orjson parses ~1000 levels, deeper than Python's stack allows
    # a recursive walk (a RecursionError here was a 500 and a body never kept).
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if _NUL in value:
                return True
        elif isinstance(value, dict):
            for key, item in value.items():
                if _NUL in key:
                    return True
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
    return False


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "text"
    return "a number"
