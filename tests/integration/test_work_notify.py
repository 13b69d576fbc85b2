"""NOTIFY campaign_work (migration 0008): sent when a campaign is inserted or its status
really changes, never for an UPDATE that changed no status (the producer's sweeps and
claims run such statements all the time, and every worker of the fleet would wake)."""

from __future__ import annotations

import asyncio

import asyncpg

from tests.helpers.seed import create_campaign


async def notified(listener: asyncpg.Connection, conn: asyncpg.Connection, sql: str) -> int:
    """How many campaign_work notifications `sql` sent (delivered at its commit)."""
    got: list[str] = []

    def on_notify(*args: object) -> None:
        got.append(str(args[-1]))

    await listener.add_listener("campaign_work", on_notify)
    try:
        await conn.execute(sql)
        # A round trip on the listener after the commit: the notification is in by then.
        await listener.execute("SELECT 1")
        await asyncio.sleep(0.05)
    finally:
        await listener.remove_listener("campaign_work", on_notify)
    return len(got)


async def test_only_a_real_status_change_wakes_the_workers(
    conn: asyncpg.Connection, dsn: str
) -> None:
    listener = await asyncpg.connect(dsn)
    try:
        cid = await create_campaign(conn, status="draft")
        # No row, or no status changed: nothing.
        assert (
            await notified(
                listener, conn, "UPDATE campaign.campaigns SET status = 'paused' WHERE false"
            )
            == 0
        )
        assert (
            await notified(
                listener, conn, f"UPDATE campaign.campaigns SET status = status WHERE id = {cid}"
            )
            == 0
        )
        assert (
            await notified(
                listener, conn, f"UPDATE campaign.campaigns SET name = 'x' WHERE id = {cid}"
            )
            == 0
        )
        # A resume (draft -> ready): the workers are woken, once for the statement.
        assert (
            await notified(
                listener, conn, f"UPDATE campaign.campaigns SET status = 'ready' WHERE id = {cid}"
            )
            == 1
        )
        assert (
            await notified(
                listener,
                conn,
                "INSERT INTO campaign.campaigns (name, service, body) "
                "VALUES ('n', 'default', 'hi')",
            )
            == 1
        )
    finally:
        await listener.close()
