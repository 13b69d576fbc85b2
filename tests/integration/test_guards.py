"""Guard rails decided by the producer: a number is texted once per campaign (the lowest
id), and the frequency cap across campaigns, exact with several producers at once."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from campaign import config, db
from campaign import producer as producer_module
from campaign.batch import Lane
from campaign.prepare import normalise_all
from campaign.producer import Producer, claimed_row, prepare_batch
from tests.helpers.seed import add_recipients, create_campaign, numbers

# One number written three ways: all normalise to +919800000007.
SAME = ["919800000007", "+91 98000 00007", "+91-98000-00007"]


def make_producer(
    pool: asyncpg.Pool,
    *,
    worker_id: str = "w1",
    batch_size: int = 10,
    max_per_msisdn: int = 0,
) -> Producer:
    service = config.ServiceSettings(
        key="k", sender_id="S", rate_per_s=1000.0, batch_size=batch_size
    )
    lane = Lane(name="default", settings=service, queue_size=1000)
    return Producer(
        pool=pool,
        queries=db.load_queries(),
        lanes={"default": lane},
        settings=config.ProducerSettings(queue_size=1000),
        worker_id=worker_id,
        notify_url=None,
        policy=config.PolicySettings(max_per_msisdn=max_per_msisdn),
    )


async def rows(conn: asyncpg.Connection, campaign_id: int) -> dict[int, asyncpg.Record]:
    found = await conn.fetch(
        "SELECT id, status, error_code, error_message FROM campaign.recipients"
        " WHERE campaign_id = $1 ORDER BY id",
        campaign_id,
    )
    return {r["id"]: r for r in found}


async def test_a_number_written_three_ways_in_one_batch_is_sent_once_lowest_id(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, [*numbers(3), *SAME])
    await make_producer(pool).fill()

    got = await rows(conn, cid)
    first, *others = ids[3:]
    assert got[first]["status"] == "sending"
    for rid in others:
        assert got[rid]["status"] == "duplicate"
        assert got[rid]["error_code"] == "duplicate"
        assert f"recipient {first}" in got[rid]["error_message"]
    assert all(got[rid]["status"] == "sending" for rid in ids[:3])


async def test_duplicates_across_batches_and_rows_inserted_late(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn)
    # Batches of 10: the number's first row is in the first batch, its second in the third.
    ids = await add_recipients(conn, cid, [SAME[0], *numbers(20), SAME[1]])
    producer = make_producer(pool)
    await producer.fill()
    got = await rows(conn, cid)
    assert got[ids[0]]["status"] == "sending"
    assert got[ids[-1]]["status"] == "duplicate"
    # Sent meanwhile; a row with the same number inserted while the campaign runs.
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'queued' WHERE campaign_id = $1"
        " AND status = 'sending'",
        cid,
    )
    (late,) = await add_recipients(conn, cid, [SAME[2]])
    await producer.fill()
    got = await rows(conn, cid)
    assert got[late]["status"] == "duplicate"
    assert f"recipient {ids[0]}" in got[late]["error_message"]


async def test_allow_duplicates_sends_every_row(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn, allow_duplicates=True)
    ids = await add_recipients(conn, cid, SAME)
    await make_producer(pool).fill()
    got = await rows(conn, cid)
    assert [got[i]["status"] for i in ids] == ["sending"] * 3


async def test_the_lowest_id_wins_when_a_later_batch_is_prepared_first(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    # Two workers claim rows 1-10 and 11-20 at once; the one holding the higher ids
    # prepares first. The number's row in the lower batch must still be the one sent.
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, [*numbers(2), SAME[0], *numbers(12, start=10), SAME[1]])
    low_worker, high_worker = make_producer(pool, worker_id="a"), make_producer(pool, worker_id="b")
    low = await low_worker._claim_next(None, [])
    high = await high_worker._claim_next(None, [])
    assert low is not None and high is not None
    assert max(r["id"] for r in low.records) < min(r["id"] for r in high.records)
    await high_worker._check_and_queue(high)
    got = await rows(conn, cid)
    assert got[ids[-1]]["status"] == "duplicate"
    assert f"recipient {ids[2]}" in got[ids[-1]]["error_message"]
    # The lower batch's row is left for its own batch to store, and is sent.
    assert got[ids[2]]["status"] == "sending"
    await low_worker._check_and_queue(low)
    got = await rows(conn, cid)
    assert got[ids[2]]["status"] == "sending"
    queued = [low_worker._lanes["default"].queue.get_nowait()]
    assert ids[2] in queued[0].recipient_ids


async def test_a_pending_row_far_below_a_batch_is_decided_when_claimed_never_sent_twice(
    pool: asyncpg.Pool, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The duplicate rule looks for undecided rows only UNDECIDED_SPAN ids below a batch:
    # looking further walked the index entries of every row the campaign had sent. A row
    # given back far below (its claim's worker died) does not own its number then; the
    # batch that claims it later finds the number taken. One text either way.
    monkeypatch.setattr(producer_module, "UNDECIDED_SPAN", 5)
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, [SAME[0], *numbers(20, start=10), SAME[1]])
    worker = make_producer(pool, batch_size=10)
    worker._after[cid] = ids[15]  # its cursor is ten rows past the row given back
    first = await worker._claim_next(None, [])
    assert first is not None and ids[-1] in {r["id"] for r in first.records}
    await worker._check_and_queue(first)
    got = await rows(conn, cid)
    assert got[ids[-1]]["status"] == "sending"
    assert got[ids[0]]["status"] == "pending"

    worker._after.clear()
    second = await worker._claim_next(None, [])
    assert second is not None and ids[0] in {r["id"] for r in second.records}
    await worker._check_and_queue(second)
    got = await rows(conn, cid)
    assert got[ids[0]]["status"] == "duplicate"
    assert f"recipient {ids[-1]}" in got[ids[0]]["error_message"]


async def test_two_workers_at_once_send_each_number_once(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn)
    # 30 numbers, each three times, spread so every batch of 7 holds repeats of others.
    msisdns = [numbers(30)[i % 30] for i in range(90)]
    ids = await add_recipients(conn, cid, msisdns)
    workers = [make_producer(pool, worker_id=f"w{i}", batch_size=7) for i in range(2)]
    for _ in range(50):
        await asyncio.gather(*(w.fill() for w in workers))
        left = await conn.fetchval(
            "SELECT count(*) FROM campaign.recipients WHERE campaign_id = $1"
            " AND status = 'pending'",
            cid,
        )
        if left == 0:
            break
    got = await rows(conn, cid)
    sent = [i for i in ids if got[i]["status"] == "sending"]
    assert sorted(sent) == ids[:30], "each number's first row, and only it"
    assert sum(got[i]["status"] == "duplicate" for i in ids) == 60


async def test_the_cap_holds_with_three_workers_and_two_overlapping_campaigns(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    shared = numbers(40)
    first = await create_campaign(conn)
    second = await create_campaign(conn)
    await add_recipients(conn, first, shared)
    await add_recipients(conn, second, list(reversed(shared)))
    workers = [
        make_producer(pool, worker_id=f"w{i}", batch_size=6, max_per_msisdn=1) for i in range(3)
    ]
    for _ in range(50):
        await asyncio.gather(*(w.fill() for w in workers))
        left = await conn.fetchval(
            "SELECT count(*) FROM campaign.recipients WHERE status = 'pending'"
        )
        if left == 0:
            break
    per_number = await conn.fetch(
        "SELECT msisdn, count(*) FILTER (WHERE status = 'sending') AS sent,"
        " count(*) FILTER (WHERE status = 'capped') AS capped"
        " FROM campaign.recipients GROUP BY msisdn"
    )
    assert len(per_number) == 40
    assert all(r["sent"] == 1 and r["capped"] == 1 for r in per_number)
    message = await conn.fetchval(
        "SELECT error_message FROM campaign.recipients WHERE status = 'capped' LIMIT 1"
    )
    assert message.startswith("1 messages sent to this number in the last 24 h")
    assert await conn.fetchval("SELECT count(*) FROM campaign.cap_reservations") == 40


async def test_bypass_caps_is_neither_stopped_nor_counted(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    otp = await create_campaign(conn, bypass_caps=True)
    await add_recipients(conn, otp, numbers(5))
    producer = make_producer(pool, max_per_msisdn=1)
    await producer.fill()
    offer = await create_campaign(conn)
    await add_recipients(conn, offer, numbers(5))
    await producer.fill()
    assert (
        await conn.fetchval("SELECT count(*) FROM campaign.recipients WHERE status = 'sending'")
        == 10
    )
    # Now the offers hold the cap: a second transactional campaign still goes.
    otp2 = await create_campaign(conn, bypass_caps=True)
    await add_recipients(conn, otp2, numbers(5))
    await producer.fill()
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM campaign.recipients"
            " WHERE campaign_id = $1 AND status = 'sending'",
            otp2,
        )
        == 5
    )
    assert await conn.fetchval("SELECT count(*) FROM campaign.cap_reservations") == 5


async def test_a_send_the_api_did_not_accept_gives_its_reservation_back(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, numbers(2))
    producer = make_producer(pool, max_per_msisdn=1)
    await producer.fill()
    batch_id = await conn.fetchval("SELECT batch_id FROM campaign.recipients WHERE id = $1", ids[0])
    outcome = {
        "id": ids,
        "status": ["queued", "rejected"],
        "transid": ["t1", None],
        "error_code": [None, "7001"],
        "error_message": [None, "refused"],
        "retry_in_s": [None, None],
        "attempts_added": [1, 1],
        "msisdn_e164": [None, None],
        "encoding": [None, None],
        "parts": [None, None],
    }
    await pool.fetchval(
        db.load_queries()["sender_write_results"],
        batch_id,
        outcome,
        "done",
        2,
        1,
        1,
        200,
        None,
        None,
        5,
    )
    held = await conn.fetch("SELECT recipient_id FROM campaign.cap_reservations")
    assert [r["recipient_id"] for r in held] == [ids[0]]


async def test_a_second_worker_waits_for_the_first_ones_reservation(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    # Worker A has counted and reserved a number but not committed; worker B, preparing
    # another campaign's row for that number, must wait and then see A's reservation.
    first = await create_campaign(conn)
    second = await create_campaign(conn)
    await add_recipients(conn, first, numbers(1))
    (late,) = await add_recipients(conn, second, numbers(1))
    a, b = (make_producer(pool, worker_id=w, max_per_msisdn=1) for w in ("a", "b"))
    claim_a = await a._claim_next(None, [])
    claim_b = await b._claim_next(None, [])
    assert claim_a is not None and claim_b is not None
    policy = config.PolicySettings(max_per_msisdn=1)
    service = claim_a.lane.settings
    queries = db.load_queries()

    async def prepare_in(connection: asyncpg.Connection, claim: object) -> None:
        rows = [claimed_row(r) for r in claim.records]  # type: ignore[attr-defined]
        await prepare_batch(
            connection,
            queries,
            claim.campaign,  # type: ignore[attr-defined]
            claim.records[0]["batch_id"],  # type: ignore[attr-defined]
            rows,
            normalise_all(rows, default_region=""),
            service=service,
            policy=policy,
        )

    async with pool.acquire() as conn_a, pool.acquire() as conn_b:
        tx_a = conn_a.transaction()
        await tx_a.start()
        await prepare_in(conn_a, claim_a)
        async with conn_b.transaction():
            second_worker = asyncio.create_task(prepare_in(conn_b, claim_b))
            for _ in range(600):
                waiting = await conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid = $1",
                    conn_b.get_server_pid(),
                )
                if waiting or second_worker.done():
                    break
                await asyncio.sleep(0.05)
            assert not second_worker.done(), "B decided without waiting for A's reservation"
            await tx_a.commit()
            await second_worker
    row = await conn.fetchrow("SELECT status FROM campaign.recipients WHERE id = $1", late)
    assert row["status"] == "capped"


async def test_deleting_a_campaign_forgets_its_numbers(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    gone = await create_campaign(conn)
    kept = await create_campaign(conn)
    await add_recipients(conn, gone, numbers(3))
    await add_recipients(conn, kept, numbers(2))
    await make_producer(pool).fill()
    assert await conn.fetchval("SELECT count(*) FROM campaign.campaign_numbers") == 5
    await conn.execute("DELETE FROM campaign.campaigns WHERE id = $1", gone)
    left = await conn.fetch("SELECT DISTINCT campaign_id FROM campaign.campaign_numbers")
    assert [r["campaign_id"] for r in left] == [kept]
