"""Configuration: a TOML file with ${ENV} interpolation, validated into frozen dataclasses.

Every error names the file and the key, in one line, and never echoes a secret's value.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ENV_CONFIG = "CAMPAIGN_CONFIG"
ENV_DSN = "CAMPAIGN_DATABASE_DSN"

# ${NAME} or ${NAME:-default}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

OnTimeout = Literal["resolve", "resend", "fail"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]


class ConfigError(Exception):
    """A configuration problem, worded as one line for the operator."""


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    dsn: str = ""
    data_dir: str = ""
    pool_min: int = 2
    pool_max: int = 10
    connect_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ApiSettings:
    base_url: str = "https://api.imiconnect.com"
    timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    key: str = field(default="", metadata={"secret": True, "required": True})
    # Empty: [api] base_url. Set for a service on another region's or tenant's endpoint.
    base_url: str = ""
    sender_id: str = ""
    rate_per_s: float = 100.0
    batch_size: int = 1000
    max_in_flight: int = 4
    plus_prefix: bool = False
    default_region: str = ""
    on_timeout: OnTimeout = "resolve"
    in_doubt_grace_s: float = 600.0
    max_attempts: int = 5


@dataclass(frozen=True, slots=True)
class ProducerSettings:
    poll_interval_s: float = 1.0
    queue_size: int = 8
    lease_s: float = 120.0
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0
    recovery_interval_s: float = 5.0


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    listen: str = "127.0.0.1:8080"
    public_url: str = "http://127.0.0.1:8080"
    token: str = field(default="", metadata={"secret": True, "required": True})
    max_body_bytes: int = 1_048_576
    hmac_secret: str = field(default="", metadata={"secret": True})
    allow_networks: tuple[str, ...] = ()
    group_max: int = 500
    store_timeout_s: float = 8.0
    # The zone of report timestamps sent without an offset (an IANA name).
    report_timezone: str = "UTC"


@dataclass(frozen=True, slots=True)
class ReconcilerSettings:
    interval_s: float = 1.0
    batch_size: int = 5000
    parallel: int = 2
    orphan_after_s: float = 3600.0
    report_timeout_s: float = 172_800.0


@dataclass(frozen=True, slots=True)
class OptOutSettings:
    stop_keywords: tuple[str, ...] = ("STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT")
    start_keywords: tuple[str, ...] = ("START", "UNSTOP")


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    worker_id: str = ""
    stats_interval_s: float = 30.0
    shutdown_grace_s: float = 30.0


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """What `campaign prune` deletes: rows older than so many days; 0 keeps them forever."""

    campaigns_days: int = 0
    reports_days: int = 30
    batches_days: int = 90
    incoming_days: int = 90
    rejects_days: int = 30
    batch_size: int = 10_000


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    format: LogFormat = "auto"
    level: LogLevel = "info"


@dataclass(frozen=True, slots=True)
class Settings:
    database: DatabaseSettings = DatabaseSettings()
    api: ApiSettings = ApiSettings()
    services: Mapping[str, ServiceSettings] = field(default_factory=dict)
    producer: ProducerSettings = ProducerSettings()
    webhooks: WebhookSettings = WebhookSettings()
    reconciler: ReconcilerSettings = ReconcilerSettings()
    optout: OptOutSettings = OptOutSettings()
    worker: WorkerSettings = WorkerSettings()
    logging: LoggingSettings = LoggingSettings()
    retention: RetentionSettings = RetentionSettings()
    source: str = "<defaults>"

    @property
    def database_dsn(self) -> str:
        """The DSN to use: the environment wins over the file; empty means embedded."""
        return os.environ.get(ENV_DSN) or self.database.dsn

    def secrets(self) -> list[str]:
        """Every secret value in force, for log redaction."""
        values = [self.webhooks.token, self.webhooks.hmac_secret]
        values += [s.key for s in self.services.values()]
        password = dsn_password(self.database_dsn)
        if password:
            values.append(password)
        return [v for v in values if v]


def dsn_password(dsn: str) -> str:
    match = re.match(r"^[a-z]+://[^:/@]*:([^@]*)@", dsn)
    return match.group(1) if match else ""


# Positive numbers where 0 would stall or divide; checked after types.
_POSITIVE = {
    "rate_per_s",
    "batch_size",
    "max_in_flight",
    "timeout_s",
    "poll_interval_s",
    "queue_size",
    "lease_s",
    "pool_min",
    "pool_max",
    "max_body_bytes",
    "interval_s",
    "parallel",
    "group_max",
    "store_timeout_s",
    "stats_interval_s",
    "max_attempts",
    "connect_timeout_s",
    "backoff_base_s",
    "backoff_max_s",
    "recovery_interval_s",
}


def load(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load settings from `path`, or $CAMPAIGN_CONFIG, or defaults when neither is given."""
    chosen = path if path is not None else os.environ.get(ENV_CONFIG)
    if not chosen:
        return Settings()
    file = Path(chosen)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    return parse(raw, source=str(file))


def parse(raw: Mapping[str, Any], *, source: str = "<config>") -> Settings:
    values: dict[str, Any] = {"source": source}
    for name, value in raw.items():
        if name == "services":
            values["services"] = _parse_services(value, source)
            continue
        section_type = _section_types().get(name)
        if section_type is None:
            raise ConfigError(f"{source}: unknown section [{name}]")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        values[name] = _build(section_type, value, source, f"[{name}]")
    return Settings(**values)


def _section_types() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Settings)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(Settings)
        if f.name not in ("services", "source")
    }


def _parse_services(value: Any, source: str) -> dict[str, ServiceSettings]:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [services] must hold tables like [services.NAME]")
    services = {}
    for name, table in value.items():
        where = f"[services.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {where} must be a table")
        services[name] = _build(ServiceSettings, table, source, where)
    return services


def _build(cls: type[Any], table: Mapping[str, Any], source: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        f = fields.get(key)
        if f is None:
            raise ConfigError(f"{source}: {where} {key}: unknown key")
        secret = bool(f.metadata.get("secret"))
        value = _interpolate(value, source, where, key)
        kwargs[key] = _coerce(value, hints[key], source, where, key, secret=secret)
    for name, f in fields.items():
        value = kwargs.get(name, f.default)
        if f.metadata.get("required") and not value:
            raise ConfigError(
                f"{source}: {where} {name}: missing (set it or its ${{ENV}} variable)"
            )
        if name in _POSITIVE and isinstance(value, int | float) and value <= 0:
            raise ConfigError(f"{source}: {where} {name}: must be greater than 0")
    if cls is ServiceSettings and not 1 <= kwargs.get("batch_size", 1000) <= 1000:
        raise ConfigError(f"{source}: {where} batch_size: must be between 1 and 1000")
    if cls is WebhookSettings and "report_timezone" in kwargs:
        _check_timezone(kwargs["report_timezone"], source, where)
    if cls is DatabaseSettings and kwargs.get("pool_min", 2) > kwargs.get("pool_max", 10):
        raise ConfigError(f"{source}: {where} pool_min: must not exceed pool_max")
    for key, value in kwargs.items():
        if key.endswith("_days") and value < 0:
            raise ConfigError(f"{source}: {where} {key}: must not be negative (0 keeps forever)")
    return cls(**kwargs)


def _check_timezone(name: str, source: str, where: str) -> None:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{source}: {where} report_timezone: {name!r} is not an IANA time zone name"
            " (like 'UTC' or 'Asia/Kolkata')"
        ) from None


def _interpolate(value: Any, source: str, where: str, key: str) -> Any:
    if isinstance(value, list):
        return [_interpolate(v, source, where, key) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{source}: {where} {key}: environment variable {name} is not set")

    return _ENV_REF.sub(replace, value)


def _coerce(value: Any, hint: Any, source: str, where: str, key: str, *, secret: bool) -> Any:
    shown = "<secret>" if secret else repr(value)
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{source}: {where} {key}: {shown} is not one of {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {where} {key}: expected a list of strings, got {shown}")
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {where} {key}: expected true or false, got {shown}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {where} {key}: expected an integer, got {shown}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {where} {key}: expected a number, got {shown}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {where} {key}: expected a string, got {shown}")
        return value
    raise TypeError(f"config field {where} {key} has an unsupported type {hint!r}")
