"""The event forwarder against a real aiohttp receiver on 127.0.0.1 that fails, times out
and recovers: every event delivered, in id order, signed, none lost; repeats only in
POSTs that failed; an event never overtakes a lower id still being committed; the lease
passes to another forwarder when its holder dies."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from campaign import db
from campaign.config import EventSettings
from campaign.forwarder import SIGNATURE_HEADER, Forwarder, signature
from tests.helpers.pgprivate import pg_bin, private_server
from tests.helpers.proc import Processes, write_config
from tests.helpers.webhooks import seed_campaign

pytestmark = pytest.mark.timeout(240)

SECRET = "forward-secret-5b2c"
# Safety limits of the waits below, never assertions on speed.
WAIT_S = 120.0


@dataclass
class Receiver:
    """The application's endpoint. `script` answers the first requests in turn ("ok",
    "fail" = 500, "slow" = answers after the forwarder's timeout); then every one is ok."""

    script: list[str] = field(default_factory=list)
    # (answer, event ids) for every request, in arrival order.
    requests: list[tuple[str, list[int]]] = field(default_factory=list)
    bad_signatures: int = 0
    url: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get(SIGNATURE_HEADER, ""), expected):
            self.bad_signatures += 1
            return web.Response(status=401)
        ids = [e["id"] for e in orjson.loads(body)]
        answer = self.script.pop(0) if self.script else "ok"
        self.requests.append((answer, ids))
        self.changed.set()
        if answer == "fail":
            return web.Response(status=500)
        if answer == "slow":
            await asyncio.sleep(3.0)
        return web.Response(status=204)

    def acknowledged(self) -> list[int]:
        """The ids of every request answered in time with a 2xx, in order."""
        return [i for answer, ids in self.requests if answer == "ok" for i in ids]

    async def wait_for(self, check: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not check():
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def receiver(script: list[str]) -> AsyncIterator[Receiver]:
    r = Receiver(script=list(script))
    app = web.Application()
    app.router.add_post("/events", r.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    r.url = f"http://127.0.0.1:{port}/events"
    try:
        yield r
    finally:
        await runner.cleanup()


def settings(url: str, **overrides: Any) -> EventSettings:
    values: dict[str, Any] = {
        "forward_url": url,
        "forward_secret": SECRET,
        "forward_batch": 50,
        "forward_timeout_s": 1.0,
        "forward_lease_s": 5.0,
        "forward_backoff_max_s": 0.2,
    }
    return EventSettings(**(values | overrides))


@contextlib.asynccontextmanager
async def running(forwarder: Forwarder) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(forwarder.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=WAIT_S)


async def event_ids(conn: asyncpg.Connection) -> list[int]:
    return [r["id"] for r in await conn.fetch("SELECT id FROM campaign.events ORDER BY id")]


async def finish(conn: asyncpg.Connection, ids: list[int]) -> None:
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'delivered', dr_code = '7500' WHERE id = ANY($1)",
        ids,
    )


async def wait_rounds(forwarder: Forwarder, rounds: int) -> None:
    target = forwarder.rounds + rounds
    async with asyncio.timeout(WAIT_S):
        while forwarder.rounds < target:
            await asyncio.sleep(0.05)


def test_signature_is_the_documented_hmac() -> None:
    body = b'[{"id":1}]'
    digest = hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert signature("k", body) == f"sha256={digest}"


async def test_every_event_in_order_through_failures_timeouts_and_recovery(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    _, rows = await seed_campaign(conn, ["queued"] * 400)
    ids = [r["id"] for r in rows]
    script = ["ok", "fail", "fail", "ok", "slow", "ok", "fail", "slow", "slow", "ok"]
    async with receiver(script) as r:
        forwarder = Forwarder(
            pool=pool, queries=db.load_queries(), settings=settings(r.url), worker_id="w1"
        )
        async with running(forwarder):
            # Events keep being written while the forwarder runs, in statements of
            # different sizes.
            for chunk in (ids[:7], ids[7:150], ids[150:151], ids[151:400]):
                await finish(conn, chunk)
                await asyncio.sleep(0)
            written = await event_ids(conn)
            assert len(written) == 400
            await r.wait_for(lambda: set(r.acknowledged()) >= set(written))

    assert r.bad_signatures == 0
    # Every event acknowledged exactly once, in id order.
    assert r.acknowledged() == written
    # Repeats only of what a failed or timed-out request carried.
    failed = {i for answer, batch in r.requests if answer != "ok" for i in batch}
    sent = [i for _, batch in r.requests for i in batch]
    repeated = {i for i in sent if sent.count(i) > 1}
    assert repeated <= failed
    assert {answer for answer, _ in r.requests} == {"ok", "fail", "slow"}
    assert forwarder.failures >= 6
    position = await conn.fetchval("SELECT position FROM campaign.event_forwarder")
    assert position == written[-1]


async def test_an_event_never_overtakes_a_lower_id_still_uncommitted(
    pool: asyncpg.Pool, conn: asyncpg.Connection, dsn: str
) -> None:
    _, rows = await seed_campaign(conn, ["queued", "queued"])
    slow = await db.connect(dsn)
    try:
        tx = slow.transaction()
        await tx.start()
        # Takes the lower event id and does not commit yet.
        await finish(slow, [rows[0]["id"]])
        await finish(conn, [rows[1]["id"]])
        async with receiver([]) as r:
            forwarder = Forwarder(
                pool=pool, queries=db.load_queries(), settings=settings(r.url), worker_id="w1"
            )
            async with running(forwarder):
                await wait_rounds(forwarder, 15)
                # The committed higher id waits for the lower one.
                assert r.requests == []
                await tx.commit()
                await r.wait_for(lambda: len(r.acknowledged()) == 2)
        lower, higher = sorted(
            await conn.fetch("SELECT id, recipient_id FROM campaign.events"),
            key=lambda e: e["id"],
        )
        assert (lower["recipient_id"], higher["recipient_id"]) == (rows[0]["id"], rows[1]["id"])
        assert r.acknowledged() == [lower["id"], higher["id"]]
    finally:
        await slow.close()


async def test_a_rolled_back_id_does_not_stop_the_forwarder(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    _, rows = await seed_campaign(conn, ["queued"] * 3)
    await finish(conn, [rows[0]["id"]])
    tx = conn.transaction()
    await tx.start()
    await finish(conn, [rows[1]["id"]])
    await tx.rollback()
    await finish(conn, [rows[2]["id"]])
    written = await event_ids(conn)
    async with receiver([]) as r:
        forwarder = Forwarder(
            pool=pool, queries=db.load_queries(), settings=settings(r.url), worker_id="w1"
        )
        async with running(forwarder):
            await r.wait_for(lambda: r.acknowledged() == written)
    assert len(written) == 2


async def test_the_lease_passes_on_when_its_holder_dies(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    _, rows = await seed_campaign(conn, ["queued"] * 20)
    await finish(conn, [r["id"] for r in rows])
    written = await event_ids(conn)
    # A worker that died holding the lease: it runs out in two seconds.
    await conn.execute(
        "UPDATE campaign.event_forwarder "
        "SET holder = 'dead-worker', lease_until = now() + interval '2 seconds'"
    )
    async with receiver([]) as r:
        queries = db.load_queries()
        one = Forwarder(pool=pool, queries=queries, settings=settings(r.url), worker_id="w1")
        two = Forwarder(pool=pool, queries=queries, settings=settings(r.url), worker_id="w2")
        async with running(one), running(two):
            await r.wait_for(lambda: set(r.acknowledged()) >= set(written))
            holder = await conn.fetchval("SELECT holder FROM campaign.event_forwarder")
            assert holder in ("w1", "w2")
            assert [one.holding, two.holding].count(True) == 1
        # Two live forwarders, one lease: nothing sent twice.
        assert r.acknowledged() == written
        # A clean stop hands the lease back.
        assert await conn.fetchval("SELECT holder FROM campaign.event_forwarder") is None


async def test_position_survives_a_restart(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    _, rows = await seed_campaign(conn, ["queued"] * 10)
    ids = [r["id"] for r in rows]
    await finish(conn, ids[:5])
    async with receiver([]) as r:

        async def run_until(check: Callable[[], bool]) -> None:
            forwarder = Forwarder(
                pool=pool, queries=db.load_queries(), settings=settings(r.url), worker_id="w1"
            )
            async with running(forwarder):
                await r.wait_for(check)

        await run_until(lambda: len(r.acknowledged()) == 5)
        await finish(conn, ids[5:])
        await run_until(lambda: len(r.acknowledged()) == 10)
    assert r.acknowledged() == await event_ids(conn)


async def test_the_worker_forwards_and_a_second_takes_over_when_the_first_is_killed(
    conn: asyncpg.Connection, dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    # A recipient still open: the reconciler does not complete the campaign meanwhile.
    campaign_id, _ = await seed_campaign(conn, ["queued"], campaign_status="ready")
    async with receiver([]) as r:
        cfg = write_config(
            tmp_path / "worker.toml",
            events={
                "kinds": ["campaign_status"],
                "forward_url": r.url,
                "forward_secret": SECRET,
                "forward_timeout_s": 1.0,
                "forward_lease_s": 3.0,
            },
        )
        first = await campaign_process.start(
            "worker", "--no-sender", "--worker-id", "first", config=cfg, dsn=dsn
        )
        await first.wait_event("events_forwarder_started")
        second = await campaign_process.start(
            "worker", "--no-sender", "--worker-id", "second", config=cfg, dsn=dsn
        )
        await second.wait_event("worker_started")
        await conn.execute(SET_STATUS, campaign_id, "paused")
        await r.wait_for(lambda: len(r.acknowledged()) == 1)

        await first.kill()
        await conn.execute(SET_STATUS, campaign_id, "running")
        await second.wait_event("events_forwarder_started")
        await r.wait_for(lambda: len(r.acknowledged()) >= 2)
        await second.stop()

    written = await event_ids(conn)
    kinds = {e["kind"] for e in await conn.fetch("SELECT kind FROM campaign.events")}
    # [events] kinds reached the triggers: only campaign status changes were written.
    assert kinds == {"campaign_status"} and len(written) == 2
    assert sorted(set(r.acknowledged())) == written
    assert r.bad_signatures == 0


SET_STATUS = "UPDATE campaign.campaigns SET status = $2 WHERE id = $1"


@pytest.mark.slow
@pytest.mark.skipif(pg_bin() is None, reason="needs PostgreSQL server binaries")
async def test_the_forwarder_lives_through_a_database_restart() -> None:
    async with private_server() as server, receiver([]) as r:
        conn = await db.connect(server.dsn)
        try:
            await db.migrate(conn)
            _, rows = await seed_campaign(conn, ["queued"] * 20)
            ids = [row["id"] for row in rows]
            await finish(conn, ids[:10])
        finally:
            await conn.close()
        pool = await db.create_pool(server.dsn, min_size=1, max_size=2)
        try:
            forwarder = Forwarder(
                pool=pool, queries=db.load_queries(), settings=settings(r.url), worker_id="w1"
            )
            async with running(forwarder):
                await r.wait_for(lambda: len(r.acknowledged()) == 10)
                await server.restart(mode="immediate")
                conn = await db.connect(server.dsn)
                try:
                    await finish(conn, ids[10:])
                    written = await event_ids(conn)
                finally:
                    await conn.close()
                await r.wait_for(lambda: set(r.acknowledged()) >= set(written))
        finally:
            await pool.close()
    # At least once, in order; a repeat only of what was in flight at the restart.
    assert list(dict.fromkeys(r.acknowledged())) == written
