"""The reconciler's named queries against a real PostgreSQL: matching, precedence, waiting,
orphans, the report timeout, completion."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest
from structlog.testing import capture_logs

from campaign import codes, db
from campaign.codes import REPORT_CODES
from campaign.config import ReconcilerSettings
from campaign.reconciler import Reconciler, ReconcileResult
from tests.helpers.plans import plan_nodes
from tests.helpers.seed import queued_campaign, statuses
from tests.helpers.webhooks import dr, minutes, seed_campaign, store_reports


def make_reconciler(pool: asyncpg.Pool, **overrides: float) -> Reconciler:
    settings = ReconcilerSettings(**({"interval_s": 0.05} | overrides))  # type: ignore[arg-type]
    return Reconciler(pool=pool, settings=settings, queries=db.load_queries())


async def recipient(conn: asyncpg.Connection, recipient_id: int) -> asyncpg.Record:
    return await conn.fetchrow("SELECT * FROM campaign.recipients WHERE id = $1", recipient_id)


async def report_states(conn: asyncpg.Connection) -> list[tuple[str, int | None]]:
    rows = await conn.fetch("SELECT state, recipient_id FROM campaign.delivery_reports ORDER BY id")
    return [(r["state"], r["recipient_id"]) for r in rows]


async def test_report_matched_by_transid_sets_status_and_keeps_dr_fields(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    _, (r,) = await seed_campaign(conn, ["queued"])
    assert await store_reports(conn, [dr(r["transid"], "7500", at=minutes(1))]) == 1

    result = await make_reconciler(pool).run_once()

    assert result.reports_examined == 1
    assert result.reports_matched == 1
    assert result.recipients_updated == 1
    row = await recipient(conn, r["id"])
    assert row["status"] == "delivered"
    assert row["dr_code"] == "7500"
    assert row["dr_status"] == "Delivered"
    assert row["dr_description"] == "Delivered"
    assert row["dr_at"] == minutes(1)
    assert await report_states(conn) == [("matched", r["id"])]


# 7206 (SIM full) is a retry code by default ([policy] retry_codes): the recipient is sent
# once more and keeps no dr_* of the given-up attempt (tests/integration/test_learning.py);
# 7201 stands for a final failure here.
@pytest.mark.parametrize("code", ["7500", "7101", "7201", "7501", "7999"])
async def test_a_matched_report_stores_the_meaning_of_its_code(
    pool: asyncpg.Pool, conn: asyncpg.Connection, code: str
) -> None:
    _, (r,) = await seed_campaign(conn, ["queued"])
    await store_reports(conn, [dr(r["transid"], code, at=minutes(1))])

    await make_reconciler(pool).run_once()

    row = await recipient(conn, r["id"])
    assert row["dr_code"] == code
    # The one table of codes (campaign/codes.py) that status, docs and the dashboard use.
    assert row["dr_meaning"] == codes.meaning(code)
    assert row["dr_meaning"] == ("undocumented code" if code == "7999" else REPORT_CODES[code])


# (code, minutes) in arrival order -> expected (status, dr_code).
PRECEDENCE = [
    pytest.param([("7501", 0)], ("queued", "7501"), id="interim-only"),
    pytest.param([("7501", 0), ("7500", 1)], ("delivered", "7500"), id="interim-then-final"),
    pytest.param([("7500", 1), ("7501", 0)], ("delivered", "7500"), id="final-then-old-interim"),
    pytest.param(
        [("7500", 0), ("7501", 5)], ("delivered", "7500"), id="interim-never-replaces-final"
    ),
    pytest.param([("7201", 0), ("7500", 1)], ("delivered", "7500"), id="later-final-wins"),
    pytest.param([("7500", 1), ("7201", 0)], ("delivered", "7500"), id="earlier-final-loses"),
    pytest.param([("7500", 0), ("7201", 1)], ("failed", "7201"), id="later-failure-wins"),
    pytest.param([("7208", 0)], ("expired", "7208"), id="expired"),
    pytest.param([("7102", 0)], ("failed", "7102"), id="other-code-failed"),
    pytest.param([("7501", 0), ("7501", 2), ("7208", 1)], ("expired", "7208"), id="mixed"),
    # A report without a timestamp (None) never overrides one with a timestamp, whatever
    # our clock says when it arrives; among reports without one, the later arrival wins.
    pytest.param([("7201", 0), ("7500", None)], ("failed", "7201"), id="no-ts-never-overrides"),
    pytest.param([("7500", None), ("7201", 0)], ("failed", "7201"), id="ts-overrides-no-ts"),
    pytest.param([("7500", None), ("7201", None)], ("failed", "7201"), id="no-ts-arrival-order"),
    pytest.param([("7201", None), ("7500", None)], ("delivered", "7500"), id="no-ts-arrival-2"),
    pytest.param([("7501", None), ("7500", 0)], ("delivered", "7500"), id="no-ts-interim-then"),
    pytest.param([("7500", None), ("7501", 5)], ("delivered", "7500"), id="no-ts-final-stays"),
    pytest.param([("7501", 0), ("7501", None)], ("queued", "7501"), id="no-ts-interim"),
]


@pytest.mark.parametrize("one_pass", [False, True], ids=["pass-per-report", "one-pass"])
@pytest.mark.parametrize(("sequence", "expected"), PRECEDENCE)
async def test_precedence_table(
    pool: asyncpg.Pool,
    conn: asyncpg.Connection,
    sequence: list[tuple[str, int | None]],
    expected: tuple[str, str],
    one_pass: bool,
) -> None:
    _, (r,) = await seed_campaign(conn, ["queued"], campaign_status="paused")
    reconciler = make_reconciler(pool)
    for code, at in sequence:
        await store_reports(conn, [dr(r["transid"], code, at=None if at is None else minutes(at))])
        if not one_pass:
            await reconciler.run_once()
    await reconciler.run_once()

    row = await recipient(conn, r["id"])
    assert (row["status"], row["dr_code"]) == expected
    assert all(state == "matched" for state, _ in await report_states(conn))
    # dr_at is the winning report's own timestamp, never our clock.
    winner = await conn.fetchval(
        "SELECT reported_at FROM campaign.delivery_reports WHERE code = $1 "
        "ORDER BY reported_at DESC NULLS LAST LIMIT 1",
        expected[1],
    )
    assert row["dr_at"] == winner


async def test_duplicates_are_stored_once_and_change_nothing(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    _, (r,) = await seed_campaign(conn, ["queued"])
    report = dr(r["transid"], "7500", at=minutes(0))
    assert await store_reports(conn, [report, report]) == 1
    reconciler = make_reconciler(pool)
    await reconciler.run_once()
    before = await recipient(conn, r["id"])

    assert await store_reports(conn, [report]) == 0
    # The same report again with its timestamp spelled with an explicit offset.
    same_instant = dr(r["transid"], "7500", at="2026-01-02T04:04:05.678+01:00")
    assert await store_reports(conn, [same_instant]) == 0
    result = await reconciler.run_once()

    assert result.reports_examined == 0
    assert await recipient(conn, r["id"]) == before
    assert await conn.fetchval("SELECT count(*) FROM campaign.delivery_reports") == 1


async def test_report_before_submit_response_waits_then_matches(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    _, (r,) = await seed_campaign(conn, ["sending"])
    await store_reports(
        conn, [dr("T-late", "7500", correlation_id=r["correlation_id"], at=minutes(0))]
    )
    reconciler = make_reconciler(pool)

    result = await reconciler.run_once()
    assert result.reports_examined == 1
    assert result.reports_waiting == 1
    assert (await recipient(conn, r["id"]))["status"] == "sending"
    assert await report_states(conn) == [("new", None)]

    # The sender records the submit response.
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'queued', transid = 'T-late', sent_at = now() "
        "WHERE id = $1",
        r["id"],
    )
    await reconciler.run_once()
    row = await recipient(conn, r["id"])
    assert (row["status"], row["dr_code"]) == ("delivered", "7500")
    assert await report_states(conn) == [("matched", r["id"])]


async def test_report_with_only_a_transid_waits_for_the_transid(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    _, (r,) = await seed_campaign(conn, ["sending"])
    await store_reports(conn, [dr("T-only", "7201")])
    reconciler = make_reconciler(pool)
    assert (await reconciler.run_once()).reports_matched == 0
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'queued', transid = 'T-only' WHERE id = $1",
        r["id"],
    )
    assert (await reconciler.run_once()).reports_matched == 1
    assert (await recipient(conn, r["id"]))["status"] == "failed"


@pytest.mark.parametrize(
    ("code", "status"), [("7500", "delivered"), ("7501", "queued"), ("7203", "failed")]
)
async def test_correlation_id_resolves_unknown_recipients(
    pool: asyncpg.Pool, conn: asyncpg.Connection, code: str, status: str
) -> None:
    _, (r,) = await seed_campaign(conn, ["unknown"])
    await conn.execute(
        "UPDATE campaign.recipients SET error_code = 'in_doubt', sent_at = NULL WHERE id = $1",
        r["id"],
    )
    await store_reports(conn, [dr("T-x", code, correlation_id=r["correlation_id"])])

    await make_reconciler(pool).run_once()

    row = await recipient(conn, r["id"])
    assert row["status"] == status
    assert row["transid"] == "T-x"
    assert row["sent_at"] is not None
    # A final report replaces the sender's guess; an interim one leaves it alone.
    assert row["error_code"] == ("in_doubt" if code == "7501" else None)


async def test_transid_and_correlation_id_pick_the_right_recipient(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    _, (a, b) = await seed_campaign(conn, ["queued", "queued"])
    # Should the platform ever share one transid between destinations.
    await conn.execute(
        "UPDATE campaign.recipients SET transid = 'shared' WHERE id = ANY($1)",
        [
            a["id"],
            b["id"],
        ],
    )
    await store_reports(conn, [dr("shared", "7201", correlation_id=b["correlation_id"])])
    await make_reconciler(pool).run_once()
    assert (await recipient(conn, a["id"]))["status"] == "queued"
    assert (await recipient(conn, b["id"]))["status"] == "failed"


async def test_unmatched_report_is_orphaned_after_orphan_after_s_and_logged_once(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    await store_reports(conn, [dr("T-nobody", "7500"), dr("T-recent", "7500")])
    await conn.execute(
        "UPDATE campaign.delivery_reports SET received_at = now() - interval '2 hours' "
        "WHERE transid = 'T-nobody'"
    )
    reconciler = make_reconciler(pool, orphan_after_s=3600.0)

    with capture_logs() as logs:
        first = await reconciler.run_once()
        second = await reconciler.run_once()

    assert first.reports_orphaned == 1
    assert second.reports_orphaned == 0
    orphaned = [e for e in logs if e["event"] == "report_orphaned"]
    assert [e["transid"] for e in orphaned] == ["T-nobody"]
    states = await conn.fetch(
        "SELECT transid, state FROM campaign.delivery_reports ORDER BY transid"
    )
    assert [(s["transid"], s["state"]) for s in states] == [
        ("T-nobody", "orphaned"),
        ("T-recent", "new"),
    ]


async def test_queued_without_final_report_times_out_then_a_late_report_still_wins(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    _, (old, recent, interim) = await seed_campaign(
        conn, ["queued", "queued", "queued"], campaign_status="paused"
    )
    await conn.execute(
        "UPDATE campaign.recipients SET sent_at = now() - interval '3 days' WHERE id = ANY($1)",
        [old["id"], interim["id"]],
    )
    await store_reports(conn, [dr(interim["transid"], "7501")])
    reconciler = make_reconciler(pool, report_timeout_s=172_800.0)

    result = await reconciler.run_once()

    assert result.recipients_timed_out == 2
    for r in (old, interim):
        row = await recipient(conn, r["id"])
        assert (row["status"], row["error_code"]) == ("failed", "report_timeout")
    assert (await recipient(conn, recent["id"]))["status"] == "queued"

    await store_reports(conn, [dr(old["transid"], "7500"), dr(interim["transid"], "7500")])
    await reconciler.run_once()
    for r in (old, interim):
        row = await recipient(conn, r["id"])
        assert (row["status"], row["error_code"], row["dr_code"]) == ("delivered", None, "7500")


async def test_campaign_completes_when_every_recipient_is_final(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    campaign_id, rows = await seed_campaign(
        conn, ["delivered", "failed", "invalid", "suppressed", "queued"]
    )
    paused_id, _ = await seed_campaign(conn, ["delivered"], campaign_status="paused")
    reconciler = make_reconciler(pool)

    assert (await reconciler.run_once()).campaigns_completed == 0
    await store_reports(conn, [dr(rows[4]["transid"], "7208")])
    with capture_logs() as logs:
        result = await reconciler.run_once()

    assert result.campaigns_completed == 1
    campaign = await conn.fetchrow(
        "SELECT status, completed_at FROM campaign.campaigns WHERE id = $1", campaign_id
    )
    assert campaign["status"] == "completed"
    assert campaign["completed_at"] is not None
    (line,) = [e for e in logs if e["event"] == "campaign_completed"]
    assert line["campaign_id"] == campaign_id
    assert line["recipients"] == 5
    assert (line["delivered"], line["failed"], line["invalid"], line["suppressed"]) == (1, 1, 1, 1)
    assert (line["expired"], line["rejected"], line["cancelled"]) == (1, 0, 0)
    finished = [e for e in logs if e["event"] == "reconcile_finished"]
    assert finished and finished[0]["campaigns_completed"] == 1
    assert "duration_ms" in finished[0]
    # A paused campaign is the user's to resume or cancel, even with nothing left to send.
    paused = await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id = $1", paused_id)
    assert paused == "paused"
    assert (await reconciler.run_once()).campaigns_completed == 0


@pytest.mark.parametrize(
    ("outcomes", "level"),
    [
        # Stopped before any request (a list of repeated numbers, numbers at their cap).
        (["delivered", "duplicate", "duplicate", "capped", "capped"], "warning"),
        (["delivered", "failed", "suppressed", "cancelled", "capped"], "warning"),
        # Reached the API: delivered or not, they were sent.
        (["delivered", "failed", "failed", "duplicate", "capped"], "info"),
    ],
)
async def test_completion_warns_when_most_recipients_were_never_sent(
    pool: asyncpg.Pool, conn: asyncpg.Connection, outcomes: list[str], level: str
) -> None:
    campaign_id, _ = await seed_campaign(conn, outcomes)
    with capture_logs() as logs:
        assert (await make_reconciler(pool).run_once()).campaigns_completed == 1
    (line,) = [e for e in logs if e["event"] == "campaign_completed"]
    assert (line["campaign_id"], line["recipients"]) == (campaign_id, 5)
    assert line["log_level"] == level


async def test_waiting_reports_do_not_starve_newer_ones(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    _, rows = await seed_campaign(conn, ["sending", "sending", "sending", "queued"])
    await store_reports(
        conn, [dr(f"T-wait-{i}", correlation_id=rows[i]["correlation_id"]) for i in range(3)]
    )
    await store_reports(conn, [dr(rows[3]["transid"], "7500")])
    # One statement a pass, so the cursor's steps are exact.
    reconciler = make_reconciler(pool, batch_size=2, parallel=1)

    first = await reconciler.run_once()
    second = await reconciler.run_once()

    assert first == ReconcileResult(reports_examined=2, full=True)
    assert (second.reports_examined, second.reports_matched, second.full) == (2, 1, True)
    assert (await recipient(conn, rows[3]["id"]))["status"] == "delivered"
    # Past the end: an empty pass, then the cursor starts over with the waiting ones.
    third = await reconciler.run_once()
    assert (third.reports_examined, third.full) == (0, False)
    fourth = await reconciler.run_once()
    assert (fourth.reports_examined, fourth.reports_matched, fourth.full) == (2, 0, True)


async def test_final_report_for_a_sending_recipient_never_lands_before_the_response(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    # A recipient that is being sent again keeps its old transid until the response.
    _, (r,) = await seed_campaign(conn, ["sending"])
    await conn.execute("UPDATE campaign.recipients SET transid = 'T-old' WHERE id = $1", r["id"])
    await store_reports(conn, [dr("T-old", "7500")])
    assert (await make_reconciler(pool).run_once()).reports_matched == 0
    assert (await recipient(conn, r["id"]))["status"] == "sending"


async def test_run_loop_matches_until_stopped(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    _, (r,) = await seed_campaign(conn, ["queued"], campaign_status="paused")
    stop = asyncio.Event()
    task = asyncio.create_task(make_reconciler(pool).run(stop))
    try:
        await store_reports(conn, [dr(r["transid"], "7500")])
        async with asyncio.timeout(10):
            while (await recipient(conn, r["id"]))["status"] != "delivered":
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task
    assert task.done() and task.exception() is None


async def test_two_reconcilers_at_once_apply_each_report_once(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    _, rows = await seed_campaign(conn, ["queued"] * 200, campaign_status="paused")
    await store_reports(
        conn,
        [dr(r["transid"], "7501", at=minutes(0)) for r in rows]
        + [dr(r["transid"], "7500", at=minutes(1)) for r in rows],
    )
    first, second = make_reconciler(pool, batch_size=50), make_reconciler(pool, batch_size=50)

    for _ in range(20):
        results = await asyncio.gather(first.run_once(), second.run_once())
        if not any(r.reports_examined for r in results):
            break

    counts = await conn.fetch("SELECT status, count(*) FROM campaign.recipients GROUP BY status")
    assert {c["status"]: c["count"] for c in counts} == {"delivered": 200}
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM campaign.delivery_reports WHERE state <> 'matched'"
        )
        == 0
    )


async def test_statements_are_planned_for_the_tables_as_they_are_now(dsn: str) -> None:
    """No generic plan: one made while the tables were small outlives their growth.

    PostgreSQL switches a prepared statement to a generic plan after five executions when
    that looks no dearer; asyncpg prepares every statement. A generic match plan made on a
    near-empty database took minutes per pass on 300,000 recipients until autovacuum
    happened to analyze the table (the reconciler "stall" of the fault runs).
    """
    pool = await db.create_pool(dsn, min_size=1, max_size=1)
    try:
        reconciler = make_reconciler(pool)
        async with pool.acquire() as c:
            _, (r,) = await seed_campaign(c, ["queued"])
            await store_reports(c, [dr(r["transid"], "7500", at=minutes(1))])
        for _ in range(8):
            await reconciler.run_once()
        async with pool.acquire() as c:
            plans = await c.fetch(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                "WHERE statement LIKE '%campaign.delivery_reports%' "
                "AND statement NOT LIKE '%pg_prepared_statements%'"
            )
        assert max(p["custom_plans"] for p in plans) >= 8, plans
        assert all(p["generic_plans"] == 0 for p in plans), plans
    finally:
        await pool.close()


async def test_a_backlog_met_with_old_statistics_costs_linear_work(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """Statistics taken before a backlog (no report waiting then) must not turn a pass
    quadratic. With them the planner took each CTE for one row and probed the primary key
    once per report with the whole pass's id array: 32 s for 5,000 reports, the
    reconciler's stall on loaded machines. The plan's shape is checked, not its time."""
    n = 2000
    campaign_id = await queued_campaign(conn, n)
    await conn.execute("ANALYZE campaign.recipients")
    await conn.execute("ANALYZE campaign.delivery_reports")  # empty: nothing waits
    await conn.execute(
        "INSERT INTO campaign.delivery_reports (transid, code, state, reported_at, raw)"
        " SELECT 'T' || g, '7500', 'new', now(), '{}' FROM generate_series(0, $1 - 1) g",
        n,
    )
    # The pass's own statement and arguments, explained as it runs.
    queries = dict(db.load_queries())
    queries["reconcile_match_reports"] = (
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queries["reconcile_match_reports"]
    )
    reconciler = Reconciler(pool=pool, settings=ReconcilerSettings(batch_size=n), queries=queries)
    async with conn.transaction():
        row = await reconciler._match_on(conn, 0)
    repeated_arrays, removed = [], 0
    for node in plan_nodes(row[0]):
        # An index probe with the pass's id array (= ANY), run again for every outer row:
        # each run sorts and walks the whole array.
        if "ANY" in node.get("Index Cond", "") and node["Actual Loops"] > 1:
            repeated_arrays.append((node.get("Relation Name"), node["Actual Loops"]))
        removed += node.get("Rows Removed by Join Filter", 0)
    assert repeated_arrays == [], repeated_arrays
    assert removed < n, removed
    assert await statuses(conn, campaign_id) == {"delivered": n}


async def test_plain_connections_plan_every_execution_too(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("SHOW plan_cache_mode") == "force_custom_plan"


async def test_sweeps_wait_for_interval_s_while_a_backlog_is_matched(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """Full passes sweep at most once per interval_s; the pass that drains the backlog does."""
    _, rows = await seed_campaign(conn, ["queued"] * 6)
    reconciler = make_reconciler(pool, batch_size=2, interval_s=3600.0, orphan_after_s=60.0)
    await store_reports(conn, [dr(r["transid"], "7500") for r in rows[:2]])
    assert (await reconciler.run_once()).full  # the first pass sweeps: none swept yet

    await store_reports(conn, [dr("T-nobody", "7500")])
    await conn.execute(
        "UPDATE campaign.delivery_reports SET received_at = now() - interval '2 hours' "
        "WHERE transid = 'T-nobody'"
    )
    await store_reports(conn, [dr(r["transid"], "7500") for r in rows[2:]])
    passes = []
    while True:
        result = await reconciler.run_once()
        passes.append((result.full, result.reports_orphaned))
        if not result.full:
            break
    # Full passes within interval_s leave the orphan; the last, not full, sweeps it.
    assert passes[:-1] and all(orphaned == 0 for _, orphaned in passes[:-1])
    assert passes[-1] == (False, 1)
    assert (
        await conn.fetchval(
            "SELECT state FROM campaign.delivery_reports WHERE transid = 'T-nobody'"
        )
        == "orphaned"
    )


async def test_the_match_commits_without_waiting_for_the_wal_flush(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """Matching is derived data (a lost commit is matched again): no flush wait per pass."""
    _, (r,) = await seed_campaign(conn, ["queued"])
    await store_reports(conn, [dr(r["transid"], "7500")])
    await conn.execute("CREATE TABLE public.sync_probe (setting text)")
    queries = dict(db.load_queries())
    match = queries["reconcile_match_reports"]
    assert "\nWITH codes AS (" in match
    # The same statement, also recording the setting it runs under.
    queries["reconcile_match_reports"] = match.replace(
        "\nWITH codes AS (",
        "\nWITH probe AS (INSERT INTO public.sync_probe "
        "VALUES (current_setting('synchronous_commit'))), codes AS (",
    )
    reconciler = Reconciler(pool=pool, settings=ReconcilerSettings(), queries=queries)

    result = await reconciler.run_once()

    assert result.reports_matched == 1
    assert await conn.fetchval("SELECT setting FROM public.sync_probe") == "off"
    # Only that statement: the pool's connections are back to the server's setting.
    async with pool.acquire() as c:
        assert await c.fetchval("SHOW synchronous_commit") == "on"


async def test_a_backlog_is_matched_by_parallel_statements_each_report_once(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    _, rows = await seed_campaign(conn, ["queued"] * 40, campaign_status="paused")
    await store_reports(
        conn,
        [dr(r["transid"], "7501", at=minutes(0)) for r in rows]
        + [dr(r["transid"], "7500", at=minutes(1)) for r in rows],
    )
    reconciler = make_reconciler(pool, batch_size=10, parallel=3)

    examined = []
    while True:
        result = await reconciler.run_once()
        examined.append(result.reports_examined)
        if not result.full:
            break

    # One statement to start, then three at once (30 reports a pass) while the backlog lasts.
    assert examined[0] == 10
    assert examined[1] == 30
    assert sum(examined) == 80
    counts = await conn.fetch("SELECT status, count(*) FROM campaign.recipients GROUP BY status")
    assert {c["status"]: c["count"] for c in counts} == {"delivered": 40}
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM campaign.delivery_reports WHERE state = 'matched'"
        )
        == 80
    )


async def test_reports_with_only_a_correlation_id_are_each_stored_and_matched(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """Four recipients' reports without a transid, two without a timestamp and two sharing
    one: four different reports, none of them a duplicate of another."""
    _, rows = await seed_campaign(conn, ["unknown"] * 4)
    items = [
        dr(None, "7500", correlation_id=r["correlation_id"], at=None if i < 2 else minutes(0))
        for i, r in enumerate(rows)
    ]
    assert await store_reports(conn, items) == 4
    # The platform retrying the same body stores nothing twice.
    assert await store_reports(conn, items) == 0

    await make_reconciler(pool).run_once()

    for r in rows:
        assert (await recipient(conn, r["id"]))["status"] == "delivered"
    assert sorted(await report_states(conn)) == sorted(("matched", r["id"]) for r in rows)


async def test_a_correlation_id_never_matches_a_recipient_that_was_never_posted(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """Correlation ids (r<id>) repeat after a restore and across environments: a report
    found by one alone cannot settle a recipient no request ever carried."""
    _, (fresh, retried) = await seed_campaign(conn, ["pending", "pending"])
    # `retried` was posted once (in doubt) and given back to be sent again.
    await conn.execute("UPDATE campaign.recipients SET attempts = 1 WHERE id = $1", retried["id"])
    await store_reports(
        conn,
        [
            dr("T-elsewhere", "7500", correlation_id=fresh["correlation_id"]),
            dr("T-first", "7500", correlation_id=retried["correlation_id"]),
        ],
    )

    await make_reconciler(pool).run_once()

    row = await recipient(conn, fresh["id"])
    assert (row["status"], row["transid"], row["dr_code"]) == ("pending", None, None)
    row = await recipient(conn, retried["id"])
    assert (row["status"], row["transid"]) == ("delivered", "T-first")
    assert await report_states(conn) == [("new", None), ("matched", retried["id"])]


async def test_a_report_of_a_superseded_attempt_is_linked_but_changes_nothing(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    """Attempt 1 was in doubt and attempt 2 was accepted: attempt 1's reports, found by
    correlation id, are kept and linked, and never touch attempt 2's status or dr_*."""
    _, (done, waiting) = await seed_campaign(conn, ["queued", "queued"], campaign_status="paused")
    for r in (done, waiting):
        await conn.execute(
            "UPDATE campaign.recipients SET transid = $2, attempts = 2 WHERE id = $1",
            r["id"],
            f"T2-{r['id']}",
        )
    reconciler = make_reconciler(pool)
    await store_reports(
        conn, [dr(f"T2-{done['id']}", "7500", correlation_id=done["correlation_id"], at=minutes(1))]
    )
    await reconciler.run_once()

    await store_reports(
        conn,
        [
            dr(f"T1-{done['id']}", "7208", correlation_id=done["correlation_id"], at=minutes(5)),
            dr(f"T1-{waiting['id']}", "7500", correlation_id=waiting["correlation_id"]),
        ],
    )
    await reconciler.run_once()

    row = await recipient(conn, done["id"])
    assert (row["status"], row["transid"], row["dr_code"], row["dr_at"]) == (
        "delivered",
        f"T2-{done['id']}",
        "7500",
        minutes(1),
    )
    row = await recipient(conn, waiting["id"])
    assert (row["status"], row["transid"], row["dr_code"]) == (
        "queued",
        f"T2-{waiting['id']}",
        None,
    )
    assert sorted(await report_states(conn)) == sorted(
        [("matched", done["id"]), ("matched", done["id"]), ("matched", waiting["id"])]
    )


# Holds a completion statement after it took its snapshot and before it locks anything,
# until the test releases the advisory lock: the window in which an insert can commit.
PAUSE_KEY = 7301
PAUSE_FUNCTION = f"""
CREATE FUNCTION public.completion_pause() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_lock_shared({PAUSE_KEY});
    PERFORM pg_advisory_unlock_shared({PAUSE_KEY});
    RETURN true;
END;
$$
"""


def paused_queries(*names: str) -> dict[str, str]:
    """The named queries, those in `names` (default: every completion statement) paused
    where they test for a running campaign."""
    queries = dict(db.load_queries())
    marker = "c.status = 'running'"
    for name, sql in queries.items():
        chosen = name in names if names else name.startswith("reconcile_")
        if chosen and marker in sql:
            queries[name] = sql.replace(marker, f"{marker} AND public.completion_pause()", 1)
    return queries


async def wait_until(conn: asyncpg.Connection, sql: str, *args: object) -> None:
    async with asyncio.timeout(30):
        while not await conn.fetchval(sql, *args):
            await asyncio.sleep(0.01)


async def test_a_recipient_inserted_while_the_campaign_completes_is_sent(
    pool: asyncpg.Pool, conn: asyncpg.Connection, dsn: str
) -> None:
    """The insert commits after the completer's snapshot and before its lock."""
    campaign_id, _ = await seed_campaign(conn, ["delivered", "failed"])
    await conn.execute(PAUSE_FUNCTION)
    reconciler = Reconciler(
        pool=pool, settings=ReconcilerSettings(interval_s=0.05), queries=paused_queries()
    )
    holder = await db.connect(dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", PAUSE_KEY)
        completing = asyncio.create_task(reconciler.run_once())
        await wait_until(
            conn, "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
        late = await conn.fetchval(
            "INSERT INTO campaign.recipients (campaign_id, msisdn) "
            "VALUES ($1, '919810099999') RETURNING id",
            campaign_id,
        )
        await holder.execute("SELECT pg_advisory_unlock($1)", PAUSE_KEY)
        async with asyncio.timeout(30):
            await completing
    finally:
        await holder.close()

    status = await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id = $1", campaign_id)
    assert (await recipient(conn, late))["status"] == "pending"
    # A completed campaign is never looked at again by the producer: the row would be lost.
    assert status == "running"


@pytest.mark.parametrize("foreign_key", [True, False], ids=["with-fk", "without-fk"])
async def test_a_recipient_inserted_after_the_completer_locked_reopens_the_campaign(
    pool: asyncpg.Pool, conn: asyncpg.Connection, dsn: str, foreign_key: bool
) -> None:
    """The completer holds the campaign and its fresh look found nothing open: the insert
    waits for it, then reopens the campaign it completed. The foreign key check would wait
    too; without it the trigger's own lock must."""
    campaign_id, _ = await seed_campaign(conn, ["delivered"])
    await conn.execute(PAUSE_FUNCTION)
    if not foreign_key:
        await conn.execute(
            "ALTER TABLE campaign.recipients DROP CONSTRAINT recipients_campaign_id_fkey"
        )
    reconciler = Reconciler(
        pool=pool,
        settings=ReconcilerSettings(interval_s=0.05),
        queries=paused_queries("reconcile_complete_campaigns"),
    )
    holder = await db.connect(dsn)
    inserter = await db.connect(dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", PAUSE_KEY)
        completing = asyncio.create_task(reconciler.run_once())
        await wait_until(
            conn, "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        )
        inserting = asyncio.create_task(
            inserter.fetchval(
                "INSERT INTO campaign.recipients (campaign_id, msisdn) "
                "VALUES ($1, '919810099999') RETURNING id",
                campaign_id,
            )
        )
        pid = inserter.get_server_pid()
        await wait_until(conn, "SELECT cardinality(pg_blocking_pids($1)) > 0", pid)
        await holder.execute("SELECT pg_advisory_unlock($1)", PAUSE_KEY)
        async with asyncio.timeout(30):
            result = await completing
            late = await inserting
    finally:
        await holder.close()
        await inserter.close()

    assert result.campaigns_completed == 1
    campaign = await conn.fetchrow(
        "SELECT status, completed_at FROM campaign.campaigns WHERE id = $1", campaign_id
    )
    assert (campaign["status"], campaign["completed_at"]) == ("running", None)
    assert (await recipient(conn, late))["status"] == "pending"


async def test_an_application_allowed_only_to_insert_recipients_reopens_a_completed_campaign(
    conn: asyncpg.Connection,
) -> None:
    """The reopen trigger locks and updates campaigns as the schema's owner: inserting
    recipients needs no privilege on campaign.campaigns."""
    campaign_id, _ = await seed_campaign(conn, ["delivered"], campaign_status="completed")
    role = f"campaign_inserter_{os.getpid()}"
    await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
    await conn.execute(f'CREATE ROLE "{role}" NOLOGIN')
    try:
        await conn.execute(f'GRANT USAGE ON SCHEMA campaign TO "{role}"')
        await conn.execute(f'GRANT INSERT ON campaign.recipients TO "{role}"')
        async with conn.transaction():
            await conn.execute(f'SET LOCAL ROLE "{role}"')
            await conn.execute(
                "INSERT INTO campaign.recipients (campaign_id, msisdn) VALUES ($1, '919810099999')",
                campaign_id,
            )
        status = await conn.fetchval(
            "SELECT status FROM campaign.campaigns WHERE id = $1", campaign_id
        )
        assert status == "running"
    finally:
        await conn.execute(f'DROP OWNED BY "{role}"')
        await conn.execute(f'DROP ROLE "{role}"')
