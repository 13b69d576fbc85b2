"""Fleet queries against a real PostgreSQL: registration, heartbeats, dead workers, shares,
the fleet-wide AIMD factor; and `campaign prune`, table by table, in bounded chunks."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

import asyncpg
import pytest
from structlog.testing import capture_logs

from campaign import config, db
from campaign.commands.prune import Pruner
from campaign.fleet import Fleet, WorkerIdInUse
from campaign.ratelimit import ServiceLimiter
from tests.helpers.proc import Processes, wait_until, write_config
from tests.helpers.seed import add_recipients, create_campaign, numbers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiters(
    *services: str, rate_per_s: float = 3000.0, clock: Clock | None = None
) -> dict[str, ServiceLimiter]:
    return {
        name: ServiceLimiter(
            service=name, rate_per_s=rate_per_s, batch_size=1000, clock=clock or Clock()
        )
        for name in services or ("default",)
    }


def member(
    pool: asyncpg.Pool,
    worker_id: str,
    lims: Mapping[str, ServiceLimiter],
    *,
    dead_after_s: float = 3.0,
    heartbeat_interval_s: float = 0.01,
    listener: asyncpg.Connection | None = None,
    quiet: bool = False,
) -> Fleet:
    """A fleet member; with `listener` its LISTEN connection, and `quiet` what its
    producer says (nothing claimed, nothing held)."""
    return Fleet(
        pool=pool,
        queries=db.load_queries(),
        worker_id=worker_id,
        limiters=lims,
        heartbeat_interval_s=heartbeat_interval_s,
        dead_after_s=dead_after_s,
        quiet=lambda: quiet,
        listen_pid=lambda: listener.get_server_pid() if listener is not None else None,
    )


async def gone(conn: asyncpg.Connection, pid: int) -> bool:
    """The server process `pid` no longer shows in pg_stat_activity."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)


async def test_a_quiet_worker_is_live_while_its_listen_connection_is_open(
    pool: asyncpg.Pool, conn: asyncpg.Connection, dsn: str
) -> None:
    listener = await db.connect(dsn)
    pid = listener.get_server_pid()
    quiet = member(pool, "quiet", limiters(), listener=listener, quiet=True)
    other_lims = limiters()
    other = member(pool, "other", other_lims)
    try:
        await quiet.join(asyncio.Event())
        await other.join(asyncio.Event())
        await quiet.heartbeat()
        assert quiet.quiet
        # Long past dead_after_s without a heartbeat: still counted (and keeps its id).
        await conn.execute(
            "UPDATE campaign.workers SET heartbeat_at = now() - interval '1 minute' "
            "WHERE worker_id = 'quiet'"
        )
        assert [s.live_workers for s in await other.heartbeat()] == [2]
        taken = await conn.fetchval(
            db.load_queries()["fleet_register"], "quiet", ["default"], [3000.0], 3.0
        )
        assert taken is None
        # A worker that hangs with its connection open: dropped once quiet_until passed.
        await conn.execute(
            "UPDATE campaign.workers SET quiet_until = now() - interval '1 second' "
            "WHERE worker_id = 'quiet'"
        )
        assert [s.live_workers for s in await other.heartbeat()] == [1]
        await quiet.heartbeat()
        assert [s.live_workers for s in await other.heartbeat()] == [2]
    finally:
        await listener.close()
    # Killed: its connection closes, and the others take its share at once.
    await wait_until(lambda: gone(conn, pid), what="the LISTEN backend to exit")
    assert [s.live_workers for s in await other.heartbeat()] == [1]
    assert other_lims["default"].share == 1.0


async def test_a_sending_worker_is_dead_once_its_listen_connection_closed(
    pool: asyncpg.Pool, conn: asyncpg.Connection, dsn: str
) -> None:
    listener = await db.connect(dsn)
    pid = listener.get_server_pid()
    sending = member(pool, "sending", limiters(), listener=listener, quiet=False)
    other = member(pool, "other", limiters())
    await sending.join(asyncio.Event())
    await other.join(asyncio.Event())
    await sending.heartbeat()
    assert not sending.quiet
    assert [s.live_workers for s in await other.heartbeat()] == [2]
    await listener.close()
    await wait_until(lambda: gone(conn, pid), what="the LISTEN backend to exit")
    # Its heartbeat is fresh, but its process is gone: no need to wait dead_after_s.
    assert [s.live_workers for s in await other.heartbeat()] == [1]


async def test_a_quiet_worker_heartbeats_as_sending_before_its_first_claim(
    pool: asyncpg.Pool, conn: asyncpg.Connection, dsn: str
) -> None:
    listener = await db.connect(dsn)
    try:
        idle = True
        fleet = Fleet(
            pool=pool,
            queries=db.load_queries(),
            worker_id="waking",
            limiters=limiters(),
            quiet=lambda: idle,
            listen_pid=listener.get_server_pid,
        )
        await fleet.join(asyncio.Event())
        await fleet.heartbeat()
        assert fleet.quiet
        quiet_until = "SELECT quiet_until FROM campaign.workers WHERE worker_id = 'waking'"
        assert await conn.fetchval(quiet_until) is not None
        idle = False
        before = await conn.fetchval(
            "SELECT heartbeat_at FROM campaign.workers WHERE worker_id = 'waking'"
        )
        await fleet.ready_to_send()
        assert not fleet.quiet
        assert await conn.fetchval(quiet_until) is None
        after = await conn.fetchval(
            "SELECT heartbeat_at FROM campaign.workers WHERE worker_id = 'waking'"
        )
        assert after > before
        # Already sending: nothing to do, no round trip.
        await fleet.ready_to_send()
        assert (
            await conn.fetchval(
                "SELECT heartbeat_at FROM campaign.workers WHERE worker_id = 'waking'"
            )
            == after
        )
        # Without a LISTEN connection nothing would keep it live: never quiet.
        fleet_without = member(pool, "deaf", limiters(), quiet=True)
        await fleet_without.join(asyncio.Event())
        await fleet_without.heartbeat()
        assert not fleet_without.quiet
    finally:
        await listener.close()


async def test_register_heartbeat_and_deregister(pool: asyncpg.Pool) -> None:
    lims = limiters("a", "b")
    fleet = member(pool, "w1", lims)
    await fleet.join(asyncio.Event())
    row = await pool.fetchrow("SELECT * FROM campaign.workers WHERE worker_id = 'w1'")
    assert row is not None
    assert row["services"] == ["a", "b"] and row["rates_per_s"] == [3000.0, 3000.0]
    first = row["heartbeat_at"]
    await asyncio.sleep(0.01)
    states = await fleet.heartbeat()
    assert [(s.service, s.live_workers, s.factor) for s in states] == [("a", 1, 1.0), ("b", 1, 1.0)]
    later = await pool.fetchval("SELECT heartbeat_at FROM campaign.workers WHERE worker_id = 'w1'")
    assert later > first
    assert lims["a"].share == 1.0
    await fleet.leave()
    assert await pool.fetchval("SELECT count(*) FROM campaign.workers") == 0


async def test_live_workers_share_and_rebalance_on_leave_and_death(pool: asyncpg.Pool) -> None:
    lims = {w: limiters() for w in ("w1", "w2", "w3")}
    fleets = {w: member(pool, w, lims[w]) for w in lims}
    for fleet in fleets.values():
        await fleet.join(asyncio.Event())
    for fleet in fleets.values():
        await fleet.heartbeat()
    for w in lims:
        assert lims[w]["default"].share == pytest.approx(1 / 3)
        assert lims[w]["default"].max_batch == 333
    # A clean stop: the others take the share at their next heartbeat.
    await fleets["w3"].leave()
    await fleets["w1"].heartbeat()
    assert lims["w1"]["default"].share == 0.5
    # A death: w2's heartbeat stops; once older than dead_after_s it no longer counts.
    await pool.execute(
        "UPDATE campaign.workers SET heartbeat_at = now() - interval '2 seconds' "
        "WHERE worker_id = 'w2'"
    )
    await fleets["w1"].heartbeat()
    assert lims["w1"]["default"].share == 0.5, "dead only after dead_after_s (3 s)"
    await pool.execute(
        "UPDATE campaign.workers SET heartbeat_at = now() - interval '4 seconds' "
        "WHERE worker_id = 'w2'"
    )
    states = await fleets["w1"].heartbeat()
    assert states[0].live_workers == 1
    assert lims["w1"]["default"].share == 1.0


async def test_shares_are_per_service_and_use_the_smallest_rate(pool: asyncpg.Pool) -> None:
    mine = limiters("sms", "otp", rate_per_s=3000.0)
    theirs = limiters("sms", rate_per_s=1500.0)
    me, other = member(pool, "me", mine), member(pool, "other", theirs)
    await me.join(asyncio.Event())
    await other.join(asyncio.Event())
    await me.heartbeat()
    assert mine["otp"].share == 1.0  # nobody else sends for otp
    assert mine["sms"].effective_rate_per_s == pytest.approx(750.0)
    assert theirs["sms"].effective_rate_per_s == pytest.approx(750.0)


BACKDATE_START = "UPDATE campaign.workers SET started_at = now() - interval '10 minutes'"


async def test_a_joining_worker_waits_for_the_others_to_make_room(pool: asyncpg.Pool) -> None:
    first, second = member(pool, "first", limiters()), member(pool, "second", limiters())
    with capture_logs() as logs:
        await first.join(asyncio.Event())
        assert not [e for e in logs if e["event"] == "fleet_joining"]
        await pool.execute(BACKDATE_START)  # first has been sending for a while
        await second.join(asyncio.Event())
    joining = [e for e in logs if e["event"] == "fleet_joining"]
    assert len(joining) == 1 and joining[0]["worker_id"] == "second"
    assert joining[0]["live_workers"] == {"default": 2}


async def test_workers_started_together_do_not_wait_for_each_other(pool: asyncpg.Pool) -> None:
    first = member(pool, "first", limiters(), heartbeat_interval_s=60.0)
    lims = limiters()
    second = member(pool, "second", lims, heartbeat_interval_s=60.0)
    with capture_logs() as logs:
        await first.join(asyncio.Event())
        # A wait would be 90 s here.
        await asyncio.wait_for(second.join(asyncio.Event()), timeout=10.0)
    assert not [e for e in logs if e["event"] == "fleet_joining"]
    assert lims["default"].share == 0.5


async def test_a_live_worker_id_is_refused_and_a_dead_ones_taken_over(pool: asyncpg.Pool) -> None:
    alive = member(pool, "dup", limiters(), dead_after_s=0.5)
    await alive.join(asyncio.Event())
    stop = asyncio.Event()
    beating = asyncio.create_task(alive.run(stop))
    try:
        with pytest.raises(WorkerIdInUse, match="'dup'"):
            await member(pool, "dup", limiters(), dead_after_s=0.5).join(asyncio.Event())
    finally:
        stop.set()
        await beating
    # The same id after a crash: the old row is dead, the restarted worker takes it over.
    await pool.execute(
        "UPDATE campaign.workers SET heartbeat_at = now() - interval '1 minute', "
        "started_at = now() - interval '1 minute'"
    )
    await member(pool, "dup", limiters(), dead_after_s=0.5).join(asyncio.Event())
    started = await pool.fetchval("SELECT started_at FROM campaign.workers WHERE worker_id = 'dup'")
    assert await pool.fetchval("SELECT now() - $1::timestamptz < interval '5 s'", started)


async def test_a_lost_row_is_registered_again(pool: asyncpg.Pool) -> None:
    fleet = member(pool, "w1", limiters())
    await fleet.join(asyncio.Event())
    await pool.execute("DELETE FROM campaign.workers")
    with capture_logs() as logs:
        await fleet.heartbeat()
    assert [e["event"] for e in logs if e["event"] == "fleet_reregistered"]
    assert await pool.fetchval("SELECT count(*) FROM campaign.workers WHERE worker_id = 'w1'") == 1


async def test_join_returns_early_when_stopped(pool: asyncpg.Pool) -> None:
    await member(pool, "first", limiters()).join(asyncio.Event())
    await pool.execute(BACKDATE_START)
    stop = asyncio.Event()
    stop.set()
    slow = member(pool, "second", limiters(), heartbeat_interval_s=60.0)
    await asyncio.wait_for(slow.join(stop), timeout=10.0)


async def test_the_aimd_factor_is_the_fleets(pool: asyncpg.Pool) -> None:
    clock_a, clock_b = Clock(), Clock()
    lims_a, lims_b = limiters(clock=clock_a), limiters(clock=clock_b)
    a, b = member(pool, "a", lims_a), member(pool, "b", lims_b)
    await a.join(asyncio.Event())
    await b.join(asyncio.Event())
    # a sees repeated 7020: its factor halves, and the fleet's with its next heartbeat.
    lims_a["default"].record_rate_limited()
    lims_a["default"].record_rate_limited()
    await a.heartbeat()
    factor = "SELECT factor FROM campaign.service_rates WHERE service = 'default'"
    assert await pool.fetchval(factor) == 0.5
    await b.heartbeat()
    assert lims_b["default"].factor == 0.5
    assert lims_b["default"].effective_rate_per_s == pytest.approx(750.0)

    # b's requests succeed for an interval: it proposes one step up and the fleet takes it,
    # as long as the shared factor has not moved within the interval.
    clock_b.now += 5
    lims_b["default"].record_success()
    assert lims_b["default"].factor == pytest.approx(0.55)
    await b.heartbeat()
    assert await pool.fetchval(factor) == 0.5, "moved less than an interval ago"
    assert lims_b["default"].factor == 0.5, "b follows the fleet"
    await pool.execute("UPDATE campaign.service_rates SET updated_at = now() - interval '6 s'")
    clock_b.now += 5
    lims_b["default"].record_success()
    await b.heartbeat()
    assert await pool.fetchval(factor) == pytest.approx(0.55)
    await a.heartbeat()
    assert lims_a["default"].factor == pytest.approx(0.55)

    # A fresh worker (factor 1.0) climbs no faster than the elapsed intervals allow.
    fresh = limiters()
    c = member(pool, "c", fresh)
    await c.join(asyncio.Event())
    assert fresh["default"].factor == pytest.approx(0.55)
    await pool.execute("UPDATE campaign.service_rates SET updated_at = now() - interval '21 s'")
    newer = limiters()
    await member(pool, "d", newer).join(asyncio.Event())
    assert newer["default"].factor == pytest.approx(0.75)  # four steps of 0.05


# ---- prune -------------------------------------------------------------------------------


async def _campaign(conn: asyncpg.Connection, status: str, recipients: int, age: str) -> int:
    cid = await create_campaign(conn, name="p", body="x")
    await add_recipients(conn, cid, numbers(recipients, start=1), status="delivered")
    await conn.execute(
        "INSERT INTO campaign.batches (campaign_id, service, worker_id, status, lease_until, "
        "finished_at) SELECT $1, 'default', 'w', 'done', now(), now() FROM generate_series(1, 3)",
        cid,
    )
    # The touch trigger would reset updated_at; a replica session skips it.
    await conn.execute("SET session_replication_role = replica")
    await conn.execute(
        "UPDATE campaign.campaigns SET status = $2, "
        "completed_at = CASE WHEN $2 = 'completed' THEN now() - $3::text::interval END, "
        "updated_at = now() - $3::text::interval WHERE id = $1",
        cid,
        status,
        age,
    )
    await conn.execute("SET session_replication_role = DEFAULT")
    return int(cid)


async def _seed_old_and_new(conn: asyncpg.Connection) -> dict[str, int]:
    ids = {
        "old_completed": await _campaign(conn, "completed", 7, "40 days"),
        "old_cancelled": await _campaign(conn, "cancelled", 3, "40 days"),
        "new_completed": await _campaign(conn, "completed", 2, "1 day"),
        "old_running": await _campaign(conn, "running", 2, "40 days"),
    }
    for state, age, n in (("matched", "40 days", 5), ("orphaned", "40 days", 2)):
        await conn.execute(
            "INSERT INTO campaign.delivery_reports (transid, code, state, received_at, raw) "
            "SELECT $1 || g, '7500', $1, now() - $2::text::interval, '{}' "
            "FROM generate_series(1, $3) g",
            state,
            age,
            n,
        )
    await conn.execute(
        "INSERT INTO campaign.delivery_reports (transid, code, state, received_at, raw) VALUES "
        "('waiting', '7500', 'new', now() - interval '40 days', '{}'), "
        "('young', '7500', 'matched', now(), '{}')"
    )
    await conn.execute(
        "INSERT INTO campaign.batches (campaign_id, service, worker_id, status, lease_until, "
        "created_at, finished_at) SELECT $1, 'default', 'w', s, now(), "
        "now() - interval '100 days', CASE WHEN s = 'claimed' THEN NULL "
        "ELSE now() - interval '100 days' END "
        "FROM unnest(ARRAY['done', 'done', 'retry', 'released', 'claimed']) s",
        ids["old_running"],
    )
    await conn.execute(
        "INSERT INTO campaign.incoming_messages (oa, received_at, raw) "
        "SELECT '4477009' || g, now() - interval '100 days', '{}'::jsonb "
        "FROM generate_series(1, 3) g UNION ALL SELECT '447700900', now(), '{}'::jsonb"
    )
    await conn.execute(
        "INSERT INTO campaign.webhook_rejects (kind, reason, body, received_at) "
        "SELECT 'dr', 'bad', '\\x00'::bytea, now() - interval '40 days' "
        "FROM generate_series(1, 2) UNION ALL SELECT 'mo', 'bad', '\\x00'::bytea, now()"
    )
    await conn.execute(
        "INSERT INTO campaign.workers (worker_id, services, rates_per_s, heartbeat_at) VALUES "
        "('long-dead', '{default}', '{100}', now() - interval '2 days'), "
        "('alive', '{default}', '{100}', now())"
    )
    return ids


RETENTION = config.RetentionSettings(
    campaigns_days=30,
    reports_days=30,
    batches_days=90,
    incoming_days=90,
    rejects_days=30,
    batch_size=2,
)


async def test_prune_deletes_each_table_past_retention_in_chunks(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    ids = await _seed_old_and_new(conn)
    pruner = Pruner(pool=pool, queries=db.load_queries(), settings=RETENTION)
    deleted = await pruner.run()
    assert deleted == {
        "campaigns": 2,
        "recipients": 10,
        "batches": 6 + 4,  # 3 each of the two old campaigns; 4 finished old ones
        "delivery_reports": 7,
        "incoming_messages": 3,
        "webhook_rejects": 2,
        # The seeded rows' events were written just now (prune of old events:
        # tests/integration/test_events.py).
        "events": 0,
        "workers": 1,
    }
    # Chunks of two rows: 10 recipients alone take more than five statements.
    assert pruner.statements > 20
    campaigns = {r["id"] for r in await conn.fetch("SELECT id FROM campaign.campaigns")}
    assert campaigns == {ids["new_completed"], ids["old_running"]}
    assert await conn.fetchval("SELECT count(*) FROM campaign.recipients") == 4
    assert {
        r["transid"] for r in await conn.fetch("SELECT transid FROM campaign.delivery_reports")
    } == {
        "waiting",
        "young",
    }
    open_batches = await conn.fetch(
        "SELECT status FROM campaign.batches WHERE created_at < now() - interval '50 days'"
    )
    assert [r["status"] for r in open_batches] == ["claimed"]
    assert await conn.fetchval("SELECT count(*) FROM campaign.incoming_messages") == 1
    assert await conn.fetchval("SELECT count(*) FROM campaign.webhook_rejects") == 1
    assert [r["worker_id"] for r in await conn.fetch("SELECT worker_id FROM campaign.workers")] == [
        "alive"
    ]
    # A second run finds nothing more.
    again = await Pruner(pool=pool, queries=db.load_queries(), settings=RETENTION).run()
    assert set(again.values()) == {0}


async def test_one_prune_statement_deletes_at_most_its_limit(conn: asyncpg.Connection) -> None:
    await _seed_old_and_new(conn)
    queries = db.load_queries()
    assert await conn.execute(queries["prune_delivery_reports"], 30, 3) == "DELETE 3"
    assert await conn.execute(queries["prune_delivery_reports"], 30, 3) == "DELETE 3"
    assert await conn.execute(queries["prune_delivery_reports"], 30, 3) == "DELETE 1"


async def test_zero_days_keeps_rows_forever(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    await _seed_old_and_new(conn)
    keep_all = config.RetentionSettings(
        campaigns_days=0,
        reports_days=0,
        batches_days=0,
        incoming_days=0,
        rejects_days=0,
        events_days=0,
    )
    deleted = await Pruner(pool=pool, queries=db.load_queries(), settings=keep_all).run()
    assert deleted["workers"] == 1  # long-dead workers go whatever the settings
    assert {k: v for k, v in deleted.items() if k != "workers"} == dict.fromkeys(
        (
            "campaigns",
            "recipients",
            "batches",
            "delivery_reports",
            "incoming_messages",
            "webhook_rejects",
            "events",
        ),
        0,
    )


async def test_campaign_prune_command(
    conn: asyncpg.Connection, dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    await _seed_old_and_new(conn)
    cfg = write_config(tmp_path / "c.toml", retention={"campaigns_days": 30, "batch_size": 1000})
    pruned = await campaign_process.run("prune", config=cfg, dsn=dsn)
    assert pruned.returncode == 0, pruned.log()
    assert "prune_finished" in pruned.event_names()
    assert await conn.fetchval("SELECT count(*) FROM campaign.campaigns") == 2
