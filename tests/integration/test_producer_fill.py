"""Producer.fill: queues never overflow, batches keep priority order, a failed claim is left."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import pytest

from campaign import config, db
from campaign import producer as producer_module
from campaign.batch import Lane
from campaign.producer import Producer
from tests.helpers.seed import add_recipients, create_campaign, numbers


def make_producer(
    pool: asyncpg.Pool, *, queue_size: int, clock: Callable[[], float] = time.monotonic
) -> tuple[Producer, Lane]:
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
        clock=clock,
    )
    return producer, lane


def queued_campaigns(lane: Lane) -> list[int]:
    return [lane.queue.get_nowait().campaign_id for _ in range(lane.queue.qsize())]


async def test_fill_stops_at_the_queue_size_and_keeps_priority_order(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    low = await create_campaign(conn, priority=1)
    await add_recipients(conn, low, numbers(200))
    high = await create_campaign(conn, priority=3)
    await add_recipients(conn, high, numbers(35, start=1000))
    producer, lane = make_producer(pool, queue_size=7)

    assert await producer.fill() == 7

    # 4 batches of the high campaign (10, 10, 10, 5), then the low one's, never more than 7.
    assert queued_campaigns(lane) == [high] * 4 + [low] * 3
    claimed = await conn.fetchval(
        "SELECT count(*) FROM campaign.recipients WHERE status = 'sending'"
    )
    assert claimed == 35 + 30


async def test_a_failed_pass_leaves_no_place_taken_and_the_next_pass_goes_on(
    pool: asyncpg.Pool, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = await create_campaign(conn)
    await add_recipients(conn, cid, numbers(60))
    producer, lane = make_producer(pool, queue_size=8)
    real = producer._check_and_queue
    calls = 0

    async def flaky(claim):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncpg.exceptions.ConnectionDoesNotExistError("lost")
        return await real(claim)

    monkeypatch.setattr(producer, "_check_and_queue", flaky)
    with pytest.raises(asyncpg.exceptions.ConnectionDoesNotExistError):
        await producer.fill()
    assert lane.claiming == 0
    assert lane.queue.empty()

    await producer.fill()
    assert lane.claiming == 0
    batches = [lane.queue.get_nowait() for _ in range(lane.queue.qsize())]
    queued = sum(b.destinations for b in batches)
    # The failed batch's rows (and those of a claim under way then) wait for their lease
    # to run out, as after a crash; every other row was claimed and queued.
    held = await conn.fetchval(
        "SELECT count(*) FROM campaign.recipients "
        "WHERE status = 'sending' AND NOT batch_id = ANY($1::bigint[])",
        [b.id for b in batches],
    )
    assert 10 <= held <= 20
    assert queued + held == 60


async def test_a_small_campaign_goes_in_one_batch(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """The next claim runs while one is checked, never two claims at once: no split rows."""
    for _ in range(3):
        cid = await create_campaign(conn)
        await add_recipients(conn, cid, numbers(7, start=100 * cid))
    producer, lane = make_producer(pool, queue_size=8)

    assert await producer.fill() == 3
    assert [lane.queue.get_nowait().destinations for _ in range(3)] == [7, 7, 7]


async def test_claims_go_on_from_the_last_one_and_rows_due_again_behind_are_found(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """Claims start after the last full one; a rescan every RESCAN_S finds rows behind it."""
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, numbers(30))
    now = [1000.0]
    producer, lane = make_producer(pool, queue_size=1, clock=lambda: now[0])

    async def claim_one() -> list[int]:
        assert await producer.fill() == 1
        batch = lane.queue.get_nowait()
        return sorted(batch.recipient_ids)

    assert await claim_one() == ids[0:10]
    # A row of the first batch is due again (as after a retry or a released batch).
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'pending', batch_id = NULL WHERE id = $1",
        ids[2],
    )
    assert await claim_one() == ids[10:20]  # from the cursor on: ids[2] is behind it
    now[0] += producer_module.RESCAN_S
    assert await claim_one() == [ids[2], *ids[20:29]]  # rescanned from the start


async def test_a_row_behind_the_cursor_is_found_when_nothing_is_left_ahead(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, numbers(20))
    producer, lane = make_producer(pool, queue_size=2)
    assert await producer.fill() == 2  # two full batches: the cursor is at ids[19]
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'pending', batch_id = NULL WHERE id = $1",
        ids[5],
    )
    [lane.queue.get_nowait() for _ in range(2)]
    assert await producer.fill() == 1
    assert lane.queue.get_nowait().recipient_ids == (ids[5],)


async def test_a_long_fill_pass_renews_the_leases_of_batches_waiting_on_another_lane(
    pool: asyncpg.Pool, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fast lane keeps one fill pass claiming while a slow lane's batch waits in its
    # queue: the pass itself renews that lease every lease_s / 3, or recovery would take
    # the batch back from under the slow lane (production: lease_s 120 s, a pass over a
    # million-recipient campaign on the fast lane).
    slow_cid = await create_campaign(conn, service="slow", priority=3)
    await add_recipients(conn, slow_cid, numbers(10))
    fast_cid = await create_campaign(conn, service="fast", priority=1)
    await add_recipients(conn, fast_cid, numbers(100, start=1000))
    service = config.ServiceSettings(key="k", sender_id="S", rate_per_s=1000.0, batch_size=10)
    slow = Lane(name="slow", settings=service, queue_size=1)
    fast = Lane(name="fast", settings=service, queue_size=20)
    lease_s = 3.0
    producer = Producer(
        pool=pool,
        queries=db.load_queries(),
        lanes={"slow": slow, "fast": fast},
        settings=config.ProducerSettings(queue_size=20, lease_s=lease_s),
        worker_id="w1",
        notify_url=None,
    )
    real_claim = producer_module.claim_batch

    async def slow_claim(*args, **kwargs):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.5)  # eleven claims: the pass outlasts the lease
        return await real_claim(*args, **kwargs)

    monkeypatch.setattr(producer_module, "claim_batch", slow_claim)
    started = time.monotonic()
    assert await producer.fill() == 11
    assert time.monotonic() - started > lease_s
    (waiting,) = slow.held
    assert await conn.fetchval(
        "SELECT lease_until > now() FROM campaign.batches WHERE id = $1", waiting
    )
