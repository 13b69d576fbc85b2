"""The callback sender: reports and MOs POSTed on time, retried, over one connection pool."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import time
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import aiohttp
import orjson
import structlog

from campaign.simulator.api import _JSON_HEADERS
from campaign.simulator.config import SimulatorConfig
from campaign.simulator.reports import _Report, render_report
from campaign.simulator.stats import Stats

# The logger of the whole simulator, whichever module logs.
log = structlog.get_logger("campaign.simulator")


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
        zone_name = self._config.timestamp_zone
        zone = None if zone_name == "UTC" else zoneinfo.ZoneInfo(zone_name)
        posts = []
        for url, group in by_url.items():
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                rendered = [render_report(r, extra_fields=extra, zone=zone) for r in chunk]
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
