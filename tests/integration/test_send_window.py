"""The sending window through the producer, in real time, over a real PostgreSQL.

The zones used have no daylight saving (Kolkata UTC+05:30, Tokyo UTC+09:00, Phoenix
UTC-07:00), so the expected openings are computed here with fixed offsets, apart from
campaign/window.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import asyncpg

from campaign import config, db
from campaign.batch import Lane
from campaign.commands import status
from campaign.producer import Producer
from tests.helpers.plans import plan_nodes
from tests.helpers.seed import add_recipients, create_campaign, numbers

INDIA = numbers(3)  # Asia/Calcutta
JAPAN = [f"81901234567{i}" for i in range(3)]  # Asia/Tokyo
ARIZONA = [f"1602555{i:04d}" for i in range(3)]  # America/Phoenix
OFFSETS = {"india": timedelta(hours=5, minutes=30), "japan": timedelta(hours=9)}
OFFSETS["arizona"] = timedelta(hours=-7)


def make_producer(pool: asyncpg.Pool, **service: str) -> tuple[Producer, Lane]:
    settings = config.ServiceSettings(key="k", sender_id="S", batch_size=100, **service)
    lane = Lane(name="default", settings=settings, queue_size=8)
    producer = Producer(
        pool=pool,
        queries=db.load_queries(),
        lanes={"default": lane},
        settings=config.ProducerSettings(),
        worker_id="w1",
        notify_url=None,
    )
    return producer, lane


def india_open_window() -> tuple[time, time, datetime]:
    """A two-hour window around India's local time now: shut in Tokyo and Phoenix."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    local = now + OFFSETS["india"]
    start = (local - timedelta(hours=1)).time()
    end = (local + timedelta(hours=1)).time()
    return start, end, now


def expected_opening(start: time, offset: timedelta, after: datetime) -> datetime:
    """The first instant after `after` when the wall clock at `offset` reads `start`."""
    local_day = (after + offset).date()
    for days in range(-1, 3):
        candidate = datetime.combine(local_day + timedelta(days=days), start, UTC) - offset
        if candidate > after:
            return candidate
    raise AssertionError("no opening within two days")


async def rows_by_number(conn: asyncpg.Connection, cid: int) -> dict[str, asyncpg.Record]:
    rows = await conn.fetch(
        "SELECT msisdn, status, attempts, next_attempt_at, error_code, error_message "
        "FROM campaign.recipients WHERE campaign_id = $1",
        cid,
    )
    return {r["msisdn"]: r for r in rows}


async def test_three_countries_only_the_open_zone_is_sent(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    start, end, before = india_open_window()
    cid = await create_campaign(conn, window_start=start, window_end=end)
    await add_recipients(conn, cid, [*INDIA, *JAPAN, *ARIZONA])
    producer, lane = make_producer(pool)

    assert await producer.fill() == 1
    batch = lane.queue.get_nowait()
    assert batch.destinations == len(INDIA)
    rows = await rows_by_number(conn, cid)
    assert {rows[m]["status"] for m in INDIA} == {"sending"}
    for country, msisdns in (("japan", JAPAN), ("arizona", ARIZONA)):
        opening = expected_opening(start, OFFSETS[country], before)
        for m in msisdns:
            row = rows[m]
            assert (row["status"], row["attempts"]) == ("pending", 0), country
            assert row["next_attempt_at"] == opening, country
            assert row["error_code"] == "outside_window"
    assert "Asia/Tokyo" in rows[JAPAN[0]]["error_message"]
    stored = await conn.fetchval(
        "SELECT destinations FROM campaign.batches WHERE id = $1", batch.id
    )
    assert stored == len(INDIA)

    # Nothing else is due: the waiting rows are not claimed again.
    assert await producer.fill() == 0

    # Drain mode does not wait hours for a window: the Indian rows in flight are its work,
    # the waiting rows are not.
    queries = db.load_queries()
    assert await conn.fetchval(queries["recovery_work_remaining"], ["default"]) is True
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'delivered' WHERE campaign_id = $1 "
        "AND status = 'sending'",
        cid,
    )
    assert await conn.fetchval(queries["recovery_work_remaining"], ["default"]) is False

    # `campaign status` says how many wait and when the first of them opens.
    [shown] = await status.collect(conn, db.load_queries(), cid)
    first = min(expected_opening(start, OFFSETS[c], before) for c in ("japan", "arizona"))
    assert (shown.waiting_for_window, shown.next_window_opening) == (6, first.isoformat())
    assert shown.send_window == f"{start:%H:%M}-{end:%H:%M}"
    assert "waiting for their window 6" in status.render([shown])


async def test_the_service_window_applies_unless_the_campaign_has_its_own(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    start, end, _ = india_open_window()
    shut_in_india = (
        f"{(datetime.combine(datetime.now(UTC).date(), start) + timedelta(hours=3)):%H:%M}"
    )
    closes = f"{(datetime.combine(datetime.now(UTC).date(), start) + timedelta(hours=4)):%H:%M}"
    own = await create_campaign(conn, window_start=start, window_end=end)
    await add_recipients(conn, own, INDIA)
    default = await create_campaign(conn)
    await add_recipients(conn, default, numbers(2, start=100))
    producer, lane = make_producer(pool, send_window=f"{shut_in_india}-{closes}")

    assert await producer.fill() == 2  # one batch each; the default's is all held back
    assert [lane.queue.get_nowait().campaign_id for _ in range(lane.queue.qsize())] == [own]
    statuses = await conn.fetch(
        "SELECT DISTINCT status FROM campaign.recipients WHERE campaign_id = $1", default
    )
    assert [r["status"] for r in statuses] == ["pending"]


async def test_a_window_opening_after_expiry_expires_the_row(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    start, end, _ = india_open_window()
    cid = await create_campaign(
        conn,
        window_start=start,
        window_end=end,
        expires_at=datetime.now(UTC) + timedelta(minutes=30),
    )
    await add_recipients(conn, cid, [*INDIA, *JAPAN])
    producer, _lane = make_producer(pool)

    assert await producer.fill() == 1
    rows = await rows_by_number(conn, cid)
    for m in JAPAN:
        assert (rows[m]["status"], rows[m]["error_code"]) == ("expired", "window_after_expiry")
        assert "after the campaign expires" in rows[m]["error_message"]
        assert rows[m]["next_attempt_at"] is None


async def test_several_zone_numbers_wait_for_every_zone(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """A US toll-free number may be anywhere from Guam to Halifax: a two-hour window open in
    Kolkata now is never open in all of those at once, so it expires with the reason."""
    start, end, _ = india_open_window()
    cid = await create_campaign(conn, window_start=start, window_end=end)
    await add_recipients(conn, cid, ["18005550123"])
    producer, _lane = make_producer(pool)
    assert await producer.fill() == 1
    row = (await rows_by_number(conn, cid))["18005550123"]
    assert (row["status"], row["error_code"]) == ("expired", "window_never_open")
    assert "America/Los_Angeles" in row["error_message"]


async def test_waiting_rows_cost_no_claim_until_they_are_released(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn)
    ids = await add_recipients(conn, cid, numbers(3000))
    await conn.execute(
        "UPDATE campaign.recipients SET next_attempt_at = now() + interval '5 hours', "
        "error_code = 'outside_window' WHERE campaign_id = $1",
        cid,
    )
    await conn.execute("ANALYZE campaign.recipients")
    queries = db.load_queries()
    plan = await conn.fetchval(
        "EXPLAIN (ANALYZE, FORMAT JSON) " + queries["producer_next_campaign"],
        ["default"],
        [],
        "{}",
    )
    # No node of the probe reads a waiting row: none returned, none filtered out.
    visited = 0
    for node in plan_nodes(plan):
        if node.get("Relation Name") == "recipients":
            visited += node["Actual Rows"] * node["Actual Loops"]
            visited += node.get("Rows Removed by Filter", 0)
            visited += node.get("Rows Removed by Index Recheck", 0)
    assert visited == 0
    producer, lane = make_producer(pool)
    assert await producer.fill() == 0

    # Their time comes: released, then claimed in id order.
    await conn.execute(
        "UPDATE campaign.recipients SET next_attempt_at = now() - interval '1 second' "
        "WHERE id = ANY($1::bigint[])",
        ids[:5],
    )
    assert await producer.fill() == 1
    assert lane.queue.get_nowait().recipient_ids == tuple(ids[:5])
