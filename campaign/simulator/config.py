"""The simulator's knobs: SimulatorConfig and its faults, loaded from TOML or a dict."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from campaign import config as campaign_config
from campaign.simulator.api import DR_CODES, INTERIM_CODE
from campaign.simulator.timestamps import _OFFSET

# Faults decided once per request, and faults decided per delivery report.
REQUEST_FAULTS = (
    "http_500",
    "error_7006",
    "error_7005",
    "no_correlation_id",
    "slow_response",
    "drop_connection",
    "gateway_502",
    "report_before_response",
)
REPORT_FAULTS = (
    "duplicate_report",
    "out_of_order",
    "unknown_transid",
    "timestamp_offset",
    "timestamp_missing",
    "transid_missing",
    "lost_report",
)
# Faults that read `delay_s`: how long the response is held, how late the copy is sent.
_DELAY_FAULTS = {"slow_response", "duplicate_report"}


class SimulatorConfigError(campaign_config.ConfigError):
    """A simulator configuration problem, naming the key."""


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
    error_7005: FaultSpec = FaultSpec()
    no_correlation_id: FaultSpec = FaultSpec()
    slow_response: FaultSpec = FaultSpec(delay_s=30.0)
    drop_connection: FaultSpec = FaultSpec()
    gateway_502: FaultSpec = FaultSpec()
    report_before_response: FaultSpec = FaultSpec()
    duplicate_report: FaultSpec = FaultSpec(delay_s=0.0)
    out_of_order: FaultSpec = FaultSpec()
    unknown_transid: FaultSpec = FaultSpec()
    timestamp_offset: FaultSpec = FaultSpec()
    timestamp_missing: FaultSpec = FaultSpec()
    transid_missing: FaultSpec = FaultSpec()
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
    # IANA zone of report timestamps written without an offset: "UTC" is the documented
    # form; another zone writes that zone's local time, still without an offset.
    timestamp_zone: str = "UTC"
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
    try:
        zoneinfo.ZoneInfo(c.timestamp_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise bad("timestamp_zone", f"{c.timestamp_zone!r} is not an IANA time zone name") from None
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
