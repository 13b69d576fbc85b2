"""The forwarder: campaign.events POSTed to the application's URL, at least once, in id order.

Invariants:
- The position (the last id the URL answered 2xx for) lives in campaign.event_forwarder
  and moves only after a 2xx, so a crash, a restart or a lost database repeats a batch,
  never skips one. Every event carries its id: the receiver ignores repeats.
- One forwarder per fleet: a lease in the same row, renewed every round; a worker that
  dies stops renewing and another takes over once it runs out (`forward_lease_s`).
- An event is sent only once no lower id can still appear. Ids are handed out before the
  inserting transaction commits, so a committed id 6 can be visible while id 5's
  transaction still runs: sending 6 and moving the position past 5 would lose 5. The
  forwarder sends up to a *settled* id: the last id handed out at some moment, once every
  transaction running at that moment has ended (forwarder.sql, steps one to three).
  An open transaction anywhere on the server delays forwarding, never loses an event.
- Each body is signed: `x-campaign-signature: sha256=<hex HMAC-SHA256 of the body>`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import structlog

from campaign import db, metrics
from campaign.aio import sleep_or_stop
from campaign.config import EventSettings

log = structlog.get_logger(__name__)

QUERIES = (
    "forwarder_write_event_settings",
    "forwarder_take_lease",
    "forwarder_release_lease",
    "forwarder_last_id",
    "forwarder_snapshot_xmax",
    "forwarder_snapshot_xmin",
    "forwarder_fetch",
    "forwarder_advance",
    "forwarder_backlog",
)

SIGNATURE_HEADER = "x-campaign-signature"
# Idle: look for new events this often (a round is three tiny statements).
POLL_INTERVAL_S = 1.0
# Events written but not yet settled: look again soon.
SETTLE_INTERVAL_S = 0.2
BACKOFF_BASE_S = 0.5


def signature(secret: str, body: bytes) -> str:
    """The header value for `body`: sha256=<hex HMAC-SHA256 keyed with `secret`>."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def backoff_s(failures: int, max_s: float) -> float:
    """Capped exponential backoff with jitter (half to all of the capped step)."""
    step = min(max_s, BACKOFF_BASE_S * 2.0 ** min(failures - 1, 30))
    return float(step * random.uniform(0.5, 1.0))


async def write_event_settings(
    pool: db.Pool, queries: Mapping[str, str], settings: EventSettings, worker_id: str
) -> None:
    """Tell the database's triggers which events to write ([events] enabled / kinds)."""
    await pool.execute(
        queries["forwarder_write_event_settings"],
        settings.enabled,
        list(settings.kinds),
        worker_id,
    )


@dataclass(slots=True)
class _Candidate:
    """Step one and two of the horizon: the last id handed out and the xmax after it."""

    last_id: int
    xmax: int


class ForwardFailed(Exception):
    """The URL did not answer 2xx (or not at all)."""

    def __init__(self, reason: str, http_status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status


class Forwarder:
    def __init__(
        self,
        *,
        pool: db.Pool,
        queries: Mapping[str, str],
        settings: EventSettings,
        worker_id: str,
    ) -> None:
        self._pool = pool
        self._queries = db.require(queries, QUERIES)
        self._settings = settings
        self._worker_id = worker_id
        self._candidate: _Candidate | None = None
        self._settled = 0
        self.holding = False
        # Counters for tests and stats.
        self.rounds = 0
        self.forwarded = 0
        self.posts = 0
        self.failures = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Forward until `stop` is set; the lease is handed back on the way out."""
        s = self._settings
        timeout = aiohttp.ClientTimeout(total=s.forward_timeout_s)
        failures = 0
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                while not stop.is_set():
                    try:
                        wait_s = await self._round(session)
                        failures = 0
                    except ForwardFailed as exc:
                        failures += 1
                        self.failures += 1
                        metrics.EVENTS_FORWARD_FAILURES.inc()
                        wait_s = backoff_s(failures, s.forward_backoff_max_s)
                        log.warning(
                            "events_forward_failed",
                            reason=exc.reason,
                            http_status=exc.http_status,
                            failures=failures,
                            retry_in_s=round(wait_s, 2),
                        )
                    except db.UNAVAILABLE_ERRORS as exc:
                        failures += 1
                        wait_s = backoff_s(failures, s.forward_backoff_max_s)
                        log.warning(
                            "events_forward_failed",
                            reason="database",
                            error=str(exc),
                            error_type=type(exc).__name__,
                            retry_in_s=round(wait_s, 2),
                        )
                    if wait_s:
                        await sleep_or_stop(stop, wait_s)
            finally:
                await asyncio.shield(self._release())

    async def _round(self, session: aiohttp.ClientSession) -> float:
        """Take or renew the lease, forward one batch; how long to wait before the next."""
        s = self._settings
        self.rounds += 1
        position = await self._pool.fetchval(
            self._queries["forwarder_take_lease"], self._worker_id, s.forward_lease_s
        )
        if position is None:
            if self.holding:
                log.warning("events_forwarder_lease_lost", worker_id=self._worker_id)
            self.holding = False
            return s.forward_lease_s / 3
        if not self.holding:
            log.info("events_forwarder_started", worker_id=self._worker_id, position=position)
            self.holding = True
        await self._settle()
        if self._settled <= position:
            pending = self._candidate is not None and self._candidate.last_id > position
            return SETTLE_INTERVAL_S if pending else POLL_INTERVAL_S
        row = await self._pool.fetchrow(
            self._queries["forwarder_fetch"], position, self._settled, s.forward_batch
        )
        assert row is not None
        if not row["events"]:
            # Ids rolled back (or pruned) up to the settled one: nothing to send there.
            await self._advance(self._settled)
            return 0.0
        await self._post(session, row["body"].encode())
        await self._advance(int(row["last_id"]))
        count = int(row["events"])
        self.forwarded += count
        metrics.EVENTS_FORWARDED.inc(count)
        log.debug("events_forwarded", events=count, last_id=row["last_id"])
        return 0.0 if count >= s.forward_batch else SETTLE_INTERVAL_S

    async def _settle(self) -> None:
        """Steps three, then one and two, of the horizon (forwarder.sql)."""
        q = self._queries
        if self._candidate is not None:
            xmin = await self._pool.fetchval(q["forwarder_snapshot_xmin"])
            if int(xmin) >= self._candidate.xmax:
                self._settled = max(self._settled, self._candidate.last_id)
                self._candidate = None
        if self._candidate is None:
            # Two statements, in this order: the snapshot must be taken after the read.
            last_id = int(await self._pool.fetchval(q["forwarder_last_id"]))
            if last_id > self._settled:
                xmax = int(await self._pool.fetchval(q["forwarder_snapshot_xmax"]))
                self._candidate = _Candidate(last_id=last_id, xmax=xmax)

    async def _post(self, session: aiohttp.ClientSession, body: bytes) -> None:
        s = self._settings
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: signature(s.forward_secret, body),
        }
        self.posts += 1
        started = time.monotonic()
        try:
            async with session.post(s.forward_url, data=body, headers=headers) as response:
                await response.read()
                status = response.status
        except TimeoutError:
            raise ForwardFailed("timeout") from None
        except aiohttp.ClientError as exc:
            raise ForwardFailed(type(exc).__name__) from None
        if not 200 <= status < 300:
            raise ForwardFailed("http_status", http_status=status)
        metrics.EVENTS_FORWARD_SECONDS.observe(time.monotonic() - started)

    async def _advance(self, last_id: int) -> None:
        moved = await self._pool.fetchval(
            self._queries["forwarder_advance"], self._worker_id, last_id
        )
        if moved is None:
            # The lease ran out while the POST hung and someone took it: theirs now.
            self.holding = False
            log.warning("events_forwarder_lease_lost", worker_id=self._worker_id)

    async def backlog(self) -> int:
        return int(await self._pool.fetchval(self._queries["forwarder_backlog"]) or 0)

    async def _release(self) -> None:
        if not self.holding:
            return
        try:
            await self._pool.execute(self._queries["forwarder_release_lease"], self._worker_id)
        except db.UNAVAILABLE_ERRORS as exc:
            # The lease runs out and another worker takes over.
            log.warning("events_forwarder_not_released", error=str(exc))
        self.holding = False
