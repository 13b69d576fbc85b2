"""What delivery reports teach ([policy]), through the reconciler's match statement on a
real PostgreSQL: numbers that do not exist are suppressed for a while; a transient failure
sends the recipient once more, and a late report of the given-up attempt changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from campaign import db
from campaign.config import PolicySettings, ReconcilerSettings
from campaign.reconciler import Reconciler
from tests.helpers.webhooks import dr, minutes, seed_campaign, store_reports

NUMBER = "+919810000001"


def make_reconciler(pool: asyncpg.Pool, **policy: object) -> Reconciler:
    return Reconciler(
        pool=pool,
        settings=ReconcilerSettings(interval_s=0.05),
        queries=db.load_queries(),
        policy=PolicySettings(**policy),  # type: ignore[arg-type]
        max_attempts={"default": 3},
    )


async def recipient(conn: asyncpg.Connection, recipient_id: int) -> asyncpg.Record:
    return await conn.fetchrow("SELECT * FROM campaign.recipients WHERE id = $1", recipient_id)


async def final_events(conn: asyncpg.Connection) -> list[tuple[int, str]]:
    rows = await conn.fetch(
        "SELECT recipient_id, status FROM campaign.events WHERE kind = 'recipient_final' "
        "ORDER BY id"
    )
    return [(r["recipient_id"], r["status"]) for r in rows]


async def queued_to(conn: asyncpg.Connection, msisdn_e164: str = NUMBER) -> asyncpg.Record:
    _, (r,) = await seed_campaign(conn, ["queued"])
    await conn.execute(
        "UPDATE campaign.recipients SET msisdn_e164 = $2, attempts = 1 WHERE id = $1",
        r["id"],
        msisdn_e164,
    )
    return await recipient(conn, r["id"])


async def suppressions(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM campaign.suppressions ORDER BY msisdn")


async def suppressed_now(conn: asyncpg.Connection, numbers: list[str]) -> list[str]:
    sql = db.load_queries()["producer_suppressed_numbers"]
    return sorted(r["msisdn"] for r in await conn.fetch(sql, numbers))


@pytest.mark.parametrize("code", ["7203", "7102"])
async def test_a_number_that_does_not_exist_is_suppressed_until_it_expires(
    pool: asyncpg.Pool, conn: asyncpg.Connection, code: str
) -> None:
    r = await queued_to(conn)
    await store_reports(conn, [dr(r["transid"], code)])
    result = await make_reconciler(pool).run_once()

    assert result.suppressions_added == 1
    (row,) = await suppressions(conn)
    assert (row["msisdn"], row["reason"]) == (NUMBER, f"dr:{code}")
    expected = datetime.now(UTC) + timedelta(days=90)
    assert abs((row["expires_at"] - expected).total_seconds()) < 3600
    assert (await recipient(conn, r["id"]))["status"] == "failed"
    assert await suppressed_now(conn, [NUMBER]) == [NUMBER]

    # Expired: no longer suppresses.
    await conn.execute("UPDATE campaign.suppressions SET expires_at = now() - interval '1 s'")
    assert await suppressed_now(conn, [NUMBER]) == []


async def test_other_failures_suppress_nothing_and_days_zero_is_for_ever(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    a = await queued_to(conn, "+919810000001")
    b = await queued_to(conn, "+919810000002")
    await store_reports(conn, [dr(a["transid"], "7201"), dr(b["transid"], "7203")])
    await make_reconciler(pool, suppress_days=0).run_once()
    rows = await suppressions(conn)
    assert [(r["msisdn"], r["reason"], r["expires_at"]) for r in rows] == [
        ("+919810000002", "dr:7203", None)
    ]


@pytest.mark.parametrize("reason", ["manual", "opt_out"])
async def test_a_report_never_replaces_an_operator_or_stop_suppression(
    pool: asyncpg.Pool, conn: asyncpg.Connection, reason: str
) -> None:
    await conn.execute(
        "INSERT INTO campaign.suppressions (msisdn, reason) VALUES ($1, $2)", NUMBER, reason
    )
    r = await queued_to(conn)
    await store_reports(conn, [dr(r["transid"], "7203")])
    result = await make_reconciler(pool).run_once()
    assert result.suppressions_added == 0
    (row,) = await suppressions(conn)
    assert (row["reason"], row["expires_at"]) == (reason, None)


async def test_a_transient_failure_is_sent_once_more_and_the_second_is_final(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    r = await queued_to(conn)
    reconciler = make_reconciler(pool)
    await store_reports(conn, [dr(r["transid"], "7206", at=minutes(1))])
    result = await reconciler.run_once()

    assert result.recipients_retried == 1
    row = await recipient(conn, r["id"])
    assert row["status"] == "pending"
    assert row["transid"] is None and row["retried_transid"] == r["transid"]
    assert row["report_retries"] == 1
    assert row["error_code"] == "7206"
    assert row["dr_code"] is None and row["sent_at"] is None
    wait_s = (row["next_attempt_at"] - datetime.now(UTC)).total_seconds()
    assert 1500 < wait_s <= 1800
    # Not final: no event.
    assert await final_events(conn) == []

    # A late report of the first attempt while it waits (found by its correlation id, the
    # transid being cleared): changes nothing.
    cid = r["correlation_id"]
    await store_reports(conn, [dr(r["transid"], "7500", correlation_id=cid, at=minutes(2))])
    await reconciler.run_once()
    assert (await recipient(conn, r["id"]))["status"] == "pending"

    # The sender sends it again: a new transid.
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'queued', transid = 'T-second', "
        "attempts = 2, sent_at = now() WHERE id = $1",
        r["id"],
    )
    await store_reports(conn, [dr("T-second", "7206", at=minutes(30))])
    # And another late report of the first attempt, after the second one's.
    await store_reports(conn, [dr(r["transid"], "7500", correlation_id=cid, at=minutes(40))])
    await reconciler.run_once()
    await reconciler.run_once()

    row = await recipient(conn, r["id"])
    assert (row["status"], row["dr_code"], row["transid"]) == ("failed", "7206", "T-second")
    assert await final_events(conn) == [(r["id"], "failed")]
    # Both attempts' reports are kept, every one linked to the recipient.
    stored = await conn.fetch(
        "SELECT transid, code, recipient_id FROM campaign.delivery_reports ORDER BY id"
    )
    assert [(s["transid"], s["code"]) for s in stored] == [
        (r["transid"], "7206"),
        (r["transid"], "7500"),
        ("T-second", "7206"),
        (r["transid"], "7500"),
    ]
    assert {s["recipient_id"] for s in stored} == {r["id"]}


async def test_the_second_attempt_delivered_wins(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    r = await queued_to(conn)
    reconciler = make_reconciler(pool)
    await store_reports(conn, [dr(r["transid"], "7207", at=minutes(1))])
    await reconciler.run_once()
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'queued', transid = 'T-2', attempts = 2, "
        "sent_at = now() WHERE id = $1",
        r["id"],
    )
    # The second attempt's report carries no timestamp: it still applies.
    await store_reports(conn, [dr("T-2", "7500", at=None)])
    await reconciler.run_once()
    row = await recipient(conn, r["id"])
    assert (row["status"], row["dr_code"], row["error_code"]) == ("delivered", "7500", None)
    assert await final_events(conn) == [(r["id"], "delivered")]


@pytest.mark.parametrize(
    "situation", ["attempts_used", "campaign_expires", "campaign_cancelled", "not_a_retry_code"]
)
async def test_no_retry_when_it_would_not_be_sent(
    pool: asyncpg.Pool, conn: asyncpg.Connection, situation: str
) -> None:
    r = await queued_to(conn)
    code = "7206"
    if situation == "attempts_used":
        await conn.execute("UPDATE campaign.recipients SET attempts = 3 WHERE id = $1", r["id"])
    elif situation == "campaign_expires":
        await conn.execute(
            "UPDATE campaign.campaigns SET expires_at = now() + interval '10 minutes'"
        )
    elif situation == "campaign_cancelled":
        await conn.execute("UPDATE campaign.campaigns SET status = 'cancelled'")
    else:
        code = "7201"
    await store_reports(conn, [dr(r["transid"], code)])
    result = await make_reconciler(pool).run_once()
    assert result.recipients_retried == 0
    assert (await recipient(conn, r["id"]))["status"] == "failed"
    assert await final_events(conn) == [(r["id"], "failed")]
