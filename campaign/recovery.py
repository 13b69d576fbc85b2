"""Crash recovery, run at start and periodically by every worker.

A batch whose lease ran out was held by a worker that died or hung: if it was only
claimed, its recipients go back to 'pending'; if it was posting, the request may have
reached the API, so they become 'unknown'. Recipients left 'unknown' then follow their
service's `on_timeout`: "resolve" waits `in_doubt_grace_s` for a delivery report to settle
them (another component matches reports by correlation id) and otherwise returns them to
'pending'; "resend" returns them at once; "fail" marks them 'failed'.
A pass is one transaction (more only past a full chunk); a pass that finds nothing doubles
the wait before the next, from `recovery_interval_s` up to `[worker] idle_max_s`: waiting
longer only leaves an expired lease unreleased longer, it never releases one early.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from campaign import db
from campaign.aio import IdleBackoff, sleep_or_stop
from campaign.config import ServiceSettings

log = structlog.get_logger(__name__)

QUERIES = (
    "recovery_expired_batches",
    "recovery_release_worker",
    "recovery_resolve_unknown",
    "recovery_work_remaining",
)
CHUNK = 10_000
BATCH_CHUNK = 1_000


@dataclass(frozen=True, slots=True)
class RecoveryResult:
    batches: int = 0
    released: int = 0
    in_doubt: int = 0
    resent: int = 0
    failed: int = 0

    def __bool__(self) -> bool:
        return any((self.batches, self.released, self.in_doubt, self.resent, self.failed))


class Recovery:
    def __init__(
        self,
        *,
        pool: db.Pool,
        queries: Mapping[str, str],
        services: Mapping[str, ServiceSettings],
        worker_id: str,
        interval_s: float,
        idle_max_s: float = 0.0,
    ) -> None:
        self._pool = pool
        self._backoff = IdleBackoff(base_s=interval_s, max_s=idle_max_s)
        self._queries = db.require(queries, QUERIES)
        self._services = services
        self._worker_id = worker_id

    async def run(self, stop: asyncio.Event) -> None:
        """run_once every interval (longer while idle) until `stop` is set."""
        wait_s = self._backoff.base_s
        while not await sleep_or_stop(stop, wait_s):
            found = True
            try:
                found = bool(await self.run_once())
            except db.UNAVAILABLE_ERRORS as exc:
                log.error("recovery_failed", error=str(exc), error_type=type(exc).__name__)
            wait_s = self._backoff.after(worked=found)

    async def run_once(self) -> RecoveryResult:
        """Take back expired leases, then settle in-doubt recipients per service."""
        counts = collections.Counter[str]()
        # First chunks in one transaction; a full one goes on in statements of its own.
        async with self._pool.acquire() as conn, conn.transaction():
            more_batches = await self._expire_chunk(conn, counts)
            more_services = [
                name for name in self._services if await self._resolve_chunk(conn, name, counts)
            ]
        if more_batches:
            async with self._pool.acquire() as conn:
                while await self._expire_chunk(conn, counts):
                    pass
        for name in more_services:
            async with self._pool.acquire() as conn:
                while await self._resolve_chunk(conn, name, counts):
                    pass
        result = RecoveryResult(
            counts["batches"],
            counts["released"],
            counts["in_doubt"],
            counts["resent"],
            counts["failed"],
        )
        if result:
            log.info(
                "recovery_finished",
                batches=result.batches,
                released=result.released,
                in_doubt=result.in_doubt,
                resent=result.resent,
                failed=result.failed,
            )
        return result

    async def _expire_chunk(
        self, conn: db.PoolConnection, counts: collections.Counter[str]
    ) -> bool:
        """One chunk of expired batches taken back; True when it was full."""
        row = await conn.fetchrow(self._queries["recovery_expired_batches"], BATCH_CHUNK)
        assert row is not None
        counts.update({k: row[k] for k in ("batches", "released", "in_doubt")})
        return bool(row["batches"] >= BATCH_CHUNK)

    async def _resolve_chunk(
        self, conn: db.PoolConnection, name: str, counts: collections.Counter[str]
    ) -> bool:
        """One chunk of a service's in-doubt recipients settled; True when it was full."""
        service = self._services[name]
        grace_s = service.in_doubt_grace_s if service.on_timeout == "resolve" else 0.0
        statuses = await conn.fetch(
            self._queries["recovery_resolve_unknown"],
            name,
            grace_s,
            service.on_timeout == "fail",
            service.max_attempts,
            CHUNK,
        )
        counts["resent"] += sum(r["status"] == "pending" for r in statuses)
        counts["failed"] += sum(r["status"] == "failed" for r in statuses)
        return len(statuses) >= CHUNK

    async def release_worker(self) -> RecoveryResult:
        """At shutdown: this worker's unsent batches back to pending, in-flight ones in doubt."""
        row = await self._pool.fetchrow(self._queries["recovery_release_worker"], self._worker_id)
        assert row is not None
        result = RecoveryResult(row["batches"], row["released"], row["in_doubt"])
        if result:
            log.info(
                "batches_released",
                worker_id=self._worker_id,
                batches=result.batches,
                released=result.released,
                in_doubt=result.in_doubt,
            )
        return result

    async def work_remaining(self, services: list[str]) -> bool:
        """Whether drain mode must wait: due, in-flight or in-doubt rows on these services."""
        return bool(await self._pool.fetchval(self._queries["recovery_work_remaining"], services))
