"""Configuration: a TOML file with ${ENV} interpolation, validated into frozen dataclasses.

Every error names the file and the key, in one line, and never echoes a secret's value.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
import urllib.parse
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time
from pathlib import Path
from typing import Any, Literal

ENV_CONFIG = "CAMPAIGN_CONFIG"
ENV_DSN = "CAMPAIGN_DATABASE_DSN"

# ${NAME} or ${NAME:-default}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

OnTimeout = Literal["resolve", "resend", "fail"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]

# The kinds of rows in campaign.events (sql/migrations/0004_events.sql holds the same list
# in its CHECK; tests/integration/test_events.py compares them).
EVENT_KINDS = ("recipient_final", "campaign_status", "opt_out", "opt_in", "reply")


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
    # Local hours a campaign without window_start/window_end may send in ("09:00-21:00";
    # empty: any time), and the zone of numbers whose prefix gives none (an IANA name).
    send_window: str = ""
    default_timezone: str = "UTC"
    # Characters of the short URL the platform puts in place of each {{link_N}}: parts
    # and encoding are counted with it, not with the placeholder. 0 counts the placeholder.
    smartlink_length: int = 30


@dataclass(frozen=True, slots=True)
class ProducerSettings:
    poll_interval_s: float = 1.0
    queue_size: int = 8
    lease_s: float = 120.0
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0
    recovery_interval_s: float = 5.0


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Sending rules across campaigns: the frequency cap (0 = off), the canary's wait and
    the failure brake's window, and what delivery reports teach (codes:
    docs/webhooks.md#learning-from-reports)."""

    max_per_msisdn: int = 0
    cap_window_h: float = 24.0
    # How long a campaign's canary may wait for its reports before it is judged on those
    # it has, and how many of a campaign's latest final reports the failure brake weighs.
    canary_wait_s: float = 600.0
    failure_window: int = 1000
    # The number does not exist: suppressed for suppress_days (reason dr:<code>).
    suppress_codes: tuple[str, ...] = ("7102", "7203")
    suppress_days: int = 90
    # The phone could not take it now (internal error, SIM full, out of coverage): the
    # recipient is sent once more after retry_after_s.
    retry_codes: tuple[str, ...] = ("7006", "7206", "7207")
    retry_after_s: float = 1800.0


@dataclass(frozen=True, slots=True)
class PricingSettings:
    """Price of one SMS part, for `campaign check`: per country calling code, else default."""

    currency: str = ""
    # 0: no price known (check shows parts only, or parts without a cost for those).
    default: float = 0.0
    # Country calling code ("44", "91", "1") -> price of one part.
    countries: Mapping[str, float] = field(default_factory=dict)

    def price(self, country_code: str) -> float:
        return self.countries.get(country_code, self.default)


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
    read_timeout_s: float = 10.0
    keepalive_s: float = 75.0
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
    # An incoming message answers the most recent recipient sent to its number this long ago
    # at most (its campaign is the one a STOP opts out of).
    reply_window_h: float = 72.0


@dataclass(frozen=True, slots=True)
class EventSettings:
    """The outbox (campaign.events) and its forwarder to the application's URL."""

    # Written to campaign.event_settings by the worker at start; the triggers read it.
    enabled: bool = True
    kinds: tuple[str, ...] = EVENT_KINDS
    # Empty: no forwarder. Events are POSTed as JSON arrays in id order, at least once.
    forward_url: str = ""
    forward_secret: str = field(default="", metadata={"secret": True})
    forward_batch: int = 500
    forward_timeout_s: float = 5.0
    # Another worker takes over the forwarder this long after its holder stopped renewing.
    forward_lease_s: float = 10.0
    forward_backoff_max_s: float = 60.0


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    worker_id: str = ""
    stats_interval_s: float = 30.0
    shutdown_grace_s: float = 30.0
    # A pass that finds nothing to do doubles the wait before the next, up to this: the
    # producer's polls (NOTIFY still wakes it at once), the reconciler's and recovery's
    # passes. An idle worker then costs the database well under one commit a second.
    idle_max_s: float = 10.0


@dataclass(frozen=True, slots=True)
class OpsSettings:
    """The ops address of every worker and receiver: /metrics, /healthz, /readyz, dashboard."""

    listen: str = "127.0.0.1:9100"
    # Set: the dashboard page and its JSON API need it (bearer header or the login form).
    token: str = field(default="", metadata={"secret": True})
    # How often the dashboard page fetches new numbers.
    refresh_s: float = 5.0


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """What `campaign prune` deletes: rows older than so many days; 0 keeps them forever."""

    campaigns_days: int = 0
    reports_days: int = 30
    batches_days: int = 90
    incoming_days: int = 90
    rejects_days: int = 30
    events_days: int = 7
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
    policy: PolicySettings = PolicySettings()
    webhooks: WebhookSettings = WebhookSettings()
    reconciler: ReconcilerSettings = ReconcilerSettings()
    optout: OptOutSettings = OptOutSettings()
    worker: WorkerSettings = WorkerSettings()
    logging: LoggingSettings = LoggingSettings()
    retention: RetentionSettings = RetentionSettings()
    ops: OpsSettings = OpsSettings()
    pricing: PricingSettings = PricingSettings()
    events: EventSettings = EventSettings()
    source: str = "<defaults>"

    @property
    def database_dsn(self) -> str:
        """The DSN to use: the environment wins over the file; empty means embedded."""
        return os.environ.get(ENV_DSN) or self.database.dsn

    def secrets(self) -> list[str]:
        """Every secret value in force, for log redaction."""
        values = [
            self.webhooks.token,
            self.webhooks.hmac_secret,
            self.ops.token,
            self.events.forward_secret,
        ]
        values += [s.key for s in self.services.values()]
        values += dsn_passwords(self.database_dsn)
        return [v for v in values if v]


# A DSN carries its password in one of three places: the URI's userinfo
# (postgresql://user:PASSWORD@host/db), a URI query parameter (?password=PASSWORD, also
# sslpassword), or a libpq key=value string (host=h password=PASSWORD, maybe 'quoted').
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_USER_END = re.compile(r"[:@/?#]|$")
_QUERY_PASSWORD = re.compile(r"(?:^|&)(?:ssl)?password=([^&#]*)", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(
    r"(?<![\w.-])(?:ssl)?password\s*=\s*('(?:[^'\\]|\\.)*'?|\S*)", re.IGNORECASE
)
MASK = "***"


def _password_spans(dsn: str) -> list[tuple[int, int]]:
    """Where the passwords are in `dsn`, as (start, end) offsets."""
    scheme = _URI_SCHEME.match(dsn)
    if scheme is None:
        return [m.span(1) for m in _KEYWORD_PASSWORD.finditer(dsn) if m.group(1)]
    start = scheme.end()
    spans = []
    # The user name ends at the first ':', '@', '/' or '?'; only a ':' starts a password.
    # The password runs to the last '@': one holding an unencoded '@', '/', '?' or ':' is
    # masked whole (masking a host name as well is the safe mistake).
    user_end = _USER_END.search(dsn, start)
    at = dsn.rfind("@", start)
    rest = start
    if user_end is not None and user_end.group() == ":" and at > user_end.start():
        spans.append((user_end.end(), at))
        rest = at + 1
    query = dsn.find("?", rest)
    if query >= 0:
        offset = query + 1
        spans += [
            (offset + m.start(1), offset + m.end(1))
            for m in _QUERY_PASSWORD.finditer(dsn[offset:])
            if m.group(1)
        ]
    return [(a, b) for a, b in spans if b > a]


def mask_dsn(dsn: str) -> str:
    """`dsn` with every password replaced by ***, for logs and printed output."""
    for start, end in sorted(_password_spans(dsn), reverse=True):
        dsn = dsn[:start] + MASK + dsn[end:]
    return dsn


def dsn_passwords(dsn: str) -> list[str]:
    """Each password in `dsn` as written and as a client decodes it, for the log redactor."""
    found: set[str] = set()
    for start, end in _password_spans(dsn):
        raw = dsn[start:end]
        found.add(raw)
        if raw.startswith("'"):
            found.add(re.sub(r"\\(.)", r"\1", raw.strip("'")))
        else:
            found |= {urllib.parse.unquote(raw), urllib.parse.unquote_plus(raw)}
    return sorted(v for v in found if v)


# The webhook token is the last segment of every DR / MO URL (notifyurl included), sent
# and routed unencoded: a '/', '?', '#' or '%' in it turns every report into a 404 that the
# platform does not retry. RFC 3986's unreserved characters need no encoding anywhere.
_URL_SAFE_TOKEN = re.compile(r"[A-Za-z0-9._~-]+")
_URL_SAFE_HINT = (
    "may hold only letters, digits and - _ . ~ (it is a URL path segment; a base64 token "
    "often holds '/' or '+'): make one with `openssl rand -hex 32` or "
    "`python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`"
)

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
    "read_timeout_s",
    "keepalive_s",
    "stats_interval_s",
    "max_attempts",
    "connect_timeout_s",
    "backoff_base_s",
    "backoff_max_s",
    "recovery_interval_s",
    "refresh_s",
    "canary_wait_s",
    "failure_window",
    "cap_window_h",
    "reply_window_h",
    "forward_batch",
    "forward_timeout_s",
    "forward_lease_s",
    "forward_backoff_max_s",
    "retry_after_s",
    "idle_max_s",
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
        if name == "pricing":
            values["pricing"] = _parse_pricing(value, source)
            continue
        section_type = _section_types().get(name)
        if section_type is None:
            raise ConfigError(f"{source}: unknown section [{name}]")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        values[name] = _build(section_type, value, source, f"[{name}]")
    settings = Settings(**values)
    _check_across_sections(settings, source)
    return settings


def _check_across_sections(settings: Settings, source: str) -> None:
    """Settings that are only right relative to each other's sections."""
    # A report for a recipient still `sending` waits for the submit response, at most a
    # lease (renewed when the request is posted) plus the request's timeout; after that
    # recovery makes the row `unknown` and the report can settle it. Orphaned sooner, the
    # report is given up and the row is sent again.
    waits_s = settings.producer.lease_s + settings.api.timeout_s
    orphan_after_s = settings.reconciler.orphan_after_s
    if orphan_after_s <= waits_s:
        raise ConfigError(
            f"{source}: [reconciler] orphan_after_s: {orphan_after_s:g} s must be longer than "
            f"[producer] lease_s + [api] timeout_s ({waits_s:g} s), or reports for rows "
            "still being sent are orphaned and those rows sent again"
        )


def _section_types() -> dict[str, type[Any]]:
    hints = typing.get_type_hints(Settings)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(Settings)
        if f.name not in ("services", "pricing", "source")
    }


def _price(value: Any, source: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{source}: {where}: expected a price (a number >= 0), got {value!r}")
    return float(value)


def _parse_pricing(value: Any, source: str) -> PricingSettings:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: [pricing] must be a table")
    unknown = set(value) - {"currency", "default", "countries"}
    if unknown:
        raise ConfigError(f"{source}: [pricing] {sorted(unknown)[0]}: unknown key")
    currency = value.get("currency", "")
    if not isinstance(currency, str) or len(currency) > 10:
        raise ConfigError(f"{source}: [pricing] currency: expected a short name like 'EUR'")
    countries = value.get("countries", {})
    if not isinstance(countries, dict):
        raise ConfigError(
            f"{source}: [pricing] countries: expected a table of calling code = price,"
            ' like { "44" = 0.035 }'
        )
    prices = {}
    for code, price in countries.items():
        if not (code.isdigit() and 1 <= len(code) <= 3 and not code.startswith("0")):
            raise ConfigError(
                f"{source}: [pricing] countries {code!r}: not a country calling code"
                ' (1 to 3 digits, like "44" or "1")'
            )
        prices[code] = _price(price, source, f"[pricing] countries {code}")
    return PricingSettings(
        currency=currency,
        default=_price(value.get("default", 0.0), source, "[pricing] default"),
        countries=prices,
    )


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
    token = kwargs.get("token")
    if cls is WebhookSettings and token and not _URL_SAFE_TOKEN.fullmatch(token):
        raise ConfigError(f"{source}: {where} token: {_URL_SAFE_HINT}")
    if cls is WebhookSettings and "report_timezone" in kwargs:
        _check_timezone(kwargs["report_timezone"], source, where, "report_timezone")
    if cls is ServiceSettings and "default_timezone" in kwargs:
        _check_timezone(kwargs["default_timezone"], source, where, "default_timezone")
    if cls is ServiceSettings and "send_window" in kwargs:
        _check_send_window(kwargs["send_window"], source, where)
    if cls is OpsSettings and "listen" in kwargs:
        check_listen(kwargs["listen"], source, where)
    if cls is EventSettings:
        _check_events(kwargs, source, where)
    if cls is PolicySettings:
        for key in ("suppress_codes", "retry_codes"):
            bad = [c for c in kwargs.get(key, ()) if not re.fullmatch(r"[0-9]{4}", c)]
            if bad:
                raise ConfigError(f"{source}: {where} {key}: {bad[0]!r} is not a 4-digit code")
        policy = PolicySettings()
        both = set(kwargs.get("suppress_codes", policy.suppress_codes)) & set(
            kwargs.get("retry_codes", policy.retry_codes)
        )
        if both:
            raise ConfigError(
                f"{source}: {where} retry_codes: {sorted(both)[0]} is also in suppress_codes"
            )
    if cls is DatabaseSettings and kwargs.get("pool_min", 2) > kwargs.get("pool_max", 10):
        raise ConfigError(f"{source}: {where} pool_min: must not exceed pool_max")
    for key in ("max_per_msisdn", "smartlink_length"):
        if kwargs.get(key, 0) < 0:
            raise ConfigError(f"{source}: {where} {key}: must not be negative (0 turns it off)")
    for key, value in kwargs.items():
        if key.endswith("_days") and value < 0:
            raise ConfigError(f"{source}: {where} {key}: must not be negative (0 keeps forever)")
    return cls(**kwargs)


def check_listen(listen: str, source: str, where: str) -> None:
    """A HOST:PORT the ops server can bind (port 0 picks a free one)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdecimal() or int(port) > 65535:
        place = f"{source}: {where} listen" if where else source
        raise ConfigError(f"{place}: {listen!r} is not HOST:PORT (like '127.0.0.1:9100')")


def _check_events(kwargs: Mapping[str, Any], source: str, where: str) -> None:
    unknown = [k for k in kwargs.get("kinds", ()) if k not in EVENT_KINDS]
    if unknown:
        raise ConfigError(
            f"{source}: {where} kinds: {unknown[0]!r} is not one of {', '.join(EVENT_KINDS)}"
        )
    url = kwargs.get("forward_url", "")
    if url and urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ConfigError(f"{source}: {where} forward_url: must be an http:// or https:// URL")
    defaults = EventSettings()
    timeout_s = kwargs.get("forward_timeout_s", defaults.forward_timeout_s)
    if kwargs.get("forward_lease_s", defaults.forward_lease_s) <= timeout_s:
        raise ConfigError(
            f"{source}: {where} forward_lease_s: must be longer than forward_timeout_s "
            f"({timeout_s:g} s), or a slow POST loses the lease to another worker"
        )
    if url and not kwargs.get("forward_secret"):
        raise ConfigError(
            f"{source}: {where} forward_secret: missing (the receiver verifies each body's "
            "HMAC-SHA256 with it)"
        )


def _check_timezone(name: str, source: str, where: str, key: str) -> None:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{source}: {where} {key}: {name!r} is not an IANA time zone name"
            " (like 'UTC' or 'Asia/Kolkata')"
        ) from None


# "HH:MM-HH:MM", read by campaign.window.Window.parse (a module of the same layer, so the
# form is checked here again).
_SEND_WINDOW = re.compile(r"^\s*(\d{1,2}:\d{2})\s*-\s*(\d{1,2}:\d{2})\s*$")


def _check_send_window(text: str, source: str, where: str) -> None:
    if not text.strip():
        return
    match = _SEND_WINDOW.match(text)
    problem = "is not like '09:00-21:00' (local start-end; empty: any time)"
    if match is not None:
        try:
            start, end = (time.fromisoformat(part.zfill(5)) for part in match.groups())
        except ValueError:
            problem = "holds a time that does not exist (00:00 to 23:59)"
        else:
            if start != end:
                return
            problem = "starts and ends at the same time (leave it empty for any time)"
    raise ConfigError(f"{source}: {where} send_window: {text!r} {problem}")


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
