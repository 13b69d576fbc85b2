"""The receiver's group commit against a real PostgreSQL, below HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import pytest

from campaign import db, reports
from campaign.webhooks import DatabaseUnavailable, GroupCommitter, StoreRefused, WebhookStats
from tests.helpers.webhooks import body, dr


def parsed(transid: str) -> list[reports.DeliveryReport]:
    return reports.parse_delivery_reports(body(dr(transid)))


@contextlib.asynccontextmanager
async def committer(pool: asyncpg.Pool, *, run: bool = True) -> AsyncIterator[GroupCommitter]:
    group = GroupCommitter(
        pool=pool,
        sql=db.load_queries()["webhook_insert_reports"],
        group_max=100,
        timeout_s=5.0,
        stats=WebhookStats(),
    )
    task = asyncio.create_task(group.run()) if run else None
    try:
        yield group
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        group.close()


async def test_requests_waiting_together_share_one_commit(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    stats = WebhookStats()
    async with committer(pool) as group:
        group._stats = stats
        results = await asyncio.gather(*(group.submit(parsed(f"g{i}")) for i in range(30)))
    # All 30 were waiting before the flusher first ran: one group, one statement.
    assert stats.groups_committed == 1
    assert results == [30] * 30
    assert await conn.fetchval("SELECT count(*) FROM campaign.delivery_reports") == 30


async def test_group_max_splits_groups_by_whole_requests(pool: asyncpg.Pool) -> None:
    stats = WebhookStats()
    async with committer(pool) as group:
        group._stats = stats
        big = [r for i in range(60) for r in parsed(f"b{i}")]
        await asyncio.gather(group.submit(big), group.submit(big[:1]), group.submit(parsed("x")))
        await asyncio.gather(*(group.submit(parsed(f"s{i}")) for i in range(150)))
    assert stats.reports_stored == 61 + 150
    # 60 + 1 + 1 fit in one group of 100; 150 single reports need two.
    assert stats.groups_committed == 3


async def test_a_request_the_database_refuses_does_not_fail_the_others(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    # The parser keeps messageCount in range; build one that slipped through anyway.
    (bad,) = parsed("bad")
    bad = dataclasses.replace(bad, message_count=2**40)
    async with committer(pool) as group:
        results = await asyncio.gather(
            group.submit(parsed("good1")),
            group.submit([bad]),
            group.submit(parsed("good2")),
            return_exceptions=True,
        )
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], StoreRefused)
    rows = await conn.fetch("SELECT transid FROM campaign.delivery_reports ORDER BY 1")
    assert [r["transid"] for r in rows] == ["good1", "good2"]


async def test_waiters_get_an_answer_when_the_flusher_stops(pool: asyncpg.Pool) -> None:
    async with committer(pool, run=False) as group:
        waiting = asyncio.create_task(group.submit(parsed("late")))
        await asyncio.sleep(0)
        group.close()
        with pytest.raises(DatabaseUnavailable):
            await waiting


async def test_cancelled_flusher_answers_the_group_it_was_committing(pool: asyncpg.Pool) -> None:
    async with committer(pool, run=False) as group:
        waiting = [asyncio.create_task(group.submit(parsed(f"c{i}"))) for i in range(3)]
        await asyncio.sleep(0)
        assert len(group._waiting) == 3
        flusher = asyncio.create_task(group.run())
        # Let the flusher take the group and start its INSERT, then stop it mid-commit.
        while group._waiting:
            await asyncio.sleep(0)
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        async with asyncio.timeout(10):
            results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, DatabaseUnavailable) for r in results)
