"""Crash recovery, run at start and periodically by every worker.

A batch whose lease ran out was held by a worker that died or hung: if it was only
claimed, its recipients go back to 'pending'; if it was posting, the request may have
reached the API, so they become 'unknown'. Recipients left 'unknown' then follow their
service's `on_timeout`: "resolve" waits `in_doubt_grace_s` for a delivery report to settle
them (another component matches reports by correlation id) and otherwise returns them to
'pending'; "resend" returns them at once; "fail" marks them 'failed'.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import structlog

from campaign import db
from campaign.aio import sleep_or_stop
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
    ) -> None:
        self._pool = pool
        self._queries = db.require(queries, QUERIES)
        self._services = services
        self._worker_id = worker_id
        self._interval_s = interval_s

    async def run(self, stop: asyncio.Event) -> None:
        """run_once every interval until `stop` is set."""
        while not await sleep_or_stop(stop, self._interval_s):
            try:
                await self.run_once()
            except db.UNAVAILABLE_ERRORS as exc:
                log.error("recovery_failed", error=str(exc), error_type=type(exc).__name__)

    async def run_once(self) -> RecoveryResult:
        """Take back expired leases, then settle in-doubt recipients per service."""
        batches = released = in_doubt = 0
        while True:
            row = await self._pool.fetchrow(self._queries["recovery_expired_batches"], BATCH_CHUNK)
            assert row is not None
            batches += row["batches"]
            released += row["released"]
            in_doubt += row["in_doubt"]
            if row["batches"] < BATCH_CHUNK:
                break
        resent = failed = 0
        for name, service in self._services.items():
            grace_s = service.in_doubt_grace_s if service.on_timeout == "resolve" else 0.0
            while True:
                statuses = await self._pool.fetch(
                    self._queries["recovery_resolve_unknown"],
                    name,
                    grace_s,
                    service.on_timeout == "fail",
                    service.max_attempts,
                    CHUNK,
                )
                resent += sum(r["status"] == "pending" for r in statuses)
                failed += sum(r["status"] == "failed" for r in statuses)
                if len(statuses) < CHUNK:
                    break
        result = RecoveryResult(batches, released, in_doubt, resent, failed)
        if result:
            log.info(
                "recovery_finished",
                batches=batches,
                released=released,
                in_doubt=in_doubt,
                resent=resent,
                failed=failed,
            )
        return result

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
