"""The canary and the failure brake through the producer, over a real PostgreSQL.

Outcomes are written here as the sender and the reconciler would (status, codes,
sent_at); the simulator runs them end to end in tests/acceptance/test_guard_rails.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from campaign import config, db
from campaign.batch import Lane
from campaign.producer import Producer
from tests.helpers.seed import add_recipients, create_campaign, numbers


def make_producer(
    pool: asyncpg.Pool, *, canary_wait_s: float = 600.0, failure_window: int = 10
) -> tuple[Producer, Lane]:
    settings = config.ServiceSettings(key="k", sender_id="S", batch_size=100)
    lane = Lane(name="default", settings=settings, queue_size=8)
    producer = Producer(
        pool=pool,
        queries=db.load_queries(),
        lanes={"default": lane},
        settings=config.ProducerSettings(),
        worker_id="w1",
        notify_url=None,
        policy=config.PolicySettings(canary_wait_s=canary_wait_s, failure_window=failure_window),
    )
    return producer, lane


def drain(lane: Lane) -> list[int]:
    """The recipient ids of every batch queued, in order."""
    ids: list[int] = []
    while not lane.queue.empty():
        ids += lane.queue.get_nowait().recipient_ids
    return ids


async def settle(
    conn: asyncpg.Connection, ids: Sequence[int], status: str, code: str | None = None
) -> None:
    """Rows accepted a moment ago and now final, as results and reports leave them."""
    await conn.execute(
        "UPDATE campaign.recipients SET status = $2, dr_code = $3, sent_at = now(), "
        "dr_at = now(), updated_at = clock_timestamp() WHERE id = ANY($1::bigint[])",
        list(ids),
        status,
        code,
    )


async def campaign_row(conn: asyncpg.Connection, cid: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT status, paused_reason, canary_judged_at, brake_since "
        "FROM campaign.campaigns WHERE id = $1",
        cid,
    )
    assert row is not None
    return row


async def test_a_failing_canary_pauses_the_campaign_and_nothing_more_is_sent(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn, canary_size=5, max_failure_ratio=0.2)
    ids = await add_recipients(conn, cid, numbers(50))
    producer, lane = make_producer(pool)

    assert await producer.fill() == 1
    canary = drain(lane)
    assert canary == ids[:5]
    # Held: the canary is out and not judged yet.
    assert await producer.fill() == 0
    assert await producer.apply_brakes() == []

    await settle(conn, canary[:4], "failed", "7101")
    assert await producer.apply_brakes() == []  # one still in flight
    await settle(conn, canary[4:], "delivered", "7500")
    assert await producer.apply_brakes() == [cid]
    row = await campaign_row(conn, cid)
    assert row["status"] == "paused"
    assert row["paused_reason"] == (
        "canary: 4 of 5 reports failed (80.0% > 20.0%); top codes: 7101 x4"
    )
    assert await producer.fill() == 0
    pending = await conn.fetchval(
        "SELECT count(*) FROM campaign.recipients WHERE campaign_id = $1 AND status = 'pending'",
        cid,
    )
    assert pending == 45


async def test_a_good_canary_lets_the_rest_go_without_waiting_again(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn, canary_size=5, max_failure_ratio=0.5)
    ids = await add_recipients(conn, cid, numbers(30))
    producer, lane = make_producer(pool)
    assert await producer.fill() == 1
    canary = drain(lane)
    await settle(conn, canary[:1], "rejected")
    await settle(conn, canary[1:], "delivered", "7500")

    assert await producer.apply_brakes() == []
    row = await campaign_row(conn, cid)
    assert row["status"] == "running" and row["canary_judged_at"] is not None
    assert await producer.fill() == 1
    assert drain(lane) == ids[5:]


async def test_the_canary_counts_only_rows_sent_and_its_wait_is_bounded(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn, canary_size=5, max_failure_ratio=0.5)
    bad = await add_recipients(conn, cid, ["123", "456", "789"])
    good = await add_recipients(conn, cid, numbers(20))
    producer, lane = make_producer(pool, canary_wait_s=5)

    # Invalid rows are settled and do not count: the canary is five rows sent. The claim
    # of the next batch runs while the first is checked, so it may still count the three
    # invalid rows as claimed and take nothing: the following pass takes the rest.
    canary: list[int] = []
    for _ in range(3):
        await producer.fill()
        canary += drain(lane)
        if len(canary) >= 5:
            break
    assert canary == good[:5]
    invalid = await conn.fetchval(
        "SELECT count(*) FROM campaign.recipients WHERE id = ANY($1::bigint[]) "
        "AND status = 'invalid'",
        bad,
    )
    assert invalid == 3
    # Accepted, no report yet: held until canary_wait_s after the last was accepted.
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'queued', sent_at = now() "
        "WHERE id = ANY($1::bigint[])",
        canary,
    )
    assert await producer.apply_brakes() == []
    assert await producer.fill() == 0
    await conn.execute(
        "UPDATE campaign.recipients SET sent_at = now() - interval '6 seconds' "
        "WHERE id = ANY($1::bigint[])",
        canary,
    )
    assert await producer.apply_brakes() == []  # no report failed: judged good
    assert await producer.fill() == 1
    assert drain(lane) == good[5:]


async def test_the_rolling_brake_and_a_resume_that_counts_only_new_reports(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn, max_failure_ratio=0.2, status="running")
    ids = await add_recipients(conn, cid, numbers(60))
    producer, _lane = make_producer(pool, failure_window=10)

    # Fewer than failure_window reports: not judged yet, however bad.
    await settle(conn, ids[:5], "failed", "7102")
    assert await producer.apply_brakes() == []
    # Ten: 5 failed + 5 delivered = 50% > 20%.
    await settle(conn, ids[5:10], "delivered", "7500")
    assert await producer.apply_brakes() == [cid]
    row = await campaign_row(conn, cid)
    assert row["status"] == "paused"
    assert row["paused_reason"] == (
        "brake: 5 of the last 10 reports failed (50.0% > 20.0%); top codes: 7102 x5"
    )

    # The operator resumes: the old failures no longer count.
    await conn.execute("UPDATE campaign.campaigns SET status = 'ready' WHERE id = $1", cid)
    row = await campaign_row(conn, cid)
    assert row["brake_since"] is not None and row["paused_reason"] is None
    assert await producer.apply_brakes() == []
    # Ten new reports, 1 failed (10%): under the ratio. Then the window slides: the
    # latest ten hold 3 failures (30%): paused again.
    await settle(conn, ids[10:19], "delivered", "7500")
    await settle(conn, ids[19:20], "failed", "7201")
    assert await producer.apply_brakes() == []
    await settle(conn, ids[20:22], "failed", "7201")
    assert await producer.apply_brakes() == [cid]
    assert "3 of the last 10" in (await campaign_row(conn, cid))["paused_reason"]


async def test_no_ratio_no_brake(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    cid = await create_campaign(conn, status="running")
    ids = await add_recipients(conn, cid, numbers(20))
    producer, _lane = make_producer(pool, failure_window=10)
    await settle(conn, ids, "failed", "7101")
    assert await producer.apply_brakes() == []
    assert (await campaign_row(conn, cid))["status"] == "running"


async def test_api_rejections_count_as_failures(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn, max_failure_ratio=0.5, status="running")
    ids = await add_recipients(conn, cid, numbers(10))
    producer, _lane = make_producer(pool, failure_window=10)
    await settle(conn, ids[:4], "delivered", "7500")
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'rejected', error_code = '7103', "
        "updated_at = clock_timestamp() WHERE id = ANY($1::bigint[])",
        ids[4:],
    )
    assert await producer.apply_brakes() == [cid]
    reason = (await campaign_row(conn, cid))["paused_reason"]
    assert reason == "brake: 6 of the last 10 reports failed (60.0% > 50.0%); top codes: 7103 x6"
