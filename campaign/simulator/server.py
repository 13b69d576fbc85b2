"""`campaign simulate`: a fault-injecting simulator of the IMIconnect messaging API v1.

It answers `POST /resources/v1/messaging` as the real API does (HTTP 200 with a single
`response` object for errors, a list with one item per destination on success), limits
destinations per key with a token bucket, later POSTs delivery reports to each request's
`notifyurl` (retrying failed callbacks), sends MOs on demand, injects faults on a
probability or a schedule, and counts everything it accepted at `GET /simulate/stats`.

The accept path is the hot one (100,000+ destinations/s in 1000-destination requests):
counters instead of per-destination records, one validation pass and one accept pass per
request, reports scheduled in time buckets and POSTed over a bounded connection pool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import heapq
import itertools
import math
import random
import re
import signal
import time
import tomllib
import typing
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import aiohttp
import orjson
import structlog
from aiohttp import web

from campaign import config as campaign_config

log = structlog.get_logger("campaign.simulator")

MESSAGING_PATH = "/resources/v1/messaging"
STATS_PATH = "/simulate/stats"
MO_PATH = "/simulate/mo"
RESET_PATH = "/simulate/reset"

# Delivery report codes: (deliveryStatus, Description). The simulator words platform-side
# rejections "Failed" and handset / network outcomes "Un-Delivered" (the documentation
# shows both statuses without saying which code gets which).
DR_CODES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "7500": ("Delivered", "Delivered"),
        "7501": ("Submitted", "Submitted"),
        "7004": ("Failed", "Invalid parameters"),
        "7006": ("Failed", "Internal error"),
        "7101": ("Failed", "Invalid sender id"),
        "7102": ("Failed", "Invalid address"),
        "7107": ("Failed", "Message too long"),
        "7109": ("Failed", "Recipient on do-not-disturb list"),
        "7201": ("Un-Delivered", "Failed at operator"),
        "7202": ("Failed", "Failed at platform"),
        "7203": ("Un-Delivered", "Unknown subscriber"),
        "7204": ("Un-Delivered", "No prepaid credit"),
        "7205": ("Failed", "Binary message error"),
        "7206": ("Un-Delivered", "SIM full"),
        "7207": ("Un-Delivered", "Out of coverage"),
        "7208": ("Un-Delivered", "Message expired"),
        "7209": ("Un-Delivered", "Part of multipart failed"),
        "7210": ("Failed", "Billing error"),
        "7211": ("Failed", "Billing error"),
    }
)
INTERIM_CODE = "7501"

# Faults decided once per request, and faults decided per delivery report.
REQUEST_FAULTS = (
    "http_500",
    "error_7006",
    "slow_response",
    "drop_connection",
    "report_before_response",
)
REPORT_FAULTS = (
    "duplicate_report",
    "out_of_order",
    "unknown_transid",
    "timestamp_offset",
    "timestamp_missing",
    "lost_report",
)
# Faults that read `delay_s`: how long the response is held, how late the copy is sent.
_DELAY_FAULTS = {"slow_response", "duplicate_report"}

_DESTINATION_MANDATORY = (
    "any one of [customerid,msisdn,email, userid,pushid,psid, twitterid, wechatid] is mandatory"
)
_MSISDN = re.compile(r"\+?[1-9][0-9]{6,14}")
_SMARTLINK_REF = re.compile(r"\{\{link_([A-Za-z0-9_]+)\}\}")
_OFFSET = re.compile(r"([+-])(\d{1,2}):?(\d{2})")
_EXPIRY = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(Z|[+-]\d{1,2}:?\d{2})?"
)
_SMS_TYPES = {"1", "3", "4"}
_PRIORITIES = {"1", "2", "3"}
_JSON_HEADERS = {"Content-Type": "application/json"}
_MAX_TEXT_CHARS = 1024
_MAX_CORRELATION_BYTES = 50
_MAX_CALLBACK_DATA_CHARS = 2000

_GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED = set("^{}\\[~]|€\f")


class SimulatorConfigError(campaign_config.ConfigError):
    """A simulator configuration problem, naming the key."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """When a fault fires: within the schedule (all requests when none), with `probability`.

    `requests` is an inclusive range of request numbers (1 = the first messaging request
    since start); `between_s` a range of seconds since start, end excluded.
    """

    probability: float = 0.0
    requests: tuple[int, int] | None = None
    between_s: tuple[float, float] | None = None
    delay_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.probability > 0.0

    def applies(self, request_no: int, elapsed_s: float) -> float:
        """The probability in force for this request: 0 outside the schedule."""
        if self.probability <= 0.0:
            return 0.0
        if self.requests is not None and not self.requests[0] <= request_no <= self.requests[1]:
            return 0.0
        if self.between_s is not None and not self.between_s[0] <= elapsed_s < self.between_s[1]:
            return 0.0
        return self.probability


@dataclass(frozen=True, slots=True)
class Faults:
    """Every injectable fault; all disabled by default."""

    http_500: FaultSpec = FaultSpec()
    error_7006: FaultSpec = FaultSpec()
    slow_response: FaultSpec = FaultSpec(delay_s=30.0)
    drop_connection: FaultSpec = FaultSpec()
    report_before_response: FaultSpec = FaultSpec()
    duplicate_report: FaultSpec = FaultSpec(delay_s=0.0)
    out_of_order: FaultSpec = FaultSpec()
    unknown_transid: FaultSpec = FaultSpec()
    timestamp_offset: FaultSpec = FaultSpec()
    timestamp_missing: FaultSpec = FaultSpec()
    lost_report: FaultSpec = FaultSpec()


def _default_outcomes() -> Mapping[str, float]:
    return MappingProxyType({"7500": 1.0})


def _empty_codes() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Every knob of the simulator. Validated on construction; see docs/simulator.md."""

    # Accepted service keys (the `key` header). Empty: any non-empty key is accepted.
    keys: tuple[str, ...] = ("sim-key",)
    # Keys answered 7007 "service inactive".
    inactive_keys: tuple[str, ...] = ()
    # Destinations per second per key (token bucket); 0 means unlimited.
    rate_per_s: float = 0.0
    # Bucket size in seconds of rate: a request may take up to rate_per_s * burst_s at once.
    burst_s: float = 1.0
    # Over the rate: "7020" (HTTP 200, code 7020) or "429" (HTTP 429 with Retry-After).
    rate_limit_mode: Literal["7020", "429"] = "7020"
    # Template ids `message.template` may name; any other is answered 7108.
    templates: tuple[str, ...] = ()
    # Destinations per request above which the request is answered 7009.
    max_destinations: int = 1000
    # Reject (per destination, code 7004) numbers without a leading "+".
    require_plus: bool = False
    queued_description: str = "Queued"
    # Where reports go when a request has no notifyurl (the service-level DR URL).
    default_notify_url: str = ""
    max_body_bytes: int = 16 * 1024 * 1024
    # Delay from accept to the first report: "fixed" (min), "uniform" (min..max) or
    # "exponential" (min + Exp(mean - min), capped at max).
    dr_delay_distribution: Literal["fixed", "uniform", "exponential"] = "uniform"
    dr_delay_min_s: float = 0.05
    dr_delay_max_s: float = 0.5
    dr_delay_mean_s: float = 0.2
    # Weights of final report codes (any code of DR_CODES but 7501).
    dr_outcomes: Mapping[str, float] = field(default_factory=_default_outcomes)
    # Share of destinations that first get a 7501 "Submitted" report, then the final one.
    dr_interim_ratio: float = 0.0
    # Final code forced for given msisdns (as sent), for deterministic tests.
    dr_codes_by_msisdn: Mapping[str, str] = field(default_factory=_empty_codes)
    # Add the newer optional fields (messageCount, carrier) to reports.
    dr_extra_fields: bool = False
    # Reports per callback POST: 1 is the documented shape; above 1 sends JSON arrays.
    dr_batch_size: int = 1
    # Concurrent callback connections.
    dr_connections: int = 32
    dr_timeout_s: float = 10.0
    # A callback that fails (connection error, timeout, 5xx, 408, 429) is retried this many
    # times, this far apart; other 4xx answers are not retried, as on the platform.
    callback_retries: int = 3
    callback_retry_interval_s: float = 60.0
    # Offset carried by timestamps when the timestamp_offset fault fires.
    timestamp_offset: str = "+05:30"
    # Incoming messages (MO) go here; `da` is the short code they were sent to.
    mo_url: str = ""
    mo_da: str = "12345"
    # Window of the accepted-destinations histogram in stats.
    stats_window_s: float = 1.0
    # Seed of the random source (outcomes, delays, faults); None: a fresh one.
    seed: int | None = None
    faults: Faults = Faults()

    def __post_init__(self) -> None:
        _check_config(self)

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], *, source: str = "<simulator config>"
    ) -> SimulatorConfig:
        """Build from a mapping shaped like the TOML file; errors name the key."""
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "faults":
                kwargs["faults"] = _parse_faults(value, source)
            elif key in names:
                kwargs[key] = _coerce(value, hints[key], f"{source}: {key}")
            else:
                raise SimulatorConfigError(f"{source}: {key}: unknown key")
        try:
            return cls(**kwargs)
        except SimulatorConfigError as exc:
            raise SimulatorConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_toml(
        cls, path: str | Path, *, overrides: Mapping[str, Any] | None = None
    ) -> SimulatorConfig:
        """Load a TOML file; `overrides` (same shape) win over the file's values."""
        file = Path(path)
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SimulatorConfigError(f"{file}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise SimulatorConfigError(f"{file}: not valid TOML: {exc}") from None
        return cls.from_dict(merge_config(raw, overrides or {}), source=str(file))


def merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge two raw configs; tables merge key by key, other values are replaced."""
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = merge_config(current, value)
        else:
            merged[key] = value
    return merged


def _check_config(c: SimulatorConfig) -> None:
    def bad(key: str, why: str) -> SimulatorConfigError:
        return SimulatorConfigError(f"{key}: {why}")

    for key in ("burst_s", "dr_timeout_s", "stats_window_s"):
        if getattr(c, key) <= 0:
            raise bad(key, "must be greater than 0")
    for key in ("rate_per_s", "dr_delay_min_s", "callback_retry_interval_s"):
        if getattr(c, key) < 0:
            raise bad(key, "must not be negative")
    for key in ("max_destinations", "dr_batch_size", "dr_connections", "max_body_bytes"):
        if getattr(c, key) < 1:
            raise bad(key, "must be at least 1")
    if c.callback_retries < 0:
        raise bad("callback_retries", "must not be negative")
    if any(not k for k in c.keys + c.inactive_keys):
        raise bad("keys", "keys must not be empty strings")
    if c.dr_delay_max_s < c.dr_delay_min_s:
        raise bad("dr_delay_max_s", "must not be below dr_delay_min_s")
    if c.dr_delay_distribution == "exponential" and not (
        c.dr_delay_min_s < c.dr_delay_mean_s <= c.dr_delay_max_s
    ):
        raise bad("dr_delay_mean_s", "must be above dr_delay_min_s and at most dr_delay_max_s")
    if not 0.0 <= c.dr_interim_ratio <= 1.0:
        raise bad("dr_interim_ratio", "must be between 0 and 1")
    for code, weight in c.dr_outcomes.items():
        if code not in DR_CODES or code == INTERIM_CODE:
            raise bad("dr_outcomes", f"{code!r} is not a final report code")
        if weight < 0:
            raise bad("dr_outcomes", f"weight of {code} must not be negative")
    if sum(c.dr_outcomes.values()) <= 0:
        raise bad("dr_outcomes", "needs at least one positive weight")
    for msisdn, code in c.dr_codes_by_msisdn.items():
        if code not in DR_CODES or code == INTERIM_CODE:
            raise bad("dr_codes_by_msisdn", f"{msisdn}: {code!r} is not a final report code")
    if not _OFFSET.fullmatch(c.timestamp_offset):
        raise bad("timestamp_offset", "expected an offset like +05:30 or -03:00")
    if c.mo_url and not c.mo_url.startswith(("http://", "https://")):
        raise bad("mo_url", "must be an http:// or https:// URL")
    if c.default_notify_url and not c.default_notify_url.startswith(("http://", "https://")):
        raise bad("default_notify_url", "must be an http:// or https:// URL")
    for name in REQUEST_FAULTS + REPORT_FAULTS:
        spec: FaultSpec = getattr(c.faults, name)
        where = f"faults.{name}"
        if not 0.0 <= spec.probability <= 1.0:
            raise bad(where, "probability must be between 0 and 1")
        if spec.requests is not None and not 1 <= spec.requests[0] <= spec.requests[1]:
            raise bad(where, "requests must be [first, last] with 1 <= first <= last")
        if spec.between_s is not None and not 0 <= spec.between_s[0] < spec.between_s[1]:
            raise bad(where, "between_s must be [start, end] with 0 <= start < end")
        if spec.delay_s < 0:
            raise bad(where, "delay_s must not be negative")


def _parse_faults(value: Any, source: str) -> Faults:
    if not isinstance(value, Mapping):
        raise SimulatorConfigError(f"{source}: faults: must be a table of [faults.NAME]")
    defaults = Faults()
    specs: dict[str, FaultSpec] = {}
    for name, table in value.items():
        where = f"{source}: faults.{name}"
        if name not in REQUEST_FAULTS + REPORT_FAULTS:
            known = ", ".join(REQUEST_FAULTS + REPORT_FAULTS)
            raise SimulatorConfigError(f"{where}: unknown fault (known: {known})")
        if not isinstance(table, Mapping):
            raise SimulatorConfigError(f"{where}: must be a table")
        given: dict[str, Any] = {}
        for key, item in table.items():
            if key == "probability" or (key == "delay_s" and name in _DELAY_FAULTS):
                given[key] = _coerce(item, float, f"{where}.{key}")
            elif key == "requests":
                given[key] = _pair(item, int, f"{where}.{key}")
            elif key == "between_s":
                given[key] = _pair(item, float, f"{where}.{key}")
            else:
                raise SimulatorConfigError(f"{where}.{key}: unknown key")
        # A schedule without a probability means "always, within the schedule".
        if "probability" not in given and ("requests" in given or "between_s" in given):
            given["probability"] = 1.0
        specs[name] = dataclasses.replace(getattr(defaults, name), **given)
    return dataclasses.replace(defaults, **specs)


def _pair(value: Any, kind: type[Any], where: str) -> tuple[Any, Any]:
    if not isinstance(value, list) or len(value) != 2:
        raise SimulatorConfigError(f"{where}: expected [first, last], got {value!r}")
    first, last = (_coerce(v, kind, where) for v in value)
    return (first, last)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    secret = where.endswith("keys")
    shown = "<secret>" if secret else repr(value)
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise SimulatorConfigError(f"{where}: {shown} is not one of {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
            raise SimulatorConfigError(f"{where}: expected a list of strings, got {shown}")
        return tuple(str(v) for v in value)
    if origin in (Mapping, dict):
        value_hint = typing.get_args(hint)[1]
        if not isinstance(value, Mapping):
            raise SimulatorConfigError(f"{where}: expected a table, got {shown}")
        return MappingProxyType(
            {str(k): _coerce(v, value_hint, f"{where}.{k}") for k, v in value.items()}
        )
    if hint == int | None:
        return None if value is None else _coerce(value, int, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise SimulatorConfigError(f"{where}: expected true or false, got {shown}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SimulatorConfigError(f"{where}: expected an integer, got {shown}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SimulatorConfigError(f"{where}: expected a number, got {shown}")
        return float(value)
    if hint is str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise SimulatorConfigError(f"{where}: expected a string, got {shown}")
        return value
    raise TypeError(f"simulator config field {where} has an unsupported type {hint!r}")


# --------------------------------------------------------------------------- pure helpers


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


def format_timestamp(epoch_s: float, offset: str = "") -> str:
    """`2016-07-20T17:13:17.908` in UTC, or local to `offset` with the offset appended."""
    shift, suffix = _offset_parts(offset) if offset else (0, "")
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


def sms_parts(text: str) -> int:
    """Parts of an SMS: GSM-7 160/153 (extension characters count two), else UCS-2 70/67."""
    if all(ch in _GSM7_BASIC or ch in _GSM7_EXTENDED for ch in text):
        units = len(text) + sum(1 for ch in text if ch in _GSM7_EXTENDED)
        single, multi = 160, 153
    else:
        units = len(text.encode("utf-16-le")) // 2
        single, multi = 70, 67
    return 1 if units <= single else math.ceil(units / multi)


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


# --------------------------------------------------------------------------- rate limit


class TokenBucket:
    """Destinations allowed per key: refills at `rate_per_s`, holds `capacity`."""

    __slots__ = ("capacity", "rate_per_s", "tokens", "updated")

    def __init__(self, *, rate_per_s: float, capacity: float, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def take(self, count: int, now: float) -> float:
        """Take `count` tokens: 0.0 when granted, else seconds until they would be there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if count <= self.tokens:
            self.tokens -= count
            return 0.0
        return (count - self.tokens) / self.rate_per_s


# --------------------------------------------------------------------------- stats


class _Counter(dict[str, int]):
    def add(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n


class _KeyStats:
    __slots__ = ("accepted", "accepted_per_window", "rejected_by_code", "requests", "results")

    def __init__(self) -> None:
        self.requests = 0
        self.results = _Counter()
        self.accepted = 0
        self.rejected_by_code = _Counter()
        self.accepted_per_window: dict[int, int] = {}

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "requests_by_result": dict(self.results),
            "accepted": self.accepted,
            "rejected_by_code": dict(self.rejected_by_code),
            "accepted_per_window": {str(k): v for k, v in self.accepted_per_window.items()},
        }


class Stats:
    """Exact counters of everything the simulator received and sent."""

    def __init__(self, *, window_s: float) -> None:
        self.window_s = window_s
        self.reset()

    def reset(self) -> None:
        self.started = time.monotonic()
        self.requests = 0
        self.requests_by_result = _Counter()
        self.accepted = 0
        self.rejected = 0
        self.rejected_by_code = _Counter()
        self.keys: dict[str, _KeyStats] = {}
        self.accepted_per_window: dict[int, int] = {}
        self.msisdns: dict[str, int] = {}
        self.correlation_ids: dict[str, int] = {}
        self.duplicate_msisdns = 0
        self.duplicate_correlation_ids = 0
        self.reports_scheduled = 0
        self.reports_sent = 0
        self.reports_failed = 0
        self.reports_retried = 0
        self.reports_by_code = _Counter()
        self.report_posts = 0
        self.mo_sent = 0
        self.mo_failed = 0
        self.mo_retried = 0
        self.faults = _Counter()

    def key(self, label: str) -> _KeyStats:
        stats = self.keys.get(label)
        if stats is None:
            stats = self.keys[label] = _KeyStats()
        return stats

    def window(self, now: float) -> int:
        return int((now - self.started) / self.window_s)

    def request_rejected(self, key: _KeyStats | None, result: str, destinations: int) -> None:
        """A whole request answered with an error `result` (an API code, or http_NNN)."""
        self.requests_by_result.add(result)
        if key is not None:
            key.results.add(result)
        if destinations:
            self.rejected += destinations
            self.rejected_by_code.add(result, destinations)
            if key is not None:
                key.rejected_by_code.add(result, destinations)

    def destination_rejected(self, key: _KeyStats, code: str) -> None:
        self.rejected += 1
        self.rejected_by_code.add(code)
        key.rejected_by_code.add(code)

    def to_json(self, *, pending: int, summary: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "uptime_s": round(time.monotonic() - self.started, 3),
            "window_s": self.window_s,
            "requests": {"total": self.requests, "by_result": dict(self.requests_by_result)},
            "destinations": {
                "accepted": self.accepted,
                "rejected": self.rejected,
                "rejected_by_code": dict(self.rejected_by_code),
                "distinct_msisdns": len(self.msisdns),
                "duplicate_msisdns": self.duplicate_msisdns,
                "distinct_correlation_ids": len(self.correlation_ids),
                "duplicate_correlation_ids": self.duplicate_correlation_ids,
            },
            "accepted_per_window": {str(k): v for k, v in self.accepted_per_window.items()},
            "keys": {label: key.to_json() for label, key in self.keys.items()},
            "reports": {
                "scheduled": self.reports_scheduled,
                "sent": self.reports_sent,
                "failed": self.reports_failed,
                "retried": self.reports_retried,
                "pending": pending,
                "posts": self.report_posts,
                "by_code": dict(self.reports_by_code),
            },
            "mo": {"sent": self.mo_sent, "failed": self.mo_failed, "retried": self.mo_retried},
            "faults": dict(self.faults),
        }
        if not summary:
            body["msisdns"] = dict(self.msisdns)
            body["correlation_ids"] = dict(self.correlation_ids)
        return body


# --------------------------------------------------------------------------- callbacks


class _Report(NamedTuple):
    """One delivery report to send; its timestamp is fixed when planned, so a retried or
    duplicated report is the same report."""

    context: _Context
    code: str
    transid: str
    msisdn: str
    correlation_id: str | None
    event_at: float
    # "" for the documented UTC form, an offset like "+05:30", or None for no timeStamp.
    offset: str | None


@dataclass(slots=True)
class _Post:
    """One callback POST: its body is encoded once and re-sent as is on retries."""

    url: str
    body: bytes
    codes: tuple[str, ...]
    kind: Literal["dr", "mo"]
    attempt: int = 0


class _Outcome(NamedTuple):
    status: int | None
    error: str | None


def render_report(report: _Report, *, extra_fields: bool) -> dict[str, Any]:
    """A report in the documented `deliveryInfoNotification` shape."""
    status, description = DR_CODES[report.code]
    info: dict[str, Any] = {
        "deliveryChannel": "SMS",
        "Description": description,
        "destinationType": "msisdn",
    }
    if report.offset is not None:
        info["timeStamp"] = format_timestamp(report.event_at, report.offset)
    info["code"] = report.code
    info["deliveryStatus"] = status
    info["destination"] = report.msisdn
    if extra_fields:
        info["messageCount"] = report.context.message_count
        info["carrier"] = "Simulated Carrier"
    notification: dict[str, Any] = {"deliveryInfo": info}
    if report.correlation_id is not None:
        notification["correlationid"] = report.correlation_id
    if report.context.callback_data is not None:
        notification["callbackData"] = report.context.callback_data
    notification["transid"] = report.transid
    return {"deliveryInfoNotification": notification}


# Reports are scheduled in buckets of this many seconds: O(1) per report instead of a heap
# operation, and reports falling due together go out together.
_TICK_S = 0.01
_FAILURE_LOG_INTERVAL_S = 5.0


class _Callbacks:
    """Scheduled reports in time buckets, sent by a pool of tasks over one connection pool."""

    def __init__(self, *, config: SimulatorConfig, stats: Stats) -> None:
        self._config = config
        self._stats = stats
        self._buckets: dict[int, list[_Report | _Post]] = {}
        self._ticks: list[int] = []
        self._queue: asyncio.Queue[_Post] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._next_tick = math.inf
        self._idle = asyncio.Event()
        self._idle.set()
        self.pending = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_failure_log = -math.inf

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._config.dr_connections)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._config.dr_timeout_s),
        )
        self._tasks.append(asyncio.create_task(self._dispatch(), name="sim-dr-dispatch"))
        for n in range(self._config.dr_connections):
            self._tasks.append(asyncio.create_task(self._post_loop(), name=f"sim-dr-post-{n}"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def schedule(self, due: float, item: _Report | _Post) -> None:
        """Queue a report (or a POST to retry) for monotonic time `due`, never earlier."""
        tick = math.ceil(due / _TICK_S)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = []
            heapq.heappush(self._ticks, tick)
            if tick < self._next_tick:
                self._next_tick = tick
                self._wake.set()
        bucket.append(item)

    def add_pending(self, n: int) -> None:
        self.pending += n
        if self.pending:
            self._idle.clear()

    def _done(self, n: int) -> None:
        self.pending -= n
        if self.pending <= 0:
            self.pending = 0
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            await self._idle.wait()

    def encode(self, reports: Sequence[_Report]) -> list[_Post]:
        """Group reports per URL into POSTs of up to dr_batch_size reports."""
        by_url: dict[str, list[_Report]] = {}
        for report in reports:
            by_url.setdefault(report.context.url, []).append(report)
        size = self._config.dr_batch_size
        extra = self._config.dr_extra_fields
        posts = []
        for url, group in by_url.items():
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                rendered = [render_report(r, extra_fields=extra) for r in chunk]
                body = orjson.dumps(rendered[0] if size == 1 else rendered)
                posts.append(_Post(url, body, tuple(r.code for r in chunk), "dr"))
        return posts

    async def _dispatch(self) -> None:
        ticks = self._ticks
        while True:
            now_tick = time.monotonic() / _TICK_S
            due: list[_Report] = []
            while ticks and ticks[0] <= now_tick:
                for item in self._buckets.pop(heapq.heappop(ticks)):
                    if isinstance(item, _Post):
                        self._queue.put_nowait(item)
                    else:
                        due.append(item)
            for post in self.encode(due):
                self._queue.put_nowait(post)
            self._next_tick = ticks[0] if ticks else math.inf
            self._wake.clear()
            timeout = None if not ticks else max(0.0, ticks[0] * _TICK_S - time.monotonic())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _post_loop(self) -> None:
        while True:
            post = await self._queue.get()
            await self.deliver(post)

    async def deliver(self, post: _Post) -> _Outcome:
        """POST once; on a retryable failure schedule the next attempt, else settle it."""
        assert self._session is not None, "callbacks not started"
        outcome = await self._post(post)
        stats = self._stats
        count = len(post.codes)
        if outcome.status is not None and 200 <= outcome.status < 300:
            if post.kind == "dr":
                stats.report_posts += 1
                stats.reports_sent += count
                for code in post.codes:
                    stats.reports_by_code.add(code)
            else:
                stats.mo_sent += 1
            self._done(count)
            return outcome
        retryable = outcome.status is None or outcome.status >= 500 or outcome.status in (408, 429)
        if retryable and post.attempt < self._config.callback_retries:
            post.attempt += 1
            if post.kind == "dr":
                stats.reports_retried += count
            else:
                stats.mo_retried += 1
            self.schedule(time.monotonic() + self._config.callback_retry_interval_s, post)
        else:
            if post.kind == "dr":
                stats.reports_failed += count
            else:
                stats.mo_failed += 1
            self._log_failure(post, outcome)
            self._done(count)
        return outcome

    def _log_failure(self, post: _Post, outcome: _Outcome) -> None:
        # A dead receiver fails every report: one line per interval, with the totals.
        now = time.monotonic()
        if now - self._last_failure_log < _FAILURE_LOG_INTERVAL_S:
            return
        self._last_failure_log = now
        log.warning(
            "callback_failed",
            kind=post.kind,
            attempts=post.attempt + 1,
            http_status=outcome.status,
            error=outcome.error,
            reports_failed=self._stats.reports_failed,
            mo_failed=self._stats.mo_failed,
        )

    async def _post(self, post: _Post) -> _Outcome:
        assert self._session is not None
        try:
            async with self._session.post(post.url, data=post.body, headers=_JSON_HEADERS) as resp:
                await resp.read()
                return _Outcome(resp.status, None)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return _Outcome(None, type(exc).__name__)


# --------------------------------------------------------------------------- server


class Simulator:
    """The simulator: an aiohttp server plus its callback sender. Start with `start()`."""

    def __init__(self, *, config: SimulatorConfig) -> None:
        self.config = config
        self._stats = Stats(window_s=config.stats_window_s)
        self._random = random.Random(config.seed)
        self._callbacks: _Callbacks | None = None
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._buckets: dict[str, TokenBucket] = {}
        self._templates = frozenset(config.templates)
        self._keys = frozenset(config.keys)
        self._inactive = frozenset(config.inactive_keys)
        self._transid_prefix = str(uuid.uuid4())[:24]
        self._transids = itertools.count(1)
        self.host = ""
        self.port = 0

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._closing = asyncio.Event()
        self._callbacks = _Callbacks(config=self.config, stats=self._stats)
        await self._callbacks.start()
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post(MESSAGING_PATH, self._handle_messaging)
        app.router.add_get(STATS_PATH, self._handle_stats)
        app.router.add_post(MO_PATH, self._handle_mo)
        app.router.add_post(RESET_PATH, self._handle_reset)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        bound = server.sockets[0].getsockname()
        self.host, self.port = bound[0], bound[1]
        self._stats.reset()
        log.info("simulator_started", url=self.base_url)

    async def close(self) -> None:
        """Stop serving, then stop the callback sender; unsent reports are dropped."""
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._callbacks is not None:
            dropped = self._callbacks.pending
            await self._callbacks.close()
            self._callbacks = None
            log.info(
                "simulator_stopped",
                requests=self._stats.requests,
                accepted=self._stats.accepted,
                reports_sent=self._stats.reports_sent,
                reports_dropped=dropped,
            )

    async def __aenter__(self) -> Simulator:
        """Start on 127.0.0.1 and any free port unless already started."""
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stats(self, *, summary: bool = False) -> dict[str, Any]:
        """The counters, as served at GET /simulate/stats (`summary` drops per-number maps)."""
        pending = self._callbacks.pending if self._callbacks is not None else 0
        return self._stats.to_json(pending=pending, summary=summary)

    def reset_stats(self) -> None:
        self._stats.reset()

    async def wait_reports_sent(self, *, timeout_s: float = 30.0) -> None:
        """Wait until every scheduled callback (reports, MO) is sent or given up."""
        assert self._callbacks is not None, "simulator not started"
        await self._callbacks.wait_idle(timeout_s)

    async def send_mo(
        self, *, oa: str, message: str, da: str | None = None, url: str | None = None
    ) -> dict[str, Any]:
        """POST an incoming message to `url` (default: mo_url); a failure is retried later."""
        assert self._callbacks is not None, "simulator not started"
        target = url or self.config.mo_url
        if not target:
            raise ValueError("no MO URL: set mo_url or pass url")
        if not target.startswith(("http://", "https://")):
            raise ValueError("the MO URL must be an http:// or https:// URL")
        now = time.time()
        tid = str(uuid.uuid4())
        body = {
            "userId": oa,
            "channel": "SMS",
            "da": da or self.config.mo_da,
            "oa": oa,
            "message": message,
            "tid": tid,
            "datetime": format_timestamp(now),
            "ts": str(int(now * 1000)),
        }
        self._callbacks.add_pending(1)
        outcome = await self._callbacks.deliver(_Post(target, orjson.dumps(body), ("mo",), "mo"))
        return {"tid": tid, "status": outcome.status, "error": outcome.error}

    # -- handlers

    async def _handle_stats(self, request: web.Request) -> web.Response:
        summary = request.query.get("summary", "") not in ("", "0", "false")
        return _json(self.stats(summary=summary))

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return _json({"reset": True})

    async def _handle_mo(self, request: web.Request) -> web.Response:
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json({"error": "invalid JSON"}, status=400)
        fields = ("oa", "message", "da", "url")
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), str) for k in ("oa", "message")
        ):
            return _json({"error": "oa and message (strings) are required"}, status=400)
        if any(data.get(k) is not None and not isinstance(data[k], str) for k in fields):
            return _json({"error": "da and url must be strings"}, status=400)
        try:
            result = await self.send_mo(
                oa=data["oa"], message=data["message"], da=data.get("da"), url=data.get("url")
            )
        except ValueError as exc:
            return _json({"error": str(exc)}, status=400)
        return _json(result)

    async def _handle_messaging(self, request: web.Request) -> web.StreamResponse:
        stats = self._stats
        callbacks = self._callbacks
        assert callbacks is not None
        body = await request.read()
        now = time.monotonic()
        stats.requests += 1
        request_no = stats.requests
        elapsed = now - stats.started
        faults = self.config.faults

        key = request.headers.get("key", "")
        if not key:
            return self._reject(None, "7002", "Service Key Missing", body)
        if key in self._inactive:
            return self._reject(self._key_stats(key), "7007", "Service inactive", body)
        if self._keys and key not in self._keys:
            # Unknown keys are pooled under one label: a stranger's key is never shown.
            key_stats = self._key_stats("unknown")
            return self._reject(key_stats, "7001", "Authentication failed.", body)
        key_stats = self._key_stats(key if self._keys else "*")

        if self._fires(faults.http_500, request_no, elapsed):
            stats.faults.add("http_500")
            stats.request_rejected(key_stats, "http_500", 0)
            return web.Response(status=500, text="Internal Server Error")
        if self._fires(faults.error_7006, request_no, elapsed):
            stats.faults.add("error_7006")
            return self._reject(key_stats, "7006", "Internal error", body)

        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._reject(key_stats, "7000", "Invalid JSON", b"")
        try:
            plans, total, valid = parse_messages(
                data,
                templates=self._templates,
                max_destinations=self.config.max_destinations,
                require_plus=self.config.require_plus,
                default_notify_url=self.config.default_notify_url,
                now=datetime.now(UTC),
                count_parts=self.config.dr_extra_fields,
            )
        except RequestError as exc:
            return self._reject(key_stats, exc.code, exc.description, body, data=data)

        wait_s = self._take_tokens(key, valid, now)
        if wait_s > 0:
            if self.config.rate_limit_mode == "429":
                stats.request_rejected(key_stats, "http_429", total)
                return _json(
                    _error("7020", "Maximum transaction limit reached", self._next_transid()),
                    status=429,
                    headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
                )
            return self._reject(key_stats, "7020", "Maximum transaction limit reached", b"", total)

        before_response = self._fires(faults.report_before_response, request_no, elapsed)
        planner = _ReportPlanner(
            config=self.config,
            rnd=self._random,
            request_no=request_no,
            elapsed=elapsed,
            immediate=before_response,
        )
        results = self._accept(key_stats, plans, valid, now, planner)
        immediate = self._schedule_reports(planner, now)
        payload = orjson.dumps({"response": results})
        stats.requests_by_result.add("1001")
        key_stats.results.add("1001")

        if before_response:
            stats.faults.add("report_before_response")
            await asyncio.gather(*(callbacks.deliver(p) for p in callbacks.encode(immediate)))
        if self._fires(faults.drop_connection, request_no, elapsed):
            stats.faults.add("drop_connection")
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=204)
        if self._fires(faults.slow_response, request_no, elapsed):
            stats.faults.add("slow_response")
            assert self._closing is not None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(faults.slow_response.delay_s):
                    await self._closing.wait()
        return web.Response(body=payload, content_type="application/json")

    # -- the accept path

    def _accept(
        self,
        key_stats: _KeyStats,
        plans: list[_MessagePlan],
        valid: int,
        now: float,
        planner: _ReportPlanner,
    ) -> list[dict[str, str]]:
        """Issue transids, count, and plan reports; returns the per-destination results."""
        stats = self._stats
        config = self.config
        description = config.queued_description
        prefix = self._transid_prefix
        transids = self._transids
        msisdn_counts = stats.msisdns
        correlation_counts = stats.correlation_ids
        results: list[dict[str, str]] = []
        append = results.append
        duplicate_msisdns = 0
        duplicate_correlations = 0
        for context, destinations in plans:
            plan_reports = planner.plan if context.url else None
            for msisdn, correlation, ok in destinations:
                transid = f"{prefix}{next(transids):012x}"
                if not ok:
                    item = {
                        "code": "7004",
                        "description": "Invalid parameters: msisdn",
                        "transid": transid,
                    }
                    if correlation is not None:
                        item["correlationid"] = correlation
                    append(item)
                    stats.destination_rejected(key_stats, "7004")
                    continue
                if correlation is None:
                    append({"code": "1001", "description": description, "transid": transid})
                else:
                    append(
                        {
                            "code": "1001",
                            "description": description,
                            "transid": transid,
                            "correlationid": correlation,
                        }
                    )
                    seen = correlation_counts.get(correlation, 0)
                    correlation_counts[correlation] = seen + 1
                    duplicate_correlations += seen == 1
                seen = msisdn_counts.get(msisdn, 0)
                msisdn_counts[msisdn] = seen + 1
                duplicate_msisdns += seen == 1
                if plan_reports is not None:
                    plan_reports(context, transid, msisdn, correlation)
        stats.duplicate_msisdns += duplicate_msisdns
        stats.duplicate_correlation_ids += duplicate_correlations
        stats.accepted += valid
        key_stats.accepted += valid
        window = stats.window(now)
        stats.accepted_per_window[window] = stats.accepted_per_window.get(window, 0) + valid
        per_key = key_stats.accepted_per_window
        per_key[window] = per_key.get(window, 0) + valid
        return results

    def _schedule_reports(self, planner: _ReportPlanner, now: float) -> list[_Report]:
        """Hand planned reports to the sender; returns those due now (report_before_response)."""
        callbacks = self._callbacks
        assert callbacks is not None
        for name, count in planner.faults.items():
            self._stats.faults.add(name, count)
        planned = planner.planned
        if not planned:
            return []
        callbacks.add_pending(len(planned))
        self._stats.reports_scheduled += len(planned)
        schedule = callbacks.schedule
        due_now = []
        for delay, report in planned:
            if delay == 0.0 and planner.immediate:
                due_now.append(report)
            else:
                schedule(now + delay, report)
        return due_now

    def _key_stats(self, label: str) -> _KeyStats:
        key_stats = self._stats.key(label)
        key_stats.requests += 1
        return key_stats

    def _fires(self, spec: FaultSpec, request_no: int, elapsed: float) -> bool:
        probability = spec.applies(request_no, elapsed)
        return probability > 0.0 and (probability >= 1.0 or self._random.random() < probability)

    def _take_tokens(self, key: str, count: int, now: float) -> float:
        rate = self.config.rate_per_s
        if rate <= 0 or count == 0:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            capacity = rate * self.config.burst_s
            bucket = self._buckets[key] = TokenBucket(rate_per_s=rate, capacity=capacity, now=now)
        return bucket.take(count, now)

    def _next_transid(self) -> str:
        return f"{self._transid_prefix}{next(self._transids):012x}"

    def _reject(
        self,
        key_stats: _KeyStats | None,
        code: str,
        description: str,
        body: bytes,
        destinations: int | None = None,
        *,
        data: Any = None,
    ) -> web.Response:
        if destinations is None:
            if data is None and body:
                with contextlib.suppress(orjson.JSONDecodeError):
                    data = orjson.loads(body)
            destinations = count_destinations(data) if data is not None else 0
        self._stats.request_rejected(key_stats, code, destinations)
        return _json(_error(code, description, self._next_transid()))


class _ReportPlanner:
    """Plans the reports of one request: outcome, delays and per-report faults.

    Every report is stamped with the wall-clock time of its event when planned, so a
    retried or duplicated report carries the same timestamp as the original.
    """

    def __init__(
        self,
        *,
        config: SimulatorConfig,
        rnd: random.Random,
        request_no: int,
        elapsed: float,
        immediate: bool,
    ) -> None:
        faults = config.faults
        self._config = config
        self._random = rnd.random
        self._expovariate = rnd.expovariate
        self._wall = time.time()
        self.immediate = immediate
        self._by_msisdn = config.dr_codes_by_msisdn
        codes = list(config.dr_outcomes)
        total = sum(config.dr_outcomes.values())
        self._codes = codes
        self._edges = list(itertools.accumulate(w / total for w in config.dr_outcomes.values()))
        self._single_code = codes[0] if len(codes) == 1 else ""
        self._uniform = config.dr_delay_distribution == "uniform"
        self._min_s = config.dr_delay_min_s
        self._span_s = config.dr_delay_max_s - config.dr_delay_min_s
        self._probability = {
            name: getattr(faults, name).applies(request_no, elapsed) for name in REPORT_FAULTS
        }
        self._fast = (
            not any(self._probability.values()) and config.dr_interim_ratio == 0 and not immediate
        )
        self.planned: list[tuple[float, _Report]] = []
        self.faults = _Counter()

    def _delay(self) -> float:
        if self._uniform:
            return self._min_s + self._span_s * self._random()
        c = self._config
        if c.dr_delay_distribution == "fixed":
            return self._min_s
        spread = c.dr_delay_mean_s - self._min_s
        return min(c.dr_delay_max_s, self._min_s + self._expovariate(1.0 / spread))

    def _pick_code(self) -> str:
        draw = self._random()
        for code, edge in zip(self._codes, self._edges, strict=True):
            if draw < edge:
                return code
        return self._codes[-1]

    def _hit(self, name: str) -> bool:
        probability = self._probability[name]
        if probability <= 0.0 or (probability < 1.0 and self._random() >= probability):
            return False
        self.faults.add(name)
        return True

    def plan(self, context: _Context, transid: str, msisdn: str, correlation: str | None) -> None:
        code = self._by_msisdn.get(msisdn) if self._by_msisdn else None
        if code is None:
            code = self._single_code or self._pick_code()
        if self._fast:
            delay = self._min_s + self._span_s * self._random() if self._uniform else self._delay()
            report = _Report(context, code, transid, msisdn, correlation, self._wall + delay, "")
            self.planned.append((delay, report))
            return
        self._plan_with_faults(context, code, transid, msisdn, correlation)

    def _plan_with_faults(
        self, context: _Context, code: str, transid: str, msisdn: str, correlation: str | None
    ) -> None:
        if self._hit("lost_report"):
            return
        offset: str | None = ""
        if self._hit("timestamp_missing"):
            offset = None
        elif self._hit("timestamp_offset"):
            offset = self._config.timestamp_offset
        interim = self._random() < self._config.dr_interim_ratio
        out_of_order = self._hit("out_of_order")
        wall = self._wall

        def add(send_at: float, report_code: str, event_at: float, tid: str = transid) -> None:
            cid = correlation if tid == transid else f"unknown-{tid[:8]}"
            report = _Report(context, report_code, tid, msisdn, cid, wall + event_at, offset)
            self.planned.append((send_at, report))

        first = 0.0 if self.immediate else self._delay()
        final_at = first
        if out_of_order:
            # The final report goes first; the interim one, stamped earlier, arrives after.
            add(first, code, first)
            add(first + self._delay(), INTERIM_CODE, first / 2)
        elif interim:
            add(first, INTERIM_CODE, first)
            final_at = first + self._delay()
            add(final_at, code, final_at)
        else:
            add(first, code, first)
        if self._hit("duplicate_report"):
            add(final_at + self._config.faults.duplicate_report.delay_s, code, final_at)
        if self._hit("unknown_transid"):
            add(final_at, code, final_at, str(uuid.uuid4()))


def _error(code: str, description: str, transid: str) -> dict[str, Any]:
    return {"response": {"code": code, "description": description, "transid": transid}}


def _json(
    body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


async def start_simulator(
    config: SimulatorConfig, *, host: str = "127.0.0.1", port: int = 0
) -> Simulator:
    """Start a simulator listening on host:port (0: any free port) and return it."""
    simulator = Simulator(config=config)
    try:
        await simulator.start(host=host, port=port)
    except BaseException:
        await simulator.close()
        raise
    return simulator


# --------------------------------------------------------------------------- CLI


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SimulatorConfigError(f"--listen {value!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def parse_setting(text: str) -> dict[str, Any]:
    """`a.b=value` -> {"a": {"b": value}}; the value is read as TOML, else as a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise SimulatorConfigError(f"--set {text!r}: expected KEY=VALUE")
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    result: dict[str, Any] = {}
    node = result
    parts = name.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return result


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The simulator config of `campaign simulate`: the file, then flags over it."""
    overrides: dict[str, Any] = {}
    if args.key:
        overrides["keys"] = list(args.key)
    if args.rate is not None:
        overrides["rate_per_s"] = args.rate
    if args.mo_url is not None:
        overrides["mo_url"] = args.mo_url
    if args.seed is not None:
        overrides["seed"] = args.seed
    for text in args.fault or ():
        name, sep, probability = text.partition("=")
        try:
            value = float(probability)
        except ValueError:
            value = math.nan
        if not sep or math.isnan(value):
            raise SimulatorConfigError(f"--fault {text!r}: expected NAME=PROBABILITY")
        overrides = merge_config(overrides, {"faults": {name: {"probability": value}}})
    for text in args.set or ():
        overrides = merge_config(overrides, parse_setting(text))
    if args.sim_config:
        return SimulatorConfig.from_toml(args.sim_config, overrides=overrides)
    return SimulatorConfig.from_dict(overrides, source="command line")


async def cmd_simulate(args: argparse.Namespace, settings: campaign_config.Settings) -> int:
    """Run the simulator until SIGINT / SIGTERM, or send one MO with --send-mo."""
    config = config_from_args(args)
    if args.send_mo:
        return await _send_one_mo(config, args)
    host, port = parse_listen(args.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with await start_simulator(config, host=host, port=port) as simulator:
            print(f"simulator listening on {simulator.base_url}", flush=True)
            await stop.wait()
            log.info("simulator_stopping", **simulator.stats(summary=True)["destinations"])
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


async def _send_one_mo(config: SimulatorConfig, args: argparse.Namespace) -> int:
    if not args.oa or args.message is None:
        raise SimulatorConfigError("--send-mo needs --oa and --message")
    quick = dataclasses.replace(config, callback_retries=0)
    async with await start_simulator(quick) as simulator:
        result = await simulator.send_mo(oa=args.oa, message=args.message, da=args.da)
    ok = result["status"] is not None and 200 <= result["status"] < 300
    log.info("mo_sent" if ok else "mo_failed", tid=result["tid"], http_status=result["status"])
    return 0 if ok else 1


__all__ = [
    "DR_CODES",
    "MESSAGING_PATH",
    "MO_PATH",
    "REPORT_FAULTS",
    "REQUEST_FAULTS",
    "RESET_PATH",
    "STATS_PATH",
    "FaultSpec",
    "Faults",
    "RequestError",
    "Simulator",
    "SimulatorConfig",
    "SimulatorConfigError",
    "Stats",
    "TokenBucket",
    "cmd_simulate",
    "config_from_args",
    "count_destinations",
    "format_timestamp",
    "parse_expiry",
    "parse_messages",
    "render_report",
    "sms_parts",
    "start_simulator",
]
