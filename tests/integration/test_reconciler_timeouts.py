"""A reconciler step that times out says what it waited for and what else was running."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from structlog.testing import capture_logs

from campaign import db
from campaign import reconciler as reconciler_module
from campaign.config import ReconcilerSettings
from campaign.reconciler import Reconciler
from tests.helpers.webhooks import dr, seed_campaign, store_reports


async def failed_line(reconciler: Reconciler) -> dict[str, object]:
    """Run the loop until it logs reconcile_failed; return that line."""
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(reconciler.run(stop))
        try:
            async with asyncio.timeout(30):  # a safety limit, not a measurement
                while not any(e["event"] == "reconcile_failed" for e in logs):
                    await asyncio.sleep(0.05)
        finally:
            stop.set()
            await task
    return next(e for e in logs if e["event"] == "reconcile_failed")


async def test_a_pool_that_gives_no_connection_is_named(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconciler_module, "STEP_TIMEOUT_S", 0.3)
    pool = await db.create_pool(dsn, min_size=1, max_size=1)
    try:
        held = await pool.acquire()
        try:
            reconciler = Reconciler(
                pool=pool, settings=ReconcilerSettings(), queries=db.load_queries()
            )
            line = await failed_line(reconciler)
        finally:
            await pool.release(held)
    finally:
        await pool.close()
    assert line["log_level"] == "error"
    assert line["waited_for"] == "pool_acquire"
    assert line["statement"] == "reconcile_match_reports"
    assert line["pool_size"] == 1 and line["pool_idle"] == 0
    assert line["activity"] == "not available: TimeoutError"
    assert line["plan"] is None  # the statement never started


async def test_a_statement_stuck_on_a_lock_shows_the_session_holding_it(
    pool: asyncpg.Pool, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconciler_module, "STEP_TIMEOUT_S", 0.5)
    _, (r,) = await seed_campaign(conn, ["queued"])
    assert await store_reports(conn, [dr(r["transid"], "7500")]) == 1
    async with conn.transaction():
        # Another session holds the recipient: the match statement waits for its lock.
        await conn.execute("SELECT 1 FROM campaign.recipients WHERE id = $1 FOR UPDATE", r["id"])
        reconciler = Reconciler(pool=pool, settings=ReconcilerSettings(), queries=db.load_queries())
        line = await failed_line(reconciler)
    assert line["waited_for"] == "statement"
    assert line["statement"] == "reconcile_match_reports"
    activity = line["activity"]
    assert isinstance(activity, list)
    assert any(a["state"] == "idle in transaction" for a in activity), activity
    # The snapshot is taken while the statement still waits, before it is cancelled: its
    # own session is in it, waiting for the lock.
    (own,) = [a for a in activity if a["pid"] == line["backend_pid"]]
    assert own["state"] == "active" and own["wait_event_type"] == "Lock", own
    assert own["waiting_for_locks"], own
    # How late the event loop noticed the timeout: near 0 unless the process was starved.
    assert isinstance(line["loop_late_s"], float)
    # The plan the statement gets, so a pathological one (a scan per report) shows.
    plan = line["plan"]
    assert isinstance(plan, list) and plan, plan
    assert any("delivery_reports_new_idx" in step for step in plan), plan
    # Once the lock is gone the report is matched as usual.
    assert (await reconciler.run_once()).reports_matched == 1
