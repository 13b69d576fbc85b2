"""`campaign prune` next to the workers: a campaign reopened, or a row claimed, after prune
listed it wins over the chunked delete (two connections interleaving)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from campaign import config, db
from campaign.commands.prune import Pruner
from campaign.producer import claim_batch

pytestmark = pytest.mark.timeout(120)

# Only finished campaigns, two rows a statement: several chunks per campaign.
RETENTION = config.RetentionSettings(
    campaigns_days=30,
    reports_days=0,
    batches_days=0,
    incoming_days=0,
    rejects_days=0,
    batch_size=2,
)


async def _old_campaign(
    conn: asyncpg.Connection, statuses: list[str], *, status: str = "completed"
) -> int:
    """A campaign finished 40 days ago, one recipient per status."""
    campaign_id = int(
        await conn.fetchval(
            "INSERT INTO campaign.campaigns (name, service, body, status) "
            "VALUES ('old', 'default', 'hello', 'running') RETURNING id"
        )
    )
    await conn.execute(
        "INSERT INTO campaign.recipients (campaign_id, msisdn, status) "
        "SELECT $1, '4479111' || lpad(n::text, 5, '0'), s "
        "FROM unnest($2::text[]) WITH ORDINALITY AS t(s, n)",
        campaign_id,
        statuses,
    )
    # Finished after its rows were added: a row added to a completed campaign reopens it.
    await conn.execute(
        "UPDATE campaign.campaigns SET status = $2, completed_at = now() - interval '40 days' "
        "WHERE id = $1",
        campaign_id,
        status,
    )
    return campaign_id


class _AfterListing:
    """The pool the Pruner uses, running `between` once, right after prune listed the
    finished campaigns: what another connection does between the listing and the deletes."""

    def __init__(self, pool: asyncpg.Pool, between: Callable[[], Awaitable[None]]) -> None:
        self._pool = pool
        self._between: Callable[[], Awaitable[None]] | None = between

    async def fetch(self, *args: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._pool.fetch(*args)
        if self._between is not None and rows:
            between, self._between = self._between, None
            await between()
        return rows

    async def execute(self, *args: Any) -> str:
        return str(await self._pool.execute(*args))


def _pruner(pool: Any) -> Pruner:
    return Pruner(pool=pool, queries=db.load_queries(), settings=RETENTION)


async def _counts(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT status, count(*) AS n FROM campaign.recipients GROUP BY status ORDER BY status"
    )
    return {r["status"]: r["n"] for r in rows}


async def test_a_reopen_and_claim_committed_after_listing_win(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    campaign_id = await _old_campaign(conn, ["delivered"] * 5)

    async def reopen_and_claim() -> None:
        # A late row reopens the campaign (the recipients_reopen trigger), a worker claims it.
        await conn.execute(
            "INSERT INTO campaign.recipients (campaign_id, msisdn) VALUES ($1, '447911200000')",
            campaign_id,
        )
        claimed = await claim_batch(
            pool,
            db.load_queries()["producer_claim_batch"],
            campaign_id=campaign_id,
            limit=10,
            service="default",
            worker_id="w1",
            lease_s=60.0,
            after_id=0,
        )
        assert len(claimed) == 1

    deleted = await _pruner(_AfterListing(pool, reopen_and_claim)).run()
    assert (deleted["campaigns"], deleted["recipients"], deleted["batches"]) == (0, 0, 0)
    assert await _counts(conn) == {"delivered": 5, "sending": 1}
    assert await conn.fetchval("SELECT status FROM campaign.campaigns") == "running"
    assert await conn.fetchval("SELECT count(*) FROM campaign.batches") == 1


async def _wait_blocked_or_done(
    conn: asyncpg.Pool | asyncpg.Connection, task: asyncio.Future[Any]
) -> bool:
    """Wait until another backend of this database waits for a lock (True) or `task` ends."""
    async with asyncio.timeout(60):
        while not task.done():
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting:
                return True
            await asyncio.sleep(0.02)
    return False


async def test_a_reopen_in_flight_makes_the_chunk_wait_then_delete_nothing(
    pool: asyncpg.Pool, conn: asyncpg.Connection, dsn: str
) -> None:
    campaign_id = await _old_campaign(conn, ["delivered"] * 5)
    other = await db.connect(dsn)
    reopening = other.transaction()

    async def reopen_uncommitted() -> None:
        await reopening.start()
        await other.execute(
            "INSERT INTO campaign.recipients (campaign_id, msisdn) VALUES ($1, '447911200000')",
            campaign_id,
        )

    try:
        task = asyncio.create_task(_pruner(_AfterListing(pool, reopen_uncommitted)).run())
        blocked = await _wait_blocked_or_done(conn, task)
        await reopening.commit()
        deleted = await task
    finally:
        await other.close()
    # The chunk waited for the reopen, saw the campaign running, and deleted nothing.
    assert blocked
    assert (deleted["campaigns"], deleted["recipients"]) == (0, 0)
    assert await _counts(conn) == {"delivered": 5, "pending": 1}
    assert await conn.fetchval("SELECT status FROM campaign.campaigns") == "running"


async def test_a_prune_chunk_in_flight_makes_a_reopen_wait_and_the_next_chunk_stops(
    pool: asyncpg.Pool, conn: asyncpg.Connection, dsn: str
) -> None:
    campaign_id = await _old_campaign(conn, ["delivered"] * 5)
    queries = db.load_queries()
    other = await db.connect(dsn)
    try:
        # One chunk of prune in an open transaction, then a reopen from another connection.
        async with conn.transaction():
            first = await conn.execute(
                queries["prune_campaign_recipients"], campaign_id, 30, ["delivered"], 2
            )
            insert = asyncio.create_task(
                other.execute(
                    "INSERT INTO campaign.recipients (campaign_id, msisdn) "
                    "VALUES ($1, '447911200000')",
                    campaign_id,
                )
            )
            assert await _wait_blocked_or_done(pool, insert)
        await insert
    finally:
        await other.close()
    assert first == "DELETE 2"
    # The reopen committed after that chunk: every later statement of prune leaves it alone.
    deleted = await _pruner(pool).run()
    assert (deleted["campaigns"], deleted["recipients"]) == (0, 0)
    assert await _counts(conn) == {"delivered": 3, "pending": 1}


async def test_only_final_recipients_are_deleted_and_the_campaign_waits_for_the_rest(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    # Cancelled while messages were out: a queued row still waits for its report.
    campaign_id = await _old_campaign(
        conn, ["delivered", "failed", "cancelled", "queued", "delivered"], status="cancelled"
    )

    async def claim_behind_the_listing() -> None:
        # A row moved to sending after prune listed the campaign (prune_finished_campaigns
        # only lists campaigns with none): the chunk must check again.
        await conn.execute(
            "UPDATE campaign.recipients SET status = 'sending' "
            "WHERE id = (SELECT max(id) FROM campaign.recipients WHERE campaign_id = $1)",
            campaign_id,
        )

    deleted = await _pruner(_AfterListing(pool, claim_behind_the_listing)).run()
    assert (deleted["campaigns"], deleted["recipients"]) == (0, 3)
    assert await _counts(conn) == {"queued": 1, "sending": 1}
    assert await conn.fetchval("SELECT count(*) FROM campaign.campaigns") == 1
