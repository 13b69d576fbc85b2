"""Request validation: one pass over a decoded body, rejecting as the API does."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

from campaign.simulator.api import (
    _DESTINATION_MANDATORY,
    _MAX_CALLBACK_DATA_CHARS,
    _MAX_CORRELATION_BYTES,
    _MAX_TEXT_CHARS,
    _MSISDN,
    _PRIORITIES,
    _SMARTLINK_REF,
    _SMS_TYPES,
)
from campaign.simulator.parts import sms_parts
from campaign.simulator.timestamps import parse_expiry


class RequestError(Exception):
    """A whole request rejected with one API code (HTTP 200, single `response` object)."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(code, description)
        self.code = code
        self.description = description


class _Context(NamedTuple):
    """What every report of one message object shares."""

    url: str
    callback_data: str | None
    message_count: int


class _MessagePlan(NamedTuple):
    context: _Context
    # (msisdn, correlation id, valid) per destination, in request order.
    destinations: list[tuple[str, str | None, bool]]


def _optional_str(message: Mapping[str, Any], key: str) -> str | None:
    """An optional string field: absent, null and "" all mean "not given"."""
    value = message.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RequestError("7004", f"Invalid parameters: {key}")
    return value


def parse_messages(
    data: Any,
    *,
    templates: frozenset[str],
    max_destinations: int,
    require_plus: bool,
    default_notify_url: str,
    now: datetime,
    count_parts: bool = False,
) -> tuple[list[_MessagePlan], int, int]:
    """Validate a decoded request body; returns plans, destinations and valid destinations.

    Raises RequestError for what rejects the whole request, as the API does. SMS parts
    (for the optional messageCount of reports) are counted only when `count_parts`.
    """
    if isinstance(data, dict):
        messages: list[Any] = [data]
    elif isinstance(data, list) and data:
        messages = data
    else:
        raise RequestError("7000", "Invalid JSON")
    plans: list[_MessagePlan] = []
    total = 0
    valid = 0
    for message in messages:
        if not isinstance(message, dict):
            raise RequestError("7000", "Invalid JSON")
        context = _check_message(
            message,
            templates=templates,
            now=now,
            default=default_notify_url,
            count_parts=count_parts,
        )
        destinations = message.get("destination")
        if not isinstance(destinations, list) or not destinations:
            raise RequestError("7003", _DESTINATION_MANDATORY)
        top_correlation = _optional_str(message, "correlationid")
        if top_correlation is not None and len(top_correlation.encode()) > _MAX_CORRELATION_BYTES:
            raise RequestError("7004", "Invalid parameters: correlationid exceeds 50 bytes")
        rows: list[tuple[str, str | None, bool]] = []
        for entry in destinations:
            if not isinstance(entry, dict):
                raise RequestError("7003", _DESTINATION_MANDATORY)
            msisdns = entry.get("msisdn")
            if not isinstance(msisdns, list) or not msisdns:
                raise RequestError("7003", _DESTINATION_MANDATORY)
            correlation = _optional_str(entry, "correlationid") or top_correlation
            if correlation is not None and len(correlation.encode()) > _MAX_CORRELATION_BYTES:
                raise RequestError("7004", "Invalid parameters: correlationid exceeds 50 bytes")
            for msisdn in msisdns:
                if isinstance(msisdn, int) and not isinstance(msisdn, bool):
                    msisdn = str(msisdn)
                if not isinstance(msisdn, str) or not msisdn:
                    raise RequestError("7003", _DESTINATION_MANDATORY)
                ok = _MSISDN.fullmatch(msisdn) is not None and (
                    not require_plus or msisdn[0] == "+"
                )
                rows.append((msisdn, correlation, ok))
                valid += ok
        total += len(rows)
        plans.append(_MessagePlan(context, rows))
    if total > max_destinations:
        raise RequestError("7009", f"Destinations exceed the limit of {max_destinations}")
    return plans, total, valid


def _check_message(
    message: Mapping[str, Any],
    *,
    templates: frozenset[str],
    now: datetime,
    default: str,
    count_parts: bool,
) -> _Context:
    channel = message.get("deliverychannel")
    if channel is None or channel == "":
        raise RequestError("7003", "param 'deliverychannel' missing")
    if not isinstance(channel, str) or channel.lower() != "sms":
        raise RequestError("7004", "Invalid parameters: deliverychannel")
    channels = message.get("channels")
    if not isinstance(channels, dict):
        raise RequestError("7003", "param 'channels' missing for channel sms")
    sms = channels.get("sms")
    if not isinstance(sms, dict):
        raise RequestError("7003", "param 'sms' missing for channel sms")

    template = None
    body = message.get("message")
    if body is not None and body != "":
        if not isinstance(body, dict):
            raise RequestError("7004", "Invalid parameters: message")
        raw_template = body.get("template")
        if raw_template is not None and raw_template != "":
            template = str(raw_template)
            if template not in templates:
                raise RequestError("7108", "Invalid template id")
    text = sms.get("text")
    if template is None and (text is None or text == ""):
        raise RequestError("7003", "param 'text' missing for channel sms")
    if text is not None and not isinstance(text, str):
        raise RequestError("7004", "Invalid parameters: text")
    text = text or ""
    if len(text) > _MAX_TEXT_CHARS:
        raise RequestError("7004", "Invalid parameters: text exceeds 1024 characters")
    sms_type = sms.get("type")
    if sms_type is not None and sms_type != "" and str(sms_type) not in _SMS_TYPES:
        raise RequestError("7004", "Invalid parameters: type")
    _check_smartlinks(text, channels.get("smartlinks"))

    priority = message.get("priority")
    if priority not in (None, "") and (
        isinstance(priority, bool) or str(priority) not in _PRIORITIES
    ):
        raise RequestError("7004", "Invalid parameters: priority")
    expiry_text = _optional_str(message, "expiry")
    if expiry_text is not None:
        expiry = parse_expiry(expiry_text)
        if expiry is None:
            raise RequestError("7004", "Invalid parameters: expiry")
        if expiry <= now:
            raise RequestError("7005", "Request expired")
    url = _optional_str(message, "notifyurl") or default
    if url and not url.startswith(("http://", "https://")):
        raise RequestError("7004", "Invalid parameters: notifyurl")
    callback_data = _optional_str(message, "callbackData")
    if callback_data is not None and len(callback_data) > _MAX_CALLBACK_DATA_CHARS:
        raise RequestError("7004", "Invalid parameters: callbackData exceeds 2000 characters")
    return _Context(url, callback_data, sms_parts(text) if count_parts and text else 1)


def _check_smartlinks(text: str, smartlinks: Any) -> None:
    referenced = set(_SMARTLINK_REF.findall(text))
    if smartlinks is None or smartlinks == "":
        smartlinks = []
    if not isinstance(smartlinks, list):
        raise RequestError("7004", "Invalid parameters: smartlinks")
    defined = set()
    for link in smartlinks:
        if not isinstance(link, dict) or link.get("linkid") in (None, ""):
            raise RequestError("7004", "Invalid parameters: smartlinks")
        validity = link.get("validity")
        if validity is not None and (
            isinstance(validity, bool) or not isinstance(validity, int | str)
        ):
            raise RequestError("7004", "Invalid parameters: smartlinks validity")
        defined.add(str(link["linkid"]))
    missing = sorted(referenced - defined)
    if missing:
        raise RequestError("7004", f"Invalid parameters: smartlink {missing[0]} not defined")


def count_destinations(data: Any) -> int:
    """Destinations in a body, counted leniently (for the stats of a rejected request)."""
    messages = data if isinstance(data, list) else [data]
    count = 0
    for message in messages:
        destinations = message.get("destination") if isinstance(message, dict) else None
        for entry in destinations if isinstance(destinations, list) else ():
            msisdns = entry.get("msisdn") if isinstance(entry, dict) else None
            count += len(msisdns) if isinstance(msisdns, list) else 0
    return count
