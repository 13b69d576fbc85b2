"""Producer.fill with overlapping claims: queues never overflow, batches keep priority order."""

from __future__ import annotations

import asyncpg
import pytest

from campaign import config, db
from campaign import producer as producer_module
from campaign.producer import Lane, Producer
from tests.helpers.sending import add_recipients, create_campaign, numbers


def make_producer(pool: asyncpg.Pool, *, queue_size: int) -> tuple[Producer, Lane]:
    service = config.ServiceSettings(key="k", sender_id="S", rate_per_s=1000.0, batch_size=10)
    lane = Lane(name="default", settings=service, queue_size=queue_size)
    settings = config.ProducerSettings(queue_size=queue_size)
    producer = Producer(
        pool=pool,
        queries=db.load_queries(),
        lanes={"default": lane},
        settings=settings,
        worker_id="w1",
        notify_url=None,
    )
    return producer, lane


def queued_campaigns(lane: Lane) -> list[int]:
    return [lane.queue.get_nowait().campaign_id for _ in range(lane.queue.qsize())]


@pytest.mark.parametrize("claimers", [1, 2, 3])
async def test_fill_stops_at_the_queue_size_and_keeps_priority_order(
    pool: asyncpg.Pool, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, claimers: int
) -> None:
    monkeypatch.setattr(producer_module, "CLAIMERS", claimers)
    low = await create_campaign(conn, priority=1)
    await add_recipients(conn, low, numbers(200))
    high = await create_campaign(conn, priority=3)
    await add_recipients(conn, high, numbers(35, start=1000))
    producer, lane = make_producer(pool, queue_size=7)

    assert await producer.fill() == 7

    # 4 batches of the high campaign (10, 10, 10, 5), then the low one's, never more than 7.
    assert lane.claiming == 0
    assert queued_campaigns(lane) == [high] * 4 + [low] * 3
    claimed = await conn.fetchval(
        "SELECT count(*) FROM campaign.recipients WHERE status = 'sending'"
    )
    assert claimed == 35 + 30


async def test_a_claim_that_fails_does_not_block_the_next(
    pool: asyncpg.Pool, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = await create_campaign(conn)
    await add_recipients(conn, cid, numbers(40))
    producer, lane = make_producer(pool, queue_size=8)
    real = producer._claim
    calls = 0

    async def flaky(campaign, lane):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("lost")
        return await real(campaign, lane)

    monkeypatch.setattr(producer, "_claim", flaky)
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
        await producer.fill()
    assert lane.claiming == 0
    # The next pass claims the rest in order; the failed claim held nothing up.
    await producer.fill()
    assert lane.claiming == 0
    total = 0
    while not lane.queue.empty():
        total += lane.queue.get_nowait().destinations
    rows = await conn.fetch("SELECT status, batch_id FROM campaign.recipients")
    assert total == 40, [tuple(r) for r in rows]
