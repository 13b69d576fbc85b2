"""Replies know their campaign: incoming messages posted over HTTP to the real receiver are
linked to the latest recipient sent to the same number within [optout] reply_window_h; a
STOP records its campaign, writes reply and opt_out events, and `campaign status` counts
opt-outs per campaign."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import orjson
import pytest

from campaign import db
from campaign.commands import status
from tests.helpers.seed import create_campaign
from tests.helpers.webhooks import TOKEN, mo, running_server

pytestmark = pytest.mark.timeout(180)

NUMBER = "+447911123456"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def sent_to(
    conn: asyncpg.Connection, campaign_id: int, msisdn_e164: str, hours_ago: float
) -> int:
    return int(
        await conn.fetchval(
            "INSERT INTO campaign.recipients "
            "(campaign_id, msisdn, msisdn_e164, status, transid, sent_at) "
            "VALUES ($1, $2, $2, 'delivered', 'T' || $1::bigint || $2::text, "
            "now() - make_interval(secs => $3::float8 * 3600)) RETURNING id",
            campaign_id,
            msisdn_e164,
            hours_ago,
        )
    )


async def post_mo(http: aiohttp.ClientSession, url: str, *items: dict[str, object]) -> None:
    async with http.post(
        url, data=orjson.dumps(list(items)), headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 200, await response.text()


async def test_two_campaigns_to_one_number_the_latest_within_the_window_wins(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    older = await create_campaign(conn, name="older", status="completed")
    newer = await create_campaign(conn, name="newer", status="completed")
    stale = await create_campaign(conn, name="stale", status="completed")
    await sent_to(conn, older, NUMBER, hours_ago=5)
    latest = await sent_to(conn, newer, NUMBER, hours_ago=1)
    # Sent to another number more recently, and to this one outside the window.
    await sent_to(conn, older, "+447911000000", hours_ago=0.1)
    await sent_to(conn, stale, "+33612345678", hours_ago=100)

    async with running_server(pool) as server:
        url = f"{server.url}/webhooks/mo/{TOKEN}"
        await post_mo(http, url, mo("447911123456", "Who is this?", tid="m1"))
        await post_mo(http, url, mo("447911123456", "STOP", tid="m2"))
        # The same STOP again changes nothing and writes no event.
        await post_mo(http, url, mo("447911123456", "STOP", tid="m2"))
        await post_mo(http, url, mo("33612345678", "STOP", tid="m3"))

    rows = await conn.fetch(
        "SELECT tid, action, recipient_id, campaign_id FROM campaign.incoming_messages ORDER BY tid"
    )
    assert [tuple(r) for r in rows] == [
        ("m1", None, latest, newer),
        ("m2", "opt_out", latest, newer),
        ("m3", "opt_out", None, None),
    ]
    events = await conn.fetch(
        "SELECT kind, campaign_id, recipient_id, msisdn, data FROM campaign.events "
        "WHERE kind IN ('reply', 'opt_out') ORDER BY id"
    )
    assert [(e["kind"], e["campaign_id"], e["recipient_id"]) for e in events] == [
        ("reply", newer, latest),
        ("reply", newer, latest),
        ("opt_out", newer, latest),
        ("reply", None, None),
        ("opt_out", None, None),
    ]
    assert events[0]["msisdn"] == NUMBER
    assert events[0]["data"]["message"] == "Who is this?"

    queries = db.require(db.load_queries(), status.QUERIES)
    (shown,) = await status.collect(conn, queries, newer)
    assert (shown.replies, shown.opt_outs, shown.opt_out_rate) == (2, 1, 1.0)
    assert "opt-outs 1 (100.00% of accepted)" in status.render([shown])
    (other,) = await status.collect(conn, queries, older)
    assert (other.replies, other.opt_outs) == (0, 0)


async def test_a_stop_replaces_a_suppression_learnt_from_a_report(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    await conn.execute(
        "INSERT INTO campaign.suppressions (msisdn, reason, expires_at) VALUES "
        "($1, 'dr:7203', now() + interval '90 days'), ('+447700900123', 'manual', NULL)",
        NUMBER,
    )
    async with running_server(pool) as server:
        url = f"{server.url}/webhooks/mo/{TOKEN}"
        await post_mo(http, url, mo("447911123456", "STOP", tid="m1"))
        await post_mo(http, url, mo("447700900123", "STOP", tid="m2"))
    rows = await conn.fetch(
        "SELECT msisdn, reason, expires_at FROM campaign.suppressions ORDER BY 1"
    )
    assert [tuple(r) for r in rows] == [
        ("+447700900123", "manual", None),
        (NUMBER, "opt_out", None),
    ]
