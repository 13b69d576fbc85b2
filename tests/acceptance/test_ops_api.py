"""The ops server in this process against a real PostgreSQL: the dashboard's JSON API
(docs/dashboard.md), its token, the probes, and the metrics' hygiene."""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from campaign import codes, config, db, metrics, ops, statuses
from campaign.worker import Roles, Worker
from tests.helpers.fake_api import FakeApi
from tests.helpers.proc import SERVICE_KEY
from tests.helpers.seed import add_recipients, create_campaign, numbers
from tests.helpers.sending import drain, make_settings
from tests.helpers.webhooks import TOKEN, dr, mo, running_server

pytestmark = pytest.mark.timeout(120)

OPS_TOKEN = "ops-token-0123456789"


class Clock:
    """A clock that moves one second per reading, and jumps when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@asynccontextmanager
async def ops_server(
    pool: asyncpg.Pool | None,
    *,
    token: str = "",
    liveness: ops.Probe | None = None,
    roles: ops.Probe | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[ops.OpsServer]:
    settings = config.OpsSettings(listen="127.0.0.1:0", token=token, refresh_s=2.0)
    server = ops.OpsServer(
        settings=settings,
        **({"liveness": liveness} if liveness else {}),
        **({"roles_started": roles} if roles else {}),
        # A fixed clock by default: every read is fresh (it took no time).
        clock=clock or (lambda: 0.0),
    )
    await server.start()
    server.attach(pool)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def get_json(http: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with http.get(url, **kw) as resp:
        return resp.status, orjson.loads(await resp.read())


async def seed(conn: asyncpg.Connection) -> int:
    """A running campaign: 10 delivered (reports 5 s after acceptance), 3 failed 7203,
    2 rejected by the worker, 1 invalid, 4 pending."""
    cid = await create_campaign(conn, name="Diwali <offer> & more", status="running")
    await conn.execute(
        "UPDATE campaign.campaigns SET started_at = now() - interval '90 seconds' WHERE id = $1",
        cid,
    )
    groups = [("delivered", 10), ("failed", 3), ("rejected", 2), ("invalid", 1), ("pending", 4)]
    start = 0
    for status, n in groups:
        ids = await add_recipients(conn, cid, numbers(n, start=start), status=status)
        start += n
        if status in ("delivered", "failed"):
            code = "7500" if status == "delivered" else "7203"
            await conn.execute(
                """
                UPDATE campaign.recipients
                   SET sent_at = now() - interval '30 seconds',
                       dr_at = now() - interval '25 seconds', dr_code = $2
                 WHERE id = ANY($1::bigint[])
                """,
                ids,
                code,
            )
        if status == "rejected":
            await conn.execute(
                "UPDATE campaign.recipients SET error_code = '7004' WHERE id = ANY($1::bigint[])",
                ids,
            )
        if status == "invalid":
            await conn.execute(
                "UPDATE campaign.recipients SET error_code = 'invalid_msisdn' "
                "WHERE id = ANY($1::bigint[])",
                ids,
            )
    return cid


async def test_api_campaigns_lists_counts_progress_and_rate(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    cid = await seed(conn)
    other = await create_campaign(conn, name="empty", status="draft")
    async with ops_server(pool) as server:
        status, body = await get_json(http, f"{server.url}/api/campaigns")
    assert status == 200
    assert body["statuses"] == list(statuses.RECIPIENT_STATUSES)
    assert body["final_statuses"] == list(statuses.FINAL)
    assert body["refresh_s"] == 2.0
    dt.datetime.fromisoformat(body["generated_at"])
    assert [c["id"] for c in body["campaigns"]] == [other, cid]
    c = body["campaigns"][1]
    assert c["name"] == "Diwali <offer> & more"
    assert c["status"] == "running" and c["service"] == "default"
    assert c["total"] == 20 and c["final"] == 16 and c["progress"] == 0.8
    assert list(c["counts"]) == list(statuses.RECIPIENT_STATUSES)
    assert c["counts"]["delivered"] == 10 and c["counts"]["pending"] == 4
    # 13 accepted in the last minute: 13 / 60 per second, and 4 unsent at that rate.
    assert c["sent_per_s"] == round(13 / 60, 2)
    assert c["eta_s"] == round(4 / c["sent_per_s"], 1)
    assert c["paused_reason"] is None
    empty = body["campaigns"][0]
    assert empty["total"] == 0 and empty["progress"] == 0.0 and empty["eta_s"] is None


async def test_api_campaign_detail(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    cid = await seed(conn)
    async with ops_server(pool) as server:
        status, d = await get_json(http, f"{server.url}/api/campaigns/{cid}")
        missing, body = await get_json(http, f"{server.url}/api/campaigns/999999")
        garbage, _ = await get_json(http, f"{server.url}/api/campaigns/x1")
    assert status == 200
    assert (missing, body, garbage) == (404, {"error": "not_found"}, 404)
    assert d["id"] == cid and d["total"] == 20
    assert [f["status"] for f in d["funnel"]] == list(statuses.RECIPIENT_STATUSES)
    assert {f["status"]: f["count"] for f in d["funnel"] if f["count"]} == {
        "delivered": 10,
        "failed": 3,
        "rejected": 2,
        "invalid": 1,
        "pending": 4,
    }
    series = d["series"]
    assert series["bucket_s"] >= 1 and series["points"]
    assert sum(p["sends_per_s"] for p in series["points"]) * series["bucket_s"] == 13
    assert all(p["t_s"] == i * series["bucket_s"] for i, p in enumerate(series["points"]))
    # Every delivered and failed recipient: 5 s from acceptance to its report.
    assert d["report_delay_s"] == {"reports": 13, "p50": 5.0, "p90": 5.0, "p95": 5.0, "p99": 5.0}
    assert d["failures"] == [
        {"status": "failed", "code": "7203", "meaning": codes.meaning("7203"), "count": 3},
        {"status": "rejected", "code": "7004", "meaning": codes.meaning("7004"), "count": 2},
        {
            "status": "invalid",
            "code": "invalid_msisdn",
            "meaning": codes.meaning("invalid_msisdn"),
            "count": 1,
        },
    ]
    assert d["guard_rails"] == {
        "paused_reason": None,
        "waiting_for_window": 0,
        "next_window_opening": None,
    }


async def test_api_campaign_detail_shows_the_guard_rails(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    cid = await seed(conn)
    # Two of the pending recipients wait for their sending window; the worker paused it.
    opening = await conn.fetchval(
        """
        WITH w AS (
            UPDATE campaign.recipients
               SET error_code = 'outside_window',
                   next_attempt_at = date_trunc('second', now()) + interval '2 hours'
                                     + (id % 2) * interval '1 hour'
             WHERE id IN (SELECT id FROM campaign.recipients
                           WHERE campaign_id = $1 AND status = 'pending' ORDER BY id LIMIT 2)
            RETURNING next_attempt_at)
        SELECT min(next_attempt_at) FROM w
        """,
        cid,
    )
    await conn.execute(
        "UPDATE campaign.campaigns SET status = 'paused', paused_reason = 'brake: 9 of 10' "
        "WHERE id = $1",
        cid,
    )
    async with ops_server(pool) as server:
        status, d = await get_json(http, f"{server.url}/api/campaigns/{cid}")
    assert status == 200
    assert d["guard_rails"] == {
        "paused_reason": "brake: 9 of 10",
        "waiting_for_window": 2,
        "next_window_opening": opening.isoformat(),
    }


async def test_final_reports_count_in_the_reports_series(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    cid = await create_campaign(conn, status="running")
    await conn.execute(
        "UPDATE campaign.campaigns SET started_at = now() - interval '10 seconds' WHERE id = $1",
        cid,
    )
    (rid,) = await add_recipients(conn, cid, numbers(1), status="delivered")
    report_id = await conn.fetchval(
        "INSERT INTO campaign.delivery_reports (transid, code, raw, state, recipient_id) "
        "VALUES ('t1', '7500', '{}', 'matched', $1) RETURNING id",
        rid,
    )
    await conn.execute(
        "UPDATE campaign.recipients SET dr_report_id = $2, sent_at = now() WHERE id = $1",
        rid,
        report_id,
    )
    async with ops_server(pool) as server:
        _, d = await get_json(http, f"{server.url}/api/campaigns/{cid}")
    points = d["series"]["points"]
    assert sum(p["reports_per_s"] for p in points) * d["series"]["bucket_s"] == 1


async def test_the_token_guards_the_page_and_the_api_but_not_the_probes(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    cid = await seed(conn)
    async with ops_server(pool, token=OPS_TOKEN) as server:
        url = server.url
        status, body = await get_json(http, f"{url}/api/campaigns")
        assert (status, body) == (401, {"error": "unauthorized"})
        wrong = {"Authorization": "Bearer " + OPS_TOKEN[:-1] + "x"}
        assert (await get_json(http, f"{url}/api/campaigns/{cid}", headers=wrong))[0] == 401
        bearer = {"Authorization": f"Bearer {OPS_TOKEN}"}
        status, body = await get_json(http, f"{url}/api/campaigns", headers=bearer)
        assert status == 200 and body["campaigns"][0]["id"] == cid
        async with http.get(f"{url}/", allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "/login"
        for path in ("/metrics", "/healthz", "/readyz", "/login"):
            async with http.get(url + path) as resp:
                assert resp.status == 200, path

        # The login form: a wrong token is sent back, the right one sets a cookie that is
        # not the token itself, and the page and the API open with it.
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(cookie_jar=jar) as browser:
            async with browser.post(
                f"{url}/login", data={"token": "nope"}, allow_redirects=False
            ) as resp:
                assert resp.status == 303 and resp.headers["Location"] == "/login?failed=1"
            assert len(jar) == 0
            async with browser.post(
                f"{url}/login", data={"token": OPS_TOKEN}, allow_redirects=False
            ) as resp:
                assert resp.status == 303 and resp.headers["Location"] == "/"
            (cookie,) = list(jar)
            assert cookie.key == ops.COOKIE and OPS_TOKEN not in cookie.value
            assert cookie["httponly"] and cookie["samesite"] == "Strict"
            async with browser.get(f"{url}/") as resp:
                assert resp.status == 200 and "<title>campaign" in await resp.text()
            assert (await get_json(browser, f"{url}/api/campaigns/{cid}"))[0] == 200
            assert resp.headers["Cache-Control"] == "no-store"


async def test_the_page_is_served_without_a_token_when_none_is_set(
    pool: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    async with ops_server(pool) as server, http.get(f"{server.url}/") as resp:
        text = await resp.text()
    assert resp.status == 200 and resp.content_type == "text/html"
    assert resp.headers["Content-Security-Policy"] == ops.PAGE_POLICY
    # One static page: nothing loaded from another host.
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in text and "<script src" not in text
    assert re.findall(r'href="([^"]*)"', text) == ["data:,"]


async def test_probes(pool: asyncpg.Pool, http: aiohttp.ClientSession) -> None:
    async def dead() -> ops.Check:
        return ops.Check(False, {"loop_silent_s": 99.0})

    async def starting() -> ops.Check:
        return ops.Check(False, {"roles": ["sender"], "roles_starting": ["sender"]})

    async with ops_server(None, liveness=dead, roles=starting) as server:
        status, body = await get_json(http, f"{server.url}/healthz")
        assert (status, body) == (503, {"status": "unhealthy", "loop_silent_s": 99.0})
        status, body = await get_json(http, f"{server.url}/readyz")
        assert status == 503 and body["status"] == "database_not_connected"
        server.attach(pool)
        status, body = await get_json(http, f"{server.url}/readyz")
        assert status == 503 and body["status"] == "roles_starting"
        assert body["schema_version"] == db.expected_version()
        assert body["roles_starting"] == ["sender"]
    async with ops_server(pool) as server:
        assert (await get_json(http, f"{server.url}/readyz"))[1]["status"] == "ok"
        assert (await get_json(http, f"{server.url}/healthz")) == (200, {"status": "ok"})


async def test_readyz_refuses_another_schema_version(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    await conn.execute(
        "DELETE FROM campaign.schema_migrations WHERE version = "
        "(SELECT max(version) FROM campaign.schema_migrations)"
    )
    async with ops_server(pool) as server:
        status, body = await get_json(http, f"{server.url}/readyz")
    assert status == 503 and body["status"] == "schema_mismatch"
    assert body["schema_version"] == db.expected_version() - 1


async def test_incoming_messages_are_not_counted_as_reports(
    pool: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    def reports() -> float:
        return sum(metrics.REPORTS.labels(r)._value.get() for r in ("stored", "duplicate"))

    def incoming() -> float:
        return sum(metrics.INCOMING.labels(r)._value.get() for r in ("stored", "duplicate"))

    async with running_server(pool) as server:

        async def post_mo() -> None:
            async with http.post(
                f"{server.url}/webhooks/mo/{TOKEN}", data=orjson.dumps(mo("919800000001", "hi"))
            ) as resp:
                assert resp.status == 200

        async def post_dr() -> None:
            async with http.post(
                f"{server.url}/webhooks/dr/{TOKEN}", data=orjson.dumps(dr("ops-api-t1"))
            ) as resp:
                assert resp.status == 200

        reports_before, incoming_before = reports(), incoming()
        await post_mo()
        assert (reports(), incoming()) == (reports_before, incoming_before + 1)
        await post_dr()
        assert (reports(), incoming()) == (reports_before + 1, incoming_before + 1)


async def test_the_rate_is_over_the_time_since_the_start_and_none_once_finished(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    young = await create_campaign(conn, name="young", status="running")
    done = await create_campaign(conn, name="done", status="running")
    for cid, started in ((young, dt.timedelta(seconds=10)), (done, dt.timedelta(seconds=50))):
        await conn.execute(
            "UPDATE campaign.campaigns SET started_at = now() - $2::interval WHERE id = $1",
            cid,
            started,
        )
        ids = await add_recipients(conn, cid, numbers(20, start=cid * 100), status="delivered")
        await conn.execute(
            "UPDATE campaign.recipients SET sent_at = now() WHERE id = ANY($1::bigint[])", ids
        )
    # Completed last: recipients added to a completed campaign reopen it.
    await conn.execute("UPDATE campaign.campaigns SET status = 'completed' WHERE id = $1", done)
    async with ops_server(pool) as server:
        _, body = await get_json(http, f"{server.url}/api/campaigns")
    rates = {c["name"]: c["sent_per_s"] for c in body["campaigns"]}
    # 20 in the 10 s since the start (not spread over a minute); a finished one sends no more.
    assert rates["done"] is None
    assert 20 / 11 <= rates["young"] <= 20 / 10


async def test_the_sender_and_the_producer_count_final_statuses(
    conn: asyncpg.Connection, dsn: str
) -> None:
    def finals() -> dict[str, float]:
        return {
            s: metrics.FINAL_STATUSES.labels(s)._value.get()
            for s in ("rejected", "invalid", "queued")
        }

    def destinations(outcome: str) -> float:
        return float(metrics.DESTINATIONS.labels("default", outcome)._value.get())

    async with FakeApi(key=SERVICE_KEY) as api:
        api.reject_msisdns = {"919800000001": "7004"}
        cid = await create_campaign(conn)
        await add_recipients(conn, cid, [*numbers(3), "12"])
        before, queued_before = finals(), destinations("queued")
        assert await drain(make_settings(api.base_url), dsn) == 0
    after = finals()
    # One rejected by the API, one invalid number; accepted ones are not final.
    assert {s: after[s] - before[s] for s in after} == {"rejected": 1, "invalid": 1, "queued": 0}
    assert destinations("queued") - queued_before == 2


async def test_worker_probes_follow_its_loop_and_roles() -> None:
    settings = make_settings("http://127.0.0.1:9")
    worker = Worker(settings=settings, dsn="unused", roles=Roles(webhooks=False), serve_ops=True)
    assert worker.ops is not None
    assert await worker.liveness() == ops.Check(True, {"phase": "starting"})
    worker._last_turn = time.monotonic()
    assert (await worker.liveness()).ok
    # Silent past three stats intervals and 30 s: the loops no longer turn.
    worker._last_turn = time.monotonic() - (3 * settings.worker.stats_interval_s + 31.0)
    dead = await worker.liveness()
    assert not dead.ok and dead.detail["phase"] == "running"
    ready = await worker.roles_started()
    assert not ready.ok and ready.detail["roles_starting"] == ["reconciler", "sender"]
    worker._role_started("reconciler")
    worker._role_started("sender")
    assert (await worker.roles_started()).ok
    worker.request_stop()
    assert await worker.liveness() == ops.Check(True, {"phase": "stopping"})


async def test_an_answer_is_reused_for_four_times_its_computing_time(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    cid = await create_campaign(conn, status="running")
    await add_recipients(conn, cid, numbers(2))
    clock = Clock()
    async with ops_server(pool, clock=clock) as server:
        url = f"{server.url}/api/campaigns/{cid}"
        # Read at 1001, done at 1002 (one second): fresh until 1002 + 4 x 1 s.
        assert (await get_json(http, url))[1]["total"] == 2
        await add_recipients(conn, cid, numbers(3, start=10))
        # At 1003: the same answer, the database not asked.
        assert (await get_json(http, url))[1]["total"] == 2
        # Another campaign or the list is another answer, read now.
        assert (await get_json(http, f"{server.url}/api/campaigns"))[1]["campaigns"][0][
            "total"
        ] == 5
        clock.now += 10.0
        assert (await get_json(http, url))[1]["total"] == 5
