"""Every named query of the producer, the senders and crash recovery, on a real database."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from datetime import UTC, datetime

import asyncpg
import pytest

from campaign import db
from campaign.producer import QUERIES as PRODUCER_QUERIES
from campaign.recovery import QUERIES as RECOVERY_QUERIES
from campaign.sender import QUERIES as SENDER_QUERIES
from tests.helpers.plans import plan_nodes
from tests.helpers.seed import add_recipients, create_campaign, numbers, statuses


@pytest.fixture(scope="module")
def q() -> Mapping[str, str]:
    return db.require(db.load_queries(), PRODUCER_QUERIES + SENDER_QUERIES + RECOVERY_QUERIES)


async def claim(
    conn: asyncpg.Connection,
    q: Mapping[str, str],
    campaign_id: int,
    size: int = 10,
    *,
    worker: str = "w1",
    lease_s: float = 60.0,
    after: int = 0,
) -> list[asyncpg.Record]:
    return await conn.fetch(
        q["producer_claim_batch"], campaign_id, size, "default", worker, lease_s, after
    )


async def next_id(conn: asyncpg.Connection, q: Mapping[str, str], skip: list[int] | None = None):
    row = await conn.fetchrow(q["producer_next_campaign"], ["default"], skip or [], {})
    return None if row is None else row["id"]


# --- next_campaign -------------------------------------------------------------------


async def test_next_campaign_orders_by_priority_then_age(conn, q) -> None:
    low = await create_campaign(conn, priority=1)
    high_old = await create_campaign(conn, priority=3)
    high_new = await create_campaign(conn, priority=3)
    for cid in (low, high_old, high_new):
        await add_recipients(conn, cid, numbers(1))
    assert await next_id(conn, q) == high_old
    assert await next_id(conn, q, [high_old]) == high_new
    assert await next_id(conn, q, [high_old, high_new]) == low


async def test_the_probe_for_due_work_is_never_compiled(conn, q) -> None:
    """The probe is planned with the canary's count over the campaign's recipients: with a
    few million of them its estimate passed PostgreSQL's JIT thresholds, and every probe
    spent 330 ms compiling a statement that runs in under 10 ms. Our sessions turn JIT off.
    The thresholds are lowered to 0 here, so that ten rows cost what millions would."""
    assert await conn.fetchval("SHOW jit") == "off"
    cid = await create_campaign(conn)
    await add_recipients(conn, cid, numbers(10))
    async with conn.transaction():
        for threshold in ("jit_above_cost", "jit_inline_above_cost", "jit_optimize_above_cost"):
            await conn.execute(f"SET LOCAL {threshold} = 0")
        explained = await conn.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + q["producer_next_campaign"], ["default"], [], {}
        )
    # A server built without LLVM (the embedded one) never compiles; this one would.
    assert "JIT" not in json.loads(explained)[0]
    assert next(plan_nodes(explained))["Actual Rows"] == 1


async def test_next_campaign_skips_what_cannot_send_now(conn, q) -> None:
    specs = [
        {"status": "draft"},
        {"status": "paused"},
        {"status": "cancelled"},
        {"service": "other"},
    ]
    for spec in specs:
        await add_recipients(conn, await create_campaign(conn, **spec), numbers(1))
    # Adding recipients reopens a completed campaign; one completed after its last row is not.
    finished = await create_campaign(conn, status="running")
    await add_recipients(conn, finished, numbers(1))
    await conn.execute("UPDATE campaign.campaigns SET status = 'completed' WHERE id = $1", finished)
    later = await create_campaign(conn)
    await conn.execute(
        "UPDATE campaign.campaigns SET send_after = now() + interval '1 hour' WHERE id = $1", later
    )
    await add_recipients(conn, later, numbers(1))
    expired = await create_campaign(conn)
    await conn.execute(
        "UPDATE campaign.campaigns SET expires_at = now() - interval '1 second' WHERE id = $1",
        expired,
    )
    await add_recipients(conn, expired, numbers(1))
    backing_off = await create_campaign(conn)
    await add_recipients(conn, backing_off, numbers(1))
    await conn.execute(
        "UPDATE campaign.recipients SET next_attempt_at = now() + interval '1 hour' "
        "WHERE campaign_id = $1",
        backing_off,
    )
    no_recipients = await create_campaign(conn)
    assert no_recipients
    assert await next_id(conn, q) is None

    due = await create_campaign(conn, status="running")
    await conn.execute(
        "UPDATE campaign.campaigns SET send_after = now() - interval '1 second', "
        "expires_at = now() + interval '1 hour' WHERE id = $1",
        due,
    )
    await add_recipients(conn, due, numbers(1))
    assert await next_id(conn, q) == due


# --- claim_batch ---------------------------------------------------------------------


async def test_claim_takes_oldest_due_rows_under_a_lease(conn, q) -> None:
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, numbers(5))
    await conn.execute(
        "UPDATE campaign.recipients SET next_attempt_at = now() + interval '1 hour' WHERE id = $1",
        ids[0],
    )
    rows = await claim(conn, q, cid, 3, lease_s=60)
    assert [r["id"] for r in rows] == ids[1:4]
    batch_id = rows[0]["batch_id"]
    assert {r["batch_id"] for r in rows} == {batch_id}
    batch = await conn.fetchrow("SELECT * FROM campaign.batches WHERE id = $1", batch_id)
    assert batch["status"] == "claimed"
    assert batch["worker_id"] == "w1"
    assert batch["destinations"] == 3
    lease = await conn.fetchval(
        "SELECT lease_until - now() FROM campaign.batches WHERE id = $1", batch_id
    )
    assert 55 < lease.total_seconds() <= 60
    assert await statuses(conn, cid) == {"pending": 2, "sending": 3}
    campaign = await conn.fetchrow("SELECT * FROM campaign.campaigns WHERE id = $1", cid)
    assert campaign["status"] == "running"
    assert campaign["started_at"] is not None


async def test_claim_returns_nothing_and_no_batch_when_nothing_is_due(conn, q) -> None:
    cid = await create_campaign(conn)
    assert await claim(conn, q, cid) == []
    assert await conn.fetchval("SELECT count(*) FROM campaign.batches") == 0
    assert (
        await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id = $1", cid) == "ready"
    )


async def test_claim_respects_a_pause_committed_after_next_campaign(conn, q) -> None:
    cid = await create_campaign(conn)
    await add_recipients(conn, cid, numbers(3))
    await conn.execute("UPDATE campaign.campaigns SET status = 'paused' WHERE id = $1", cid)
    assert await claim(conn, q, cid) == []
    assert await statuses(conn, cid) == {"pending": 3}


async def test_two_claimers_never_take_the_same_row(dsn, q) -> None:
    setup = await db.connect(dsn)
    first = await db.connect(dsn)
    second = await db.connect(dsn)
    try:
        # Running already: a first claim of a ready campaign also updates the campaign row,
        # which a concurrent claim waits for (for one statement, outside this test).
        cid = await create_campaign(setup, status="running")
        ids = await add_recipients(setup, cid, numbers(20))
        async with first.transaction():
            taken_first = await claim(first, q, cid, 8, worker="a")
            # The first claim holds its row locks: the second skips them instead of waiting.
            taken_second = await claim(second, q, cid, 8, worker="b")
        a = {r["id"] for r in taken_first}
        b = {r["id"] for r in taken_second}
        assert len(a) == len(b) == 8
        assert not a & b
        assert a | b == set(ids[:16])
    finally:
        for c in (setup, first, second):
            await c.close()


async def test_concurrent_claimers_partition_the_rows(pool, q) -> None:
    async with pool.acquire() as conn:
        cid = await create_campaign(conn)
        ids = await add_recipients(conn, cid, numbers(500))

    async def claimer(name: str) -> list[int]:
        mine: list[int] = []
        for _ in range(200):
            async with pool.acquire() as conn:
                rows = await claim(conn, q, cid, 7, worker=name)
            if not rows:
                return mine
            mine.extend(r["id"] for r in rows)
        return mine

    results = await asyncio.gather(*(claimer(f"w{i}") for i in range(6)))
    claimed = [rid for part in results for rid in part]
    assert len(claimed) == len(set(claimed)) == len(ids)
    assert set(claimed) == set(ids)


# --- suppressed_numbers / prepare_recipients ------------------------------------------


async def test_suppressed_numbers(conn, q) -> None:
    await conn.execute("INSERT INTO campaign.suppressions (msisdn) VALUES ('+919800000001')")
    rows = await conn.fetch(q["producer_suppressed_numbers"], ["+919800000001", "+919800000002"])
    assert [r["msisdn"] for r in rows] == ["+919800000001"]


async def test_prepare_recipients_records_final_statuses(conn, q) -> None:
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, numbers(3))
    rows = await claim(conn, q, cid)
    batch_id = rows[0]["batch_id"]
    # Only the rows that must not be sent are passed; the first one stays in the batch.
    left = await conn.fetchval(
        q["producer_prepare_recipients"],
        batch_id,
        ids[1:],
        ["invalid", "suppressed"],
        [None, "+919800000002"],
        [None, None],
        ["invalid_msisdn", "suppressed"],
        ["bad", "number opted out"],
    )
    assert left == 1
    got = await conn.fetch(
        "SELECT status, msisdn_e164, encoding, parts, error_code, error_message "
        "FROM campaign.recipients WHERE campaign_id = $1 ORDER BY id",
        cid,
    )
    assert [tuple(r) for r in got] == [
        ("sending", None, None, None, None, None),
        ("invalid", None, None, None, "invalid_msisdn", "bad"),
        ("suppressed", "+919800000002", None, None, "suppressed", "number opted out"),
    ]
    assert await conn.fetchval("SELECT status FROM campaign.batches WHERE id = $1", batch_id) == (
        "claimed"
    )


async def test_prepare_recipients_closes_a_batch_with_nothing_to_send(conn, q) -> None:
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, numbers(2))
    batch_id = (await claim(conn, q, cid))[0]["batch_id"]
    left = await conn.fetchval(
        q["producer_prepare_recipients"],
        batch_id,
        ids,
        ["invalid", "invalid"],
        [None, None],
        [None, None],
        ["x", "x"],
        ["y", "y"],
    )
    assert left == 0
    batch = await conn.fetchrow("SELECT * FROM campaign.batches WHERE id = $1", batch_id)
    assert batch["status"] == "done"
    assert batch["finished_at"] is not None


async def test_prepare_recipients_stores_final_and_held_rows_in_one_statement(conn, q) -> None:
    """A batch with a final row and rows the sending window held back leaves the batch in
    one statement: the final row without a next attempt, the waiting one pending until its
    window opens, the one whose window opens too late expired; the batch counts all three
    down and is closed once nothing is left to send."""
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, numbers(4))
    batch_id = (await claim(conn, q, cid))[0]["batch_id"]
    opens = datetime(2030, 1, 1, 3, 30, tzinfo=UTC)
    store = (
        q["producer_prepare_recipients"],
        batch_id,
        ids[1:],
        ["duplicate", "pending", "expired"],
        ["+919800000002", "+919800000003", "+919800000004"],
        [None, opens, None],
        ["duplicate", "outside_window", "window_after_expiry"],
        ["same as r1", "opens later", "opens after expiry"],
    )
    assert await conn.fetchval(*store) == 1
    got = await conn.fetch(
        "SELECT status, msisdn_e164, next_attempt_at, error_code, batch_id "
        "FROM campaign.recipients WHERE campaign_id = $1 ORDER BY id",
        cid,
    )
    assert [tuple(r) for r in got] == [
        ("sending", None, None, None, batch_id),
        ("duplicate", "+919800000002", None, "duplicate", batch_id),
        ("pending", "+919800000003", opens, "outside_window", batch_id),
        ("expired", "+919800000004", None, "window_after_expiry", batch_id),
    ]
    batch = await conn.fetchrow("SELECT * FROM campaign.batches WHERE id = $1", batch_id)
    assert (batch["status"], batch["destinations"], batch["finished_at"]) == ("claimed", 1, None)
    # Rows no longer 'sending' in this batch are not counted again.
    assert await conn.fetchval(*store) == 1

    left = await conn.fetchval(
        q["producer_prepare_recipients"],
        batch_id,
        ids[:1],
        ["pending"],
        ["+919800000001"],
        [opens],
        ["outside_window"],
        ["opens later"],
    )
    assert left == 0
    batch = await conn.fetchrow("SELECT * FROM campaign.batches WHERE id = $1", batch_id)
    assert batch["status"] == "done" and batch["finished_at"] is not None


# --- cancel_pending / expire_pending ----------------------------------------------------


async def test_cancel_and_expire_sweeps(conn, q) -> None:
    cancelled = await create_campaign(conn)
    await add_recipients(conn, cancelled, numbers(3))
    await claim(conn, q, cancelled, 1)
    await conn.execute(
        "UPDATE campaign.campaigns SET status = 'cancelled' WHERE id = $1", cancelled
    )
    expired = await create_campaign(conn)
    await add_recipients(conn, expired, numbers(2))
    await conn.execute(
        "UPDATE campaign.campaigns SET expires_at = now() - interval '1 second' WHERE id = $1",
        expired,
    )
    alive = await create_campaign(conn)
    await add_recipients(conn, alive, numbers(2))

    assert await conn.execute(q["producer_cancel_pending"], 1) == "UPDATE 1"
    assert await conn.execute(q["producer_cancel_pending"], 100) == "UPDATE 1"
    assert await conn.execute(q["producer_expire_pending"], 100) == "UPDATE 2"
    assert await statuses(conn, cancelled) == {"sending": 1, "cancelled": 2}
    assert await statuses(conn, expired) == {"expired": 2}
    assert await statuses(conn, alive) == {"pending": 2}


# --- mark_posting / write_results / release_batch ---------------------------------------


async def test_mark_posting_only_for_the_owner_of_a_claimed_batch(conn, q) -> None:
    cid = await create_campaign(conn)
    await add_recipients(conn, cid, numbers(2))
    batch_id = (await claim(conn, q, cid, worker="w1"))[0]["batch_id"]
    assert await conn.fetchval(q["sender_mark_posting"], batch_id, "someone-else", 30.0, []) is None
    assert await conn.fetchval(q["sender_mark_posting"], batch_id, "w1", 30.0, []) == batch_id
    batch = await conn.fetchrow("SELECT * FROM campaign.batches WHERE id = $1", batch_id)
    assert batch["status"] == "posting"
    assert batch["posted_at"] is not None
    # Already posting: a second POST of the same batch is refused.
    assert await conn.fetchval(q["sender_mark_posting"], batch_id, "w1", 30.0, []) is None


@pytest.mark.parametrize(
    ("stopping", "reason"),
    [
        ("UPDATE campaign.campaigns SET status = 'paused' WHERE id = $1", "campaign_paused"),
        ("UPDATE campaign.campaigns SET status = 'cancelled' WHERE id = $1", "campaign_cancelled"),
        ("UPDATE campaign.campaigns SET expires_at = now() WHERE id = $1", "campaign_expired"),
    ],
    ids=["paused", "cancelled", "expired"],
)
async def test_mark_posting_releases_a_batch_whose_campaign_stopped_since_the_claim(
    conn, q, stopping, reason
) -> None:
    cid = await create_campaign(conn)
    await add_recipients(conn, cid, numbers(3))
    batch_id = (await claim(conn, q, cid))[0]["batch_id"]
    await conn.execute(stopping, cid)
    row = await conn.fetchrow(q["sender_mark_posting"], batch_id, "w1", 30.0, [])
    assert (row["id"], row["held_back"], row["released"]) == (batch_id, reason, 3)
    # Never posted: back to pending with the attempts untouched, for the sweeps to settle.
    assert await statuses(conn, cid) == {"pending": 3}
    assert await conn.fetchval("SELECT sum(attempts) FROM campaign.recipients") == 0
    batch = await conn.fetchrow("SELECT * FROM campaign.batches WHERE id = $1", batch_id)
    assert (batch["status"], batch["error_code"], batch["posted_at"]) == ("released", reason, None)
    assert batch["finished_at"] is not None
    # Released once: it cannot be posted afterwards.
    assert await conn.fetchrow(q["sender_mark_posting"], batch_id, "w1", 30.0, []) is None


async def test_mark_posting_posts_a_running_campaign(conn, q) -> None:
    cid = await create_campaign(conn)
    await add_recipients(conn, cid, numbers(2))
    batch_id = (await claim(conn, q, cid))[0]["batch_id"]
    row = await conn.fetchrow(q["sender_mark_posting"], batch_id, "w1", 30.0, [])
    assert (row["id"], row["held_back"], row["released"]) == (batch_id, None, 0)
    assert await statuses(conn, cid) == {"sending": 2}


async def test_mark_posting_gives_back_the_recipients_cut_off_the_batch(conn, q) -> None:
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, numbers(5))
    batch_id = (await claim(conn, q, cid))[0]["batch_id"]
    row = await conn.fetchrow(q["sender_mark_posting"], batch_id, "w1", 30.0, ids[2:])
    assert (row["id"], row["held_back"], row["released"]) == (batch_id, None, 3)
    rows = await conn.fetch(
        "SELECT status, attempts FROM campaign.recipients WHERE campaign_id = $1 ORDER BY id", cid
    )
    assert [(r["status"], r["attempts"]) for r in rows] == [("sending", 0)] * 2 + [
        ("pending", 0)
    ] * 3
    batch = await conn.fetchrow("SELECT * FROM campaign.batches WHERE id = $1", batch_id)
    assert (batch["status"], batch["destinations"]) == ("posting", 2)


async def test_write_results_stores_every_outcome_and_closes_the_batch(conn, q) -> None:
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, numbers(4))
    batch_id = (await claim(conn, q, cid))[0]["batch_id"]
    await conn.fetchval(q["sender_mark_posting"], batch_id, "w1", 30.0, [])
    updated = await conn.fetchval(
        q["sender_write_results"],
        batch_id,
        {
            "id": ids,
            "status": ["queued", "rejected", "pending", "unknown"],
            "transid": ["t1", None, None, None],
            "error_code": [None, "7004", "7020", "timeout"],
            "error_message": [None, "Invalid", "limit", "timed out"],
            "retry_in_s": [None, None, 30.0, None],
            "attempts_added": [1, 1, 1, 1],
            "msisdn_e164": ["+919800000000", "+919800000001", "+919800000002", None],
            "encoding": ["gsm7", "ucs2", "gsm7", None],
            "parts": [1, 2, 1, None],
        },
        "done",
        4,
        1,
        1,
        200,
        None,
        None,
        123,
    )
    assert updated == 4
    rows = await conn.fetch(
        "SELECT status, transid, error_code, attempts, sent_at IS NOT NULL AS sent, "
        "next_attempt_at - now() AS wait, msisdn_e164, encoding, parts "
        "FROM campaign.recipients WHERE campaign_id = $1 ORDER BY id",
        cid,
    )
    assert [
        (r["status"], r["transid"], r["error_code"], r["attempts"], r["sent"]) for r in rows
    ] == [
        ("queued", "t1", None, 1, True),
        ("rejected", None, "7004", 1, False),
        ("pending", None, "7020", 1, False),
        ("unknown", None, "timeout", 1, False),
    ]
    # The claim's checks are stored with the results; NULL leaves the column as it was.
    assert [(r["msisdn_e164"], r["encoding"], r["parts"]) for r in rows] == [
        ("+919800000000", "gsm7", 1),
        ("+919800000001", "ucs2", 2),
        ("+919800000002", "gsm7", 1),
        (None, None, None),
    ]
    assert 25 < rows[2]["wait"].total_seconds() <= 30
    assert rows[0]["wait"] is None
    batch = await conn.fetchrow("SELECT * FROM campaign.batches WHERE id = $1", batch_id)
    assert (batch["status"], batch["accepted"], batch["rejected"], batch["http_status"]) == (
        "done",
        1,
        1,
        200,
    )
    assert batch["duration_ms"] == 123
    assert batch["finished_at"] is not None


async def test_write_results_leaves_rows_no_longer_in_the_batch(conn, q) -> None:
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, numbers(2))
    batch_id = (await claim(conn, q, cid))[0]["batch_id"]
    # A delivery report already settled the first one (e.g. resolved while 'unknown').
    await conn.execute("UPDATE campaign.recipients SET status = 'delivered' WHERE id = $1", ids[0])
    updated = await conn.fetchval(
        q["sender_write_results"],
        batch_id,
        {
            "id": ids,
            "status": ["queued", "queued"],
            "transid": ["t1", "t2"],
            "error_code": [None, None],
            "error_message": [None, None],
            "retry_in_s": [None, None],
            "attempts_added": [1, 1],
            "msisdn_e164": [None, None],
            "encoding": [None, None],
            "parts": [None, None],
        },
        "done",
        2,
        2,
        0,
        200,
        None,
        None,
        5,
    )
    assert updated == 1
    assert await statuses(conn, cid) == {"delivered": 1, "queued": 1}


async def test_release_batch_returns_rows_untouched(conn, q) -> None:
    cid = await create_campaign(conn)
    await add_recipients(conn, cid, numbers(3))
    batch_id = (await claim(conn, q, cid))[0]["batch_id"]
    assert (
        await conn.fetchval(q["sender_release_batch"], batch_id, "service_stopped", "stopped") == 3
    )
    assert await statuses(conn, cid) == {"pending": 3}
    assert await conn.fetchval("SELECT sum(attempts) FROM campaign.recipients") == 0
    batch = await conn.fetchrow("SELECT * FROM campaign.batches WHERE id = $1", batch_id)
    assert (batch["status"], batch["error_code"]) == ("released", "service_stopped")


# --- recovery --------------------------------------------------------------------------


async def test_recover_expired_batches(conn, q) -> None:
    cid = await create_campaign(conn)
    await add_recipients(conn, cid, numbers(6))
    claimed = (await claim(conn, q, cid, 2, lease_s=0.0))[0]["batch_id"]
    posting = (await claim(conn, q, cid, 2, lease_s=0.0))[0]["batch_id"]
    await conn.fetchval(q["sender_mark_posting"], posting, "w1", 0.0, [])
    live = (await claim(conn, q, cid, 2, lease_s=60.0))[0]["batch_id"]
    await asyncio.sleep(0.01)

    row = await conn.fetchrow(q["recovery_expired_batches"], 100)
    assert dict(row) == {"batches": 2, "released": 2, "in_doubt": 2}
    by_batch = await conn.fetch(
        "SELECT batch_id, status, attempts, error_code FROM campaign.recipients "
        "WHERE campaign_id = $1 ORDER BY id",
        cid,
    )
    assert [(r["batch_id"], r["status"], r["attempts"]) for r in by_batch] == [
        (claimed, "pending", 0),
        (claimed, "pending", 0),
        (posting, "unknown", 1),
        (posting, "unknown", 1),
        (live, "sending", 0),
        (live, "sending", 0),
    ]
    batch_status = dict(await conn.fetch("SELECT id, status FROM campaign.batches"))
    assert batch_status == {claimed: "released", posting: "abandoned", live: "claimed"}
    assert dict(await conn.fetchrow(q["recovery_expired_batches"], 100)) == {
        "batches": 0,
        "released": 0,
        "in_doubt": 0,
    }


async def test_release_worker_batches_only_touches_that_worker(conn, q) -> None:
    cid = await create_campaign(conn)
    await add_recipients(conn, cid, numbers(6))
    mine_claimed = (await claim(conn, q, cid, 2, worker="me"))[0]["batch_id"]
    mine_posting = (await claim(conn, q, cid, 2, worker="me"))[0]["batch_id"]
    await conn.fetchval(q["sender_mark_posting"], mine_posting, "me", 60.0, [])
    (await claim(conn, q, cid, 2, worker="other"))[0]["batch_id"]
    row = await conn.fetchrow(q["recovery_release_worker"], "me")
    assert dict(row) == {"batches": 2, "released": 2, "in_doubt": 2}
    assert await statuses(conn, cid) == {"pending": 2, "unknown": 2, "sending": 2}
    assert await conn.fetchval(
        "SELECT status FROM campaign.batches WHERE id = $1", mine_claimed
    ) == ("released")


async def _unknown_rows(conn, q, count: int, *, attempts: int = 1) -> int:
    cid = await create_campaign(conn)
    await add_recipients(conn, cid, numbers(count))
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'unknown', attempts = $2, error_code = 'timeout' "
        "WHERE campaign_id = $1",
        cid,
        attempts,
    )
    return cid


async def test_resolve_unknown_waits_for_the_grace_period(conn, q) -> None:
    cid = await _unknown_rows(conn, q, 2)
    assert await conn.fetch(q["recovery_resolve_unknown"], "default", 60.0, False, 5, 100) == []
    assert await statuses(conn, cid) == {"unknown": 2}
    await conn.execute(
        "UPDATE campaign.recipients SET updated_at = now() - interval '61 seconds' "
        "WHERE campaign_id = $1",
        cid,
    )
    rows = await conn.fetch(q["recovery_resolve_unknown"], "default", 60.0, False, 5, 100)
    assert [r["status"] for r in rows] == ["pending", "pending"]
    assert await statuses(conn, cid) == {"pending": 2}
    # The last error is kept for whoever looks at a row that keeps failing.
    assert (
        await conn.fetchval(
            "SELECT DISTINCT error_code FROM campaign.recipients WHERE campaign_id = $1", cid
        )
        == "timeout"
    )


async def test_resolve_unknown_leaves_rows_whose_report_waits_to_be_matched(conn, q) -> None:
    """A report that has arrived (by correlation id) proves the API took the message: the
    row is the reconciler's to settle, however late its pass, never sent again."""
    cid = await _unknown_rows(conn, q, 3)
    ids = await conn.fetch(
        "SELECT id, correlation_id FROM campaign.recipients WHERE campaign_id = $1 ORDER BY id",
        cid,
    )
    # The first row's report waits ('new'); the second's was already orphaned (it no
    # longer will be matched); the third has none.
    for row, state in ((ids[0], "new"), (ids[1], "orphaned")):
        await conn.execute(
            "INSERT INTO campaign.delivery_reports (correlation_id, code, state, raw) "
            "VALUES ($1, '7000', $2, '{}')",
            row["correlation_id"],
            state,
        )
    await conn.execute(
        "UPDATE campaign.recipients SET updated_at = now() - interval '61 seconds' "
        "WHERE campaign_id = $1",
        cid,
    )
    rows = await conn.fetch(q["recovery_resolve_unknown"], "default", 60.0, False, 5, 100)
    assert len(rows) == 2
    left = await conn.fetch(
        "SELECT id, status FROM campaign.recipients WHERE campaign_id = $1 ORDER BY id", cid
    )
    assert [r["status"] for r in left] == ["unknown", "pending", "pending"]
    # Told to fail rather than resend, the same row still waits for its report.
    await conn.fetch(q["recovery_resolve_unknown"], "default", 0.0, True, 5, 100)
    assert (
        await conn.fetchval("SELECT status FROM campaign.recipients WHERE id = $1", ids[0]["id"])
        == "unknown"
    )


async def test_resolve_unknown_probes_waiting_reports_per_row_not_all_of_them(conn, q) -> None:
    """The waiting-report check reads each row's own reports, not every waiting report per
    row: CI's recovery pass over 3,000 rows in doubt beside 16,000 waiting reports took 8 s
    (105 s at 50,000), the reports' index unusable across the two columns' collations."""
    cid = await create_campaign(conn)
    await add_recipients(conn, cid, numbers(300))
    waiting = 600
    await conn.execute(
        "INSERT INTO campaign.delivery_reports (transid, correlation_id, code, raw) "
        "SELECT 'T' || g, 'x' || g, '7000', '{}' FROM generate_series(1, $1) g",
        waiting,
    )
    # Statistics taken before any row was in doubt, as when a worker has just died.
    await conn.execute("ANALYZE campaign.recipients")
    await conn.execute("ANALYZE campaign.delivery_reports")
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'unknown', attempts = 1, "
        "updated_at = now() - interval '1 hour' WHERE campaign_id = $1",
        cid,
    )
    plan = await conn.fetchval(
        "EXPLAIN (ANALYZE, FORMAT JSON) " + q["recovery_resolve_unknown"],
        "default",
        60.0,
        False,
        5,
        1000,
    )
    read = 0
    for node in plan_nodes(plan):
        if node.get("Relation Name") == "delivery_reports":
            loops = node["Actual Loops"]
            read += node["Actual Rows"] * loops
            read += node.get("Rows Removed by Filter", 0) * loops
            read += node.get("Rows Removed by Index Recheck", 0) * loops
        read += node.get("Rows Removed by Join Filter", 0)
    # Reading every waiting report once (a hash) or each row's own (an index probe) is
    # linear; every waiting report for every row would be 300 x 600 = 180,000.
    assert read <= waiting + 300, read


async def test_resolve_unknown_fails_when_told_or_out_of_attempts(conn, q) -> None:
    exhausted = await _unknown_rows(conn, q, 2, attempts=5)
    rows = await conn.fetch(q["recovery_resolve_unknown"], "default", 0.0, False, 5, 100)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert await statuses(conn, exhausted) == {"failed": 2}
    told = await _unknown_rows(conn, q, 1)
    await conn.fetch(q["recovery_resolve_unknown"], "default", 0.0, True, 5, 100)
    assert await statuses(conn, told) == {"failed": 1}
    other_service = await _unknown_rows(conn, q, 1)
    await conn.execute("UPDATE campaign.campaigns SET service = 'x' WHERE id = $1", other_service)
    await conn.fetch(q["recovery_resolve_unknown"], "default", 0.0, True, 5, 100)
    assert await statuses(conn, other_service) == {"unknown": 1}


async def test_work_remaining(conn, q) -> None:
    assert await conn.fetchval(q["recovery_work_remaining"], ["default"]) is False
    later = await create_campaign(conn)
    await conn.execute(
        "UPDATE campaign.campaigns SET send_after = now() + interval '1 hour' WHERE id = $1", later
    )
    await add_recipients(conn, later, numbers(1))
    paused = await create_campaign(conn, status="paused")
    await add_recipients(conn, paused, numbers(1))
    assert await conn.fetchval(q["recovery_work_remaining"], ["default"]) is False

    cid = await create_campaign(conn)
    await add_recipients(conn, cid, numbers(1))
    assert await conn.fetchval(q["recovery_work_remaining"], ["default"]) is True
    assert await conn.fetchval(q["recovery_work_remaining"], ["other"]) is False
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'unknown' WHERE campaign_id = $1", cid
    )
    assert await conn.fetchval(q["recovery_work_remaining"], ["default"]) is True
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'queued' WHERE campaign_id = $1", cid
    )
    assert await conn.fetchval(q["recovery_work_remaining"], ["default"]) is False


async def test_claim_starts_after_the_given_recipient(conn, q) -> None:
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, numbers(30))
    rows = await claim(conn, q, cid, size=5, after=ids[9])
    assert sorted(r["id"] for r in rows) == ids[10:15]
    # next_campaign looks for due rows after the same point.
    assert (
        await conn.fetchval(q["producer_next_campaign"], ["default"], [], {str(cid): ids[-1]})
        is None
    )
    assert (
        await conn.fetchval(q["producer_next_campaign"], ["default"], [], {str(cid): ids[-2]})
        == cid
    )
