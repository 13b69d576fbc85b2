"""Request bodies for `POST /resources/v1/messaging`, pure.

One batch is one campaign, so everything but the text and the destination is shared.
Destinations with the same text share one message object (its `destination` list holds
each recipient with its own correlation id); a batch with several texts becomes a JSON
array of message objects. The body is encoded once per batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from campaign.sms import InvalidRecipient

MAX_DESTINATIONS = 1000


@dataclass(frozen=True, slots=True)
class MessageSettings:
    """What every message object of one campaign's batch carries."""

    sender_id: str
    priority: int
    template_id: str | None = None
    # linkid as text -> the configured entry, sent back as written ({linkid, validity}).
    smartlinks: Mapping[str, Mapping[str, Any]] | None = None
    expires_at: datetime | None = None
    callback_data: str | None = None
    notify_url: str | None = None


# Per recipient, a thousand per batch: not frozen, whose __init__ is slower (performance.md).
@dataclass(slots=True)
class Destination:
    correlation_id: str
    # Already in the API's form (with or without '+').
    msisdn: str
    # None for template campaigns: the template holds the text.
    text: str | None = None
    ucs2: bool = False
    link_ids: tuple[str, ...] = ()


def parse_smartlinks(raw: Any) -> dict[str, Mapping[str, Any]]:
    """The campaign's smartlinks jsonb (`[{linkid, validity}]`) keyed by linkid as text.

    Entries without a linkid are ignored, so a text referring to them is invalid.
    """
    links: dict[str, Mapping[str, Any]] = {}
    if not isinstance(raw, list):
        return links
    for entry in raw:
        if isinstance(entry, dict) and isinstance(entry.get("linkid"), int | str):
            links[str(entry["linkid"])] = entry
    return links


def check_links(link_ids: Sequence[str], smartlinks: Mapping[str, Any]) -> None:
    """A `{{link_N}}` without a configured smartlink would go out broken: refuse it."""
    if not link_ids:
        return
    missing = [link for link in link_ids if link not in smartlinks]
    if missing:
        names = ", ".join(f"link_{link}" for link in missing)
        raise InvalidRecipient("unknown_smartlink", f"no smartlink configured for {names}")


def format_expiry(moment: datetime) -> str:
    """UTC with milliseconds and an explicit Z (an offset-less expiry's zone is not documented)."""
    if moment.tzinfo is None:
        raise ValueError("expiry must be timezone-aware")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _message(settings: MessageSettings, group: Sequence[Destination]) -> dict[str, Any]:
    first = group[0]
    sms: dict[str, Any] = {}
    if first.text is not None:
        sms["text"] = first.text
    if settings.sender_id:
        sms["senderid"] = settings.sender_id
    if first.ucs2:
        sms["type"] = "4"
    channels: dict[str, Any] = {"sms": sms}
    if first.link_ids:
        links = settings.smartlinks or {}
        channels["smartlinks"] = [links[link] for link in first.link_ids]
    message: dict[str, Any] = {
        "deliverychannel": "sms",
        "channels": channels,
        "destination": [{"msisdn": [d.msisdn], "correlationid": d.correlation_id} for d in group],
        "priority": str(settings.priority),
    }
    if settings.template_id is not None:
        message["message"] = {"template": settings.template_id}
    if settings.expires_at is not None:
        message["expiry"] = format_expiry(settings.expires_at)
    if settings.callback_data:
        message["callbackData"] = settings.callback_data
    if settings.notify_url:
        message["notifyurl"] = settings.notify_url
    return message


def build_body(settings: MessageSettings, destinations: Sequence[Destination]) -> bytes:
    """The encoded request: one message object when the text is uniform, else an array."""
    if not destinations:
        raise ValueError("a request needs at least one destination")
    if len(destinations) > MAX_DESTINATIONS:
        raise ValueError(f"{len(destinations)} destinations; the API takes {MAX_DESTINATIONS}")
    if settings.priority not in (1, 2, 3):
        raise ValueError(f"priority {settings.priority} is not 1, 2 or 3")
    smartlinks = settings.smartlinks or {}
    for d in destinations:
        check_links(d.link_ids, smartlinks)
    groups: dict[str | None, list[Destination]] = {}
    for d in destinations:
        groups.setdefault(d.text, []).append(d)
    messages = [_message(settings, group) for group in groups.values()]
    return orjson.dumps(messages[0] if len(messages) == 1 else messages)
