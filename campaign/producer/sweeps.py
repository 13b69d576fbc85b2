"""The producer's sweeps: pending rows of cancelled and expired campaigns get their final
status, old cap reservations go, campaigns on a service nobody sends for are named, and
canaries and the failure brake are judged.

One transaction per sweep (the producer adds its own statements to it), so an idle worker
costs the database one commit per poll, not one per statement. The bounded statements take
one chunk there; a full chunk goes on in statements of their own after the commit, so a
huge campaign is not one long transaction. What a sweep found is logged after its commit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from campaign import db, metrics
from campaign.config import PolicySettings

log = structlog.get_logger(__name__)

SWEEP_CHUNK = 10_000


async def sweep_chunk(conn: db.PoolConnection, sql: str) -> int:
    """One chunk of a bounded sweep on `conn`; returns the rows it changed."""
    status = await conn.execute(sql, SWEEP_CHUNK)
    return int(status.split()[-1])


async def sweep_all(pool: db.Pool, sql: str) -> int:
    """A bounded sweep until a chunk comes back short, each chunk its own transaction."""
    total = 0
    while True:
        status = await pool.execute(sql, SWEEP_CHUNK)
        count = int(status.split()[-1])
        total += count
        if count < SWEEP_CHUNK:
            return total


@dataclass(slots=True)
class Swept:
    """What one transaction of sweeps found, logged once it committed."""

    cancelled: int
    expired: int
    unknown: list[db.Record] = field(default_factory=list)
    canaries: list[db.Record] = field(default_factory=list)
    brakes: list[db.Record] = field(default_factory=list)


class Sweeps:
    def __init__(
        self,
        *,
        pool: db.Pool,
        queries: Mapping[str, str],
        policy: PolicySettings,
        services: Sequence[str],
    ) -> None:
        self._pool = pool
        self._queries = queries
        self._policy = policy
        self._services = list(services)
        # Campaigns already reported as on an unknown service: one error line each.
        self._reported_unknown: set[int] = set()

    async def once(self, conn: db.PoolConnection) -> Swept:
        """The sweeps' statements on `conn`, in the caller's transaction: one chunk each."""
        swept = Swept(
            cancelled=await sweep_chunk(conn, self._queries["producer_cancel_pending"]),
            expired=await sweep_chunk(conn, self._queries["producer_expire_pending"]),
        )
        if self._policy.max_per_msisdn:
            await conn.execute(
                self._queries["producer_prune_reservations"],
                self._policy.cap_window_h,
                SWEEP_CHUNK,
            )
        swept.unknown = await conn.fetch(
            self._queries["producer_unknown_service_campaigns"], self._services
        )
        swept.canaries, swept.brakes = await self._judge(conn)
        return swept

    async def finish(self, swept: Swept) -> tuple[int, int]:
        """After the sweeps' commit: the rest of a full chunk, then what they found,
        logged; returns the rows cancelled and expired."""
        cancelled, expired = swept.cancelled, swept.expired
        if cancelled == SWEEP_CHUNK:
            cancelled += await sweep_all(self._pool, self._queries["producer_cancel_pending"])
        if expired == SWEEP_CHUNK:
            expired += await sweep_all(self._pool, self._queries["producer_expire_pending"])
        if cancelled or expired:
            log.info("pending_swept", cancelled=cancelled, expired=expired)
        self._report_unknown_services(swept.unknown)
        self._log_judged(swept.canaries, swept.brakes)
        return cancelled, expired

    async def apply_brakes(self) -> list[int]:
        """Judge canaries that are done and pause campaigns failing too much (one
        transaction); returns the campaigns paused."""
        async with self._pool.acquire() as conn, conn.transaction():
            canaries, brakes = await self._judge(conn)
        return self._log_judged(canaries, brakes)

    async def _judge(self, conn: db.PoolConnection) -> tuple[list[db.Record], list[db.Record]]:
        canaries = await conn.fetch(
            self._queries["producer_judge_canaries"], self._policy.canary_wait_s
        )
        brakes = await conn.fetch(
            self._queries["producer_brake_campaigns"], self._policy.failure_window
        )
        return canaries, brakes

    def _log_judged(self, canaries: list[db.Record], brakes: list[db.Record]) -> list[int]:
        """Log the canaries judged and the campaigns paused; returns the paused ones."""
        paused: list[int] = []
        for row in canaries:
            if row["paused"]:
                paused.append(row["id"])
                _log_paused(row["id"], "canary", row["paused_reason"])
            else:
                log.info(
                    "campaign_canary_passed",
                    campaign_id=row["id"],
                    delivered=row["delivered"],
                    failed=row["failed"],
                )
        for row in brakes:
            paused.append(row["id"])
            _log_paused(row["id"], "brake", row["paused_reason"])
        return paused

    def _report_unknown_services(self, rows: list[db.Record]) -> None:
        for row in rows:
            if row["id"] in self._reported_unknown:
                continue
            self._reported_unknown.add(row["id"])
            log.error(
                "campaign_service_unknown",
                campaign_id=row["id"],
                service=row["service"],
                services=sorted(self._services),
                hint="add [services.NAME] to the config or fix the campaign's service",
            )


def _log_paused(campaign_id: int, by: str, reason: str) -> None:
    metrics.CAMPAIGNS_AUTO_PAUSED.labels(by=by).inc()
    log.warning(
        "campaign_auto_paused",
        campaign_id=campaign_id,
        by=by,
        reason=reason,
        hint="see `campaign status ID`; resume with `campaign resume ID` "
        "(or status = 'ready') once the cause is fixed",
    )
