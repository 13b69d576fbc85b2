"""The event outbox (campaign.events) against a real PostgreSQL: written by the database's
triggers in the same transaction as each change, exactly once per transition, whoever
made it, and only the kinds [events] asks for."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest

from campaign import config, db, statuses
from campaign.commands.prune import Pruner
from campaign.config import EventSettings, ReconcilerSettings, RetentionSettings
from campaign.forwarder import write_event_settings
from campaign.reconciler import Reconciler
from tests.helpers.webhooks import dr, minutes, seed_campaign, store_reports


def make_reconciler(pool: asyncpg.Pool) -> Reconciler:
    settings = ReconcilerSettings(interval_s=0.05)
    return Reconciler(pool=pool, settings=settings, queries=db.load_queries())


async def events(conn: asyncpg.Connection, kind: str | None = None) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM campaign.events WHERE $1::text IS NULL OR kind = $1 ORDER BY id", kind
    )


def test_event_kinds_match_the_check_constraint() -> None:
    (migration,) = [m for m in db.load_migrations() if m.name == "events"]
    check = re.search(r"events_kind_check CHECK \(kind IN \((.*?)\)\)", migration.sql, re.S)
    assert check is not None
    assert tuple(re.findall(r"'([a-z_]+)'", check.group(1))) == config.EVENT_KINDS


def test_the_triggers_spell_final_as_statuses_does() -> None:
    (migration,) = [m for m in db.load_migrations() if m.name == "events"]
    final_lists = re.findall(r"status IN \(('delivered'.*?)\)", migration.sql, re.S)
    assert final_lists
    for found in final_lists:
        assert set(re.findall(r"'([a-z_]+)'", found)) == set(statuses.FINAL)


async def test_each_final_transition_writes_one_event_in_its_transaction(
    conn: asyncpg.Connection,
) -> None:
    campaign_id, rows = await seed_campaign(conn, ["queued", "queued", "queued"])
    ids = [r["id"] for r in rows]
    # Not final: nothing.
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'queued', dr_code = '7501' WHERE id = ANY($1)",
        ids,
    )
    assert await events(conn, "recipient_final") == []
    # Rolled back: no event either.
    tx = conn.transaction()
    await tx.start()
    await conn.execute("UPDATE campaign.recipients SET status = 'delivered' WHERE id = $1", ids[0])
    await tx.rollback()
    assert await events(conn, "recipient_final") == []

    await conn.execute(
        "UPDATE campaign.recipients SET status = 'failed', error_code = 'report_timeout', "
        "error_message = 'no report' WHERE id = ANY($1)",
        ids[:2],
    )
    # The same final status again (a second failure report): no event.
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'failed', dr_code = '7201' WHERE id = $1", ids[0]
    )
    # A later report replaces a final status with another: one event saying so.
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'delivered', dr_code = '7500', "
        "dr_description = 'Delivered', error_code = NULL, error_message = NULL WHERE id = $1",
        ids[1],
    )
    found = await events(conn, "recipient_final")
    assert [(e["recipient_id"], e["status"], e["code"]) for e in found] == [
        (ids[0], "failed", "report_timeout"),
        (ids[1], "failed", "report_timeout"),
        (ids[1], "delivered", "7500"),
    ]
    assert all(e["campaign_id"] == campaign_id for e in found)
    assert "replaces" not in found[0]["data"]
    assert found[0]["data"]["description"] == "no report"
    assert found[2]["data"]["replaces"] == "failed"
    assert found[0]["msisdn"] == rows[0]["msisdn"]


async def test_duplicated_and_out_of_order_reports_write_one_event_per_recipient(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    _, rows = await seed_campaign(conn, ["queued"] * 4)
    reconciler = make_reconciler(pool)
    a, b, c, d = (r["transid"] for r in rows)
    # Out of order (the final before the interim), duplicated, across passes.
    await store_reports(conn, [dr(a, "7500", at=minutes(2)), dr(a, "7501", at=minutes(1))])
    await store_reports(conn, [dr(b, "7201", at=minutes(1)), dr(b, "7201", at=minutes(1))])
    await reconciler.run_once()
    await store_reports(conn, [dr(a, "7500", at=minutes(2)), dr(a, "7501", at=minutes(3))])
    await store_reports(conn, [dr(c, "7500", at=minutes(1)), dr(c, "7500", at=minutes(1))])
    await store_reports(conn, [dr(d, "7501", at=minutes(1))])
    await reconciler.run_once()
    await reconciler.run_once()

    found = await events(conn, "recipient_final")
    assert sorted((e["recipient_id"], e["status"]) for e in found) == [
        (rows[0]["id"], "delivered"),
        (rows[1]["id"], "failed"),
        (rows[2]["id"], "delivered"),
    ]


SET_CAMPAIGN_STATUS = "UPDATE campaign.campaigns SET status = $2 WHERE id = $1"


async def test_campaign_status_events(conn: asyncpg.Connection) -> None:
    campaign_id, rows = await seed_campaign(conn, ["queued", "queued"], campaign_status="ready")
    await conn.execute(SET_CAMPAIGN_STATUS, campaign_id, "running")
    await conn.execute(SET_CAMPAIGN_STATUS, campaign_id, "paused")
    # Not a change: nothing.
    await conn.execute(SET_CAMPAIGN_STATUS, campaign_id, "paused")
    await conn.execute(SET_CAMPAIGN_STATUS, campaign_id, "ready")
    await conn.execute(SET_CAMPAIGN_STATUS, campaign_id, "running")
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'delivered' WHERE id = $1", rows[0]["id"]
    )
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'failed' WHERE id = $1", rows[1]["id"]
    )
    await conn.execute(
        "UPDATE campaign.campaigns SET status = 'completed' WHERE id = $1", campaign_id
    )

    found = await events(conn, "campaign_status")
    assert [e["status"] for e in found] == ["running", "paused", "running", "completed"]
    assert found[1]["data"]["previous"] == "running"
    assert found[-1]["data"]["counts"] == {"delivered": 1, "failed": 1}


async def test_kinds_and_enabled_are_honoured(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    queries = db.load_queries()
    campaign_id, rows = await seed_campaign(conn, ["queued", "queued"])
    await write_event_settings(
        pool, queries, EventSettings(kinds=("campaign_status",)), "test-worker"
    )
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'delivered' WHERE id = $1", rows[0]["id"]
    )
    await conn.execute("UPDATE campaign.campaigns SET status = 'paused' WHERE id = $1", campaign_id)
    assert [e["kind"] for e in await events(conn)] == ["campaign_status"]

    await write_event_settings(pool, queries, EventSettings(enabled=False), "test-worker")
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'delivered' WHERE id = $1", rows[1]["id"]
    )
    await conn.execute(SET_CAMPAIGN_STATUS, campaign_id, "running")
    assert len(await events(conn)) == 1

    await write_event_settings(pool, queries, EventSettings(), "test-worker")
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'failed' WHERE id = $1", rows[1]["id"]
    )
    assert [e["kind"] for e in await events(conn)] == ["campaign_status", "recipient_final"]


async def test_one_notify_per_statement(dsn: str, conn: asyncpg.Connection) -> None:
    _, rows = await seed_campaign(conn, ["queued"] * 50)
    listener = await db.connect(dsn)
    received: list[str] = []
    got = asyncio.Event()

    def on_notify(*args: object) -> None:
        received.append(str(args[-1]))
        got.set()

    try:
        await listener.add_listener("campaign_events", on_notify)
        await conn.execute(
            "UPDATE campaign.recipients SET status = 'delivered' WHERE id = ANY($1)",
            [r["id"] for r in rows],
        )
        await asyncio.wait_for(got.wait(), timeout=30)
        # A round trip on the listener delivers anything else already sent.
        await listener.execute("SELECT 1")
        assert received == ["recipient_final"]
    finally:
        await listener.close()
    assert len(await events(conn, "recipient_final")) == 50


async def test_an_application_without_insert_on_events_can_still_update(
    conn: asyncpg.Connection,
) -> None:
    campaign_id, _ = await seed_campaign(conn, ["queued"])
    await conn.execute("DROP ROLE IF EXISTS campaign_events_app")
    await conn.execute("CREATE ROLE campaign_events_app")
    try:
        await conn.execute(
            "GRANT USAGE ON SCHEMA campaign TO campaign_events_app;"
            "GRANT SELECT, UPDATE ON campaign.campaigns, campaign.recipients "
            "TO campaign_events_app"
        )
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE campaign_events_app")
            await conn.execute(
                "UPDATE campaign.campaigns SET status = 'paused' WHERE id = $1", campaign_id
            )
        assert [e["status"] for e in await events(conn, "campaign_status")] == ["paused"]
    finally:
        await conn.execute(
            "REVOKE ALL ON ALL TABLES IN SCHEMA campaign FROM campaign_events_app;"
            "REVOKE ALL ON SCHEMA campaign FROM campaign_events_app;"
            "DROP ROLE campaign_events_app"
        )


async def test_prune_deletes_old_events_but_keeps_unforwarded_ones(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    campaign_id, _ = await seed_campaign(conn, [])
    for status in ("paused", "running", "paused", "running"):
        await conn.execute(
            "UPDATE campaign.campaigns SET status = $2 WHERE id = $1", campaign_id, status
        )
    ids = [e["id"] for e in await events(conn)]
    await conn.execute(
        "UPDATE campaign.events SET created_at = now() - interval '10 days' WHERE id = ANY($1)",
        ids[:3],
    )
    await conn.execute("UPDATE campaign.event_forwarder SET position = $1", ids[0])
    settings = RetentionSettings(events_days=7, batch_size=1)
    queries = db.load_queries()

    kept = await Pruner(pool=pool, queries=queries, settings=settings, keep_unforwarded=True).run()
    assert kept["events"] == 1
    assert [e["id"] for e in await events(conn)] == ids[1:]

    gone = await Pruner(pool=pool, queries=queries, settings=settings).run()
    assert gone["events"] == 2
    assert [e["id"] for e in await events(conn)] == ids[3:]


@pytest.mark.parametrize("status", ["suppressed", "delivered"])
async def test_rows_inserted_final_write_an_event(conn: asyncpg.Connection, status: str) -> None:
    campaign_id, _ = await seed_campaign(conn, [])
    await conn.execute(
        "INSERT INTO campaign.recipients (campaign_id, msisdn, status) VALUES ($1, $2, $3), "
        "($1, $4, 'pending')",
        campaign_id,
        "919810000001",
        status,
        "919810000002",
    )
    assert [e["status"] for e in await events(conn, "recipient_final")] == [status]


async def test_the_trigger_join_is_planned_for_each_statement_size(
    conn: asyncpg.Connection,
) -> None:
    # A plan cached for a one-row first statement (a nested loop over the transition
    # tables) made 5,000-row statements twelve times slower; the join runs through
    # EXECUTE so each statement gets a plan for its own size. auto_explain shows the
    # nested INSERT's plan to this session.
    _, rows = await seed_campaign(conn, ["queued"] * 3001)
    plans: list[str] = []
    conn.add_log_listener(lambda _conn, message: plans.append(str(message.message)))
    try:
        await conn.execute("LOAD 'auto_explain'")
    except asyncpg.UndefinedFileError:
        # The embedded server (pgserver) ships without contrib modules; CI's PostgreSQL has it.
        pytest.skip("auto_explain is not installed in this PostgreSQL")
    await conn.execute(
        "SET auto_explain.log_min_duration = 0; "
        "SET auto_explain.log_nested_statements = on; SET client_min_messages = log"
    )
    try:
        await finish_rows(conn, [rows[0]["id"]])
        plans.clear()
        await finish_rows(conn, [r["id"] for r in rows[1:]])
        await conn.execute("SELECT 1")
    finally:
        await conn.execute("RESET client_min_messages; RESET auto_explain.log_min_duration")
    inserts = [p for p in plans if "INSERT INTO campaign.events" in p]
    assert inserts, plans
    assert all("Nested Loop" not in p for p in inserts), inserts
    assert len(await events(conn, "recipient_final")) == 3001


async def finish_rows(conn: asyncpg.Connection, ids: list[int]) -> None:
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'delivered' WHERE id = ANY($1)", ids
    )
