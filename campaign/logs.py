"""structlog set-up: JSON lines for a service, console rendering on a TTY.

Configured once by the CLI. Standard-library loggers (aiohttp, asyncpg) go through the same
renderer. A redaction step replaces every configured secret wherever it appears, as a last
guard behind the rule that secrets are never logged in the first place.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

REDACTED = "***"


class Redactor:
    """A processor that masks known secret values in every string of an event."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def _mask(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: self._mask(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._mask(v) for v in value]
        return value

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self._secrets:
            return event
        for key, value in event.items():
            event[key] = self._mask(value)
        return event


class LogThrottle:
    """At most `burst` lines per event name per `interval_s`, for lines a client can cause.

    A scanner posting to wrong paths must not be able to flood the log: `allow(event)` says
    None (drop this line) once the window's burst is spent, else how many lines were dropped
    before this one, to be logged as `suppressed` so the count is never lost.
    """

    def __init__(
        self,
        *,
        burst: int = 10,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = burst
        self._interval_s = interval_s
        self._clock = clock
        # event -> [window start, lines written in it, lines dropped since the last written]
        self._windows: dict[str, list[float]] = {}

    def allow(self, event: str) -> int | None:
        now = self._clock()
        window = self._windows.setdefault(event, [now, 0, 0])
        if now - window[0] >= self._interval_s:
            window[0], window[1] = now, 0
        if window[1] >= self._burst:
            window[2] += 1
            return None
        dropped = int(window[2])
        window[1] += 1
        window[2] = 0
        return dropped


_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def formatter(
    *, json: bool, colors: bool = False, secrets: Iterable[str] = ()
) -> logging.Formatter:
    """A formatter for one handler: JSON lines, or console lines (with colours or not)."""
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=colors)
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            Redactor(secrets),
            renderer,
        ],
    )


def debug_enabled() -> bool:
    """Whether debug events are written: a hot path asks before it builds one."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def install(handlers: Iterable[logging.Handler], *, level: str = "info") -> None:
    """Send structlog and the standard library to `handlers`, each with its own formatter
    and level; events below `level` are dropped before any handler sees them."""
    level_no = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = list(handlers)
    root.setLevel(level_no)
    # aiohttp's access log is one line per webhook request, and pgserver narrates every
    # pg_ctl call: both too loud at info.
    for name in ("aiohttp.access", "pgserver"):
        logging.getLogger(name).setLevel(max(level_no, logging.WARNING))


def configure(
    *,
    fmt: str = "auto",
    level: str = "info",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the standard library to write one renderer's lines to `stream`."""
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter(json=not use_console, colors=out.isatty(), secrets=secrets))
    install([handler], level=level)
