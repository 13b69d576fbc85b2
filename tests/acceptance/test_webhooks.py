"""The webhook receiver over real HTTP on 127.0.0.1 with a real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import orjson
import pytest
from structlog.testing import capture_logs

from campaign import db, metrics
from tests.helpers.proc import Processes, write_config
from tests.helpers.webhooks import TOKEN, dr, mo, raw_exchange, running_server

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def post(
    http: aiohttp.ClientSession, url: str, payload: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    headers = {"Content-Type": "application/json"} | (headers or {})
    async with http.post(url, data=data, headers=headers) as response:
        text = await response.read()
        try:
            return response.status, orjson.loads(text)
        except orjson.JSONDecodeError:
            return response.status, text.decode()


async def test_healthz_and_metrics(pool: asyncpg.Pool, http: aiohttp.ClientSession) -> None:
    async with running_server(pool) as server:
        async with http.get(f"{server.url}/healthz") as response:
            assert response.status == 200
            health = await response.json()
        stored_before = metrics.REPORTS.labels("stored")._value.get()
        async with http.post(
            f"{server.url}/webhooks/dr/{TOKEN}", data=orjson.dumps(dr("metrics-t1"))
        ) as response:
            assert response.status == 200
        async with http.get(f"{server.url}/metrics") as response:
            assert response.status == 200
            assert "text/plain" in response.headers["Content-Type"]
            text = await response.text()
    assert "# TYPE campaign_reports_total counter" in text
    assert "campaign_request_duration_seconds" in text
    stored_line = next(
        line
        for line in text.splitlines()
        if line.startswith('campaign_reports_total{result="stored"}')
    )
    assert float(stored_line.split()[-1]) == stored_before + 1
    assert health == {
        "status": "ok",
        "schema_version": db.expected_version(),
        "expected_schema_version": db.expected_version(),
    }


async def test_wrong_or_missing_token_is_404_and_never_logged(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    wrong = "guess-" + TOKEN[::-1]
    with capture_logs() as logs:
        async with running_server(pool) as server:
            statuses = [
                (await post(http, f"{server.url}/webhooks/dr/{wrong}", dr("t")))[0],
                (await post(http, f"{server.url}/webhooks/mo/{wrong}", mo("1", "STOP")))[0],
                (await post(http, f"{server.url}/webhooks/dr/", dr("t")))[0],
                (await post(http, f"{server.url}/webhooks/dr", dr("t")))[0],
                (await post(http, f"{server.url}/webhooks/dr/{TOKEN[:-1]}", dr("t")))[0],
            ]
            assert server.stats.unauthorized == 5
    assert statuses == [404] * 5
    unauthorized = [e for e in logs if e["event"] == "webhook_unauthorized"]
    assert len(unauthorized) == 5
    assert {e["kind"] for e in unauthorized} == {"dr", "mo"}
    text = repr(logs)
    assert wrong not in text and TOKEN[:-1] not in text
    assert await conn.fetchval("SELECT count(*) FROM campaign.delivery_reports") == 0


async def test_body_over_max_body_bytes_is_413(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    async with running_server(pool, max_body_bytes=2000) as server:
        url = f"{server.url}/webhooks/dr/{TOKEN}"
        big = [dr(f"t{i}") for i in range(20)]
        assert len(orjson.dumps(big)) > 2000
        status, _ = await post(http, url, big)
        assert status == 413

        async def chunked() -> AsyncIterator[bytes]:
            # No Content-Length: the limit holds for a streamed body too.
            body = orjson.dumps(big)
            for start in range(0, len(body), 500):
                yield body[start : start + 500]

        async with http.post(url, data=chunked()) as response:
            assert response.status == 413
        status, _ = await post(http, url, dr("small"))
        assert status == 200
    assert await conn.fetchval("SELECT count(*) FROM campaign.delivery_reports") == 1
    assert await conn.fetchval("SELECT count(*) FROM campaign.webhook_rejects") == 0


@pytest.mark.parametrize("kind", ["dr", "mo"])
@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"deliveryInfoNotification": ', "not valid JSON"),
        (b"\xff\xfe garbage", "not valid JSON"),
        (b'["a"]', "expected a JSON object"),
    ],
)
async def test_unparseable_body_is_kept_verbatim_and_answered_400(
    pool: asyncpg.Pool,
    conn: asyncpg.Connection,
    http: aiohttp.ClientSession,
    kind: str,
    payload: bytes,
    reason: str,
) -> None:
    async with running_server(pool) as server:
        status, answer = await post(http, f"{server.url}/webhooks/{kind}/{TOKEN}", payload)
    assert status == 400
    assert reason in answer["reason"]
    row = await conn.fetchrow("SELECT * FROM campaign.webhook_rejects")
    assert (row["kind"], bytes(row["body"]), row["remote"]) == (kind, payload, "127.0.0.1")
    assert reason in row["reason"]
    assert row["content_type"] == "application/json"


async def test_report_without_code_is_rejected_whole_array(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    payload = orjson.dumps([dr("good"), dr("bad", code="")])
    async with running_server(pool) as server:
        status, answer = await post(http, f"{server.url}/webhooks/dr/{TOKEN}", payload)
    assert status == 400
    assert answer["reason"] == "item 1: deliveryInfo.code: missing"
    assert await conn.fetchval("SELECT count(*) FROM campaign.delivery_reports") == 0
    assert bytes(await conn.fetchval("SELECT body FROM campaign.webhook_rejects")) == payload


async def test_reports_are_stored_once_however_often_they_arrive(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    async with running_server(pool) as server:
        url = f"{server.url}/webhooks/dr/{TOKEN}"
        answers = [
            await post(http, url, dr("t1", "7501")),
            await post(http, url, dr("t1", "7501")),
            await post(http, url, [dr("t1", "7501"), dr("t1", "7500"), dr("t2", "7208")]),
            await post(http, url, []),
        ]
    assert [status for status, _ in answers] == [200, 200, 200, 200]
    assert answers[2][1] == {"status": "ok", "reports": 3}
    rows = await conn.fetch(
        "SELECT transid, code, state, raw FROM campaign.delivery_reports ORDER BY transid, code"
    )
    assert [(r["transid"], r["code"], r["state"]) for r in rows] == [
        ("t1", "7500", "new"),
        ("t1", "7501", "new"),
        ("t2", "7208", "new"),
    ]
    assert rows[0]["raw"] == dr("t1", "7500")


async def test_database_down_answers_503_then_recovers(
    pool: asyncpg.Pool, dsn: str, pg_server_dsn: str, http: aiohttp.ClientSession
) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        async with running_server(pool, store_timeout_s=3.0) as server:
            dr_url, mo_url = (
                f"{server.url}/webhooks/dr/{TOKEN}",
                f"{server.url}/webhooks/mo/{TOKEN}",
            )
            assert (await post(http, dr_url, dr("before")))[0] == 200

            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                name,
            )
            with capture_logs() as logs:
                during = [
                    (await post(http, dr_url, dr("during")))[0],
                    (await post(http, dr_url, dr("during")))[0],
                    (await post(http, mo_url, mo("447911123456", "STOP", tid="m1")))[0],
                    (await post(http, dr_url, b"not json"))[0],
                ]
                async with http.get(f"{server.url}/healthz") as response:
                    health = response.status
            assert during == [503, 503, 503, 503]
            assert health == 503
            failed = [e for e in logs if e["event"] == "webhook_store_failed"]
            assert len(failed) == 1

            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            # The platform retries; the pool reconnects on its own.
            after = 503
            async with asyncio.timeout(30):
                while after != 200:
                    after = (await post(http, dr_url, dr("during")))[0]
                    if after != 200:
                        await asyncio.sleep(0.1)
            assert (await post(http, mo_url, mo("447911123456", "STOP", tid="m1")))[0] == 200
            async with http.get(f"{server.url}/healthz") as response:
                assert response.status == 200
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    check = await asyncpg.connect(dsn)
    try:
        transids = await check.fetch(
            "SELECT transid FROM campaign.delivery_reports ORDER BY transid"
        )
        assert [r["transid"] for r in transids] == ["before", "during"]
        assert await check.fetchval("SELECT count(*) FROM campaign.suppressions") == 1
        # The unparseable body got a 503, not a 400: it was not kept, so it must come again.
        assert await check.fetchval("SELECT count(*) FROM campaign.webhook_rejects") == 0
    finally:
        await check.close()


async def test_stop_and_start_over_http(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    async def suppressed() -> list[tuple[str, str]]:
        rows = await conn.fetch("SELECT msisdn, reason FROM campaign.suppressions ORDER BY 1")
        return [(r["msisdn"], r["reason"]) for r in rows]

    await conn.execute(
        "INSERT INTO campaign.suppressions (msisdn, reason) VALUES ('+447700900123', 'manual')"
    )
    async with running_server(pool) as server:
        url = f"{server.url}/webhooks/mo/{TOKEN}"
        assert (await post(http, url, mo("447911123456", "Stop please", tid="m1")))[0] == 200
        assert await suppressed() == [("+447700900123", "manual"), ("+447911123456", "opt_out")]
        # The same MO again (same tid) is stored once.
        assert (await post(http, url, mo("447911123456", "Stop please", tid="m1")))[0] == 200
        assert (await post(http, url, mo("447911123456", "hello there", tid="m2")))[0] == 200

        assert (await post(http, url, mo("+447911123456", "start", tid="m3")))[0] == 200
        assert await suppressed() == [("+447700900123", "manual")]
        # START lifts only what a STOP added, never an operator's suppression.
        assert (await post(http, url, mo("447700900123", "UNSTOP", tid="m4")))[0] == 200
        assert await suppressed() == [("+447700900123", "manual")]

        # STOP then START in one array: processed in order.
        both = [mo("33612345678", "QUIT", tid="m5"), mo("33612345678", "START", tid="m6")]
        assert (await post(http, url, both))[0] == 200
        assert await suppressed() == [("+447700900123", "manual")]
        # A short code cannot be suppressed: the message is stored, no action recorded.
        assert (await post(http, url, mo("56767", "STOP", tid="m7")))[0] == 200

    rows = await conn.fetch(
        "SELECT tid, oa, action, raw FROM campaign.incoming_messages ORDER BY tid"
    )
    assert [(r["tid"], r["action"]) for r in rows] == [
        ("m1", "opt_out"),
        ("m2", None),
        ("m3", "opt_in"),
        ("m4", "opt_in"),
        ("m5", "opt_out"),
        ("m6", "opt_in"),
        ("m7", None),
    ]
    assert rows[0]["oa"] == "447911123456"
    assert rows[0]["raw"] == mo("447911123456", "Stop please", tid="m1")


async def test_signature_and_source_network_when_configured(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    secret = "hmac-secret-for-test"
    payload = orjson.dumps(dr("signed"))
    signature = "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()
    async with running_server(pool, hmac_secret=secret) as server:
        url = f"{server.url}/webhooks/dr/{TOKEN}"
        assert (await post(http, url, payload))[0] == 403
        bad = {"X-Hub-Signature": "sha256=" + "0" * 64}
        assert (await post(http, url, payload, headers=bad))[0] == 403
        assert (await post(http, url, payload, headers={"X-Hub-Signature": signature}))[0] == 200
    async with running_server(pool, allow_networks=("10.0.0.0/8",)) as server:
        # Refused when the connection is made, before any request is read.
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, f"{server.url}/webhooks/dr/{TOKEN}", dr("other"))
    async with running_server(pool, allow_networks=("127.0.0.0/8",)) as server:
        assert (await post(http, f"{server.url}/webhooks/dr/{TOKEN}", dr("local")))[0] == 200
    transids = await conn.fetch("SELECT transid FROM campaign.delivery_reports ORDER BY 1")
    assert [r["transid"] for r in transids] == ["local", "signed"]


def _chunks(transids: list[str], rng: random.Random) -> list[list[str]]:
    chunks, start = [], 0
    while start < len(transids):
        size = rng.choice([1, 1, 2, 5, 10])
        chunks.append(transids[start : start + size])
        start += size
    return chunks


def _payload(chunk: list[str]) -> bytes:
    items = [dr(t, "7500") for t in chunk]
    return orjson.dumps(items[0] if len(items) == 1 else items)


async def test_fifty_clients_20000_reports_committed_in_groups_each_once(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    rng = random.Random(5)
    transids = [f"C{i:05d}" for i in range(20_000)]
    per_client = [transids[c::50] for c in range(50)]
    statuses: list[int] = []

    async def client(mine: list[str], url: str) -> None:
        for chunk in _chunks(mine, rng):
            async with http.post(url, data=_payload(chunk)) as response:
                statuses.append(response.status)
            if rng.random() < 0.05:
                # The platform sending the same callback again.
                async with http.post(url, data=_payload(chunk)) as response:
                    statuses.append(response.status)

    async with running_server(pool, group_max=200) as server:
        url = f"{server.url}/webhooks/dr/{TOKEN}"
        async with asyncio.timeout(120):
            await asyncio.gather(*(client(mine, url) for mine in per_client))
        stats = server.stats

    assert set(statuses) == {200}
    assert stats.dr_requests == len(statuses)
    # One commit served many requests.
    assert stats.groups_committed < stats.dr_requests / 2
    assert stats.reports_stored == 20_000
    stored = await conn.fetch("SELECT transid FROM campaign.delivery_reports")
    assert sorted(r["transid"] for r in stored) == transids


async def test_killed_mid_run_every_200_was_committed_and_retries_store_once(
    dsn: str,
    conn: asyncpg.Connection,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    campaign_process: Processes,
) -> None:
    config_path = write_config(
        tmp_path / "campaign.toml",
        webhooks={"token": TOKEN, "group_max": 500},
        database={"pool_max": 4},
        reconciler={"interval_s": 0.5},
    )
    rng = random.Random(7)
    transids = [f"K{i:05d}" for i in range(20_000)]
    per_client = [_chunks(transids[c::50], rng) for c in range(50)]
    acked: set[str] = set()
    unacked: list[list[str]] = []
    killed = asyncio.Event()

    first = await campaign_process.start("webhooks", config=config_path, dsn=dsn)
    url = str((await first.wait_event("webhooks_started"))["url"])

    async def client(chunks: list[list[str]]) -> None:
        for chunk in chunks:
            if killed.is_set():
                unacked.append(chunk)
                continue
            try:
                async with http.post(f"{url}/webhooks/dr/{TOKEN}", data=_payload(chunk)) as r:
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            if ok:
                acked.update(chunk)
            else:
                unacked.append(chunk)

    async def killer() -> None:
        while len(acked) < 6000:
            await asyncio.sleep(0.005)
        first.signal(signal.SIGKILL)
        killed.set()

    async with asyncio.timeout(120):
        kill = asyncio.create_task(killer())
        await asyncio.gather(*(client(chunks) for chunks in per_client))
        await kill
        assert await first.wait() == -signal.SIGKILL

    stored = {
        r["transid"] for r in await conn.fetch("SELECT transid FROM campaign.delivery_reports")
    }
    assert unacked, "the kill came after every report was acknowledged"
    # Every 200 meant committed.
    assert acked <= stored
    assert len(acked) >= 6000

    killed.clear()
    second = await campaign_process.start("webhooks", config=config_path, dsn=dsn)
    url = str((await second.wait_event("webhooks_started"))["url"])
    async with asyncio.timeout(120):
        retry = unacked
        unacked = []
        await asyncio.gather(*(client(retry[c::50]) for c in range(50)))
        assert unacked == []
        assert await second.stop() == 0

    rows = await conn.fetch("SELECT transid FROM campaign.delivery_reports")
    assert len(rows) == 20_000
    assert {r["transid"] for r in rows} == set(transids)
    events = first.event_names() + second.event_names()
    assert "webhooks_stopping" in events
    assert TOKEN not in first.log() + second.log()


async def test_unknown_webhook_paths_are_404_and_logged_without_path_or_token_rate_limited(
    pool: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    # What a token holding '/', '?' or '#' made of every report: a path no route matches.
    paths = [f"/webhooks/dr/{TOKEN}/x", f"/webhooks/mo/{TOKEN[:4]}/{TOKEN[4:]}", "/webhooks/x/y"]
    with capture_logs() as logs:
        async with running_server(pool) as server:
            statuses = [(await post(http, server.url + p, dr("t")))[0] for p in paths]
            async with http.get(f"{server.url}/webhooks/dr/{TOKEN}") as response:
                statuses.append(response.status)
            # A scanner: fifty more.
            for n in range(50):
                statuses.append((await post(http, f"{server.url}/webhooks/dr/a/{n}", b"{}"))[0])
    assert statuses == [404] * 54
    found = [e for e in logs if e["event"] == "webhook_not_found"]
    assert [e["kind"] for e in found[:4]] == ["dr", "mo", None, "dr"]
    assert all(e["remote"] == "127.0.0.1" and e["log_level"] == "warning" for e in found)
    # Rate-limited: not one line per request.
    assert 4 <= len(found) < 54
    text = repr(logs)
    assert TOKEN not in text and TOKEN[4:] not in text and "/webhooks/" not in text


async def test_stop_from_a_national_number_uses_the_services_default_region(
    dsn: str,
    conn: asyncpg.Connection,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    campaign_process: Processes,
) -> None:
    # Two services in two regions, told apart by the short code an MO was sent to (`da`);
    # an MO to neither takes no region (international forms only), as before.
    config_path = tmp_path / "campaign.toml"
    config_path.write_text(
        f'[webhooks]\nlisten = "127.0.0.1:0"\ntoken = "{TOKEN}"\n'
        "[database]\npool_min = 1\npool_max = 2\n"
        '[services.uk]\nkey = "k-uk-0123456789"\nsender_id = "56767"\ndefault_region = "GB"\n'
        '[services.us]\nkey = "k-us-0123456789"\nsender_id = "+1 555 0100"\n'
        'default_region = "US"\n'
    )
    receiver = await campaign_process.start("webhooks", config=config_path, dsn=dsn)
    url = str((await receiver.wait_event("webhooks_started"))["url"])
    try:
        mo_url = f"{url}/webhooks/mo/{TOKEN}"
        for body in (
            mo("07911 123456", "STOP", tid="n1", da="56767"),
            mo("(202) 555-0123", "stop", tid="n2", da="15550100"),
            # International forms still work whatever the region.
            mo("447700900123", "STOP", tid="n3", da="56767"),
            # The same national digits sent to an unknown short code: no region to read them in.
            mo("07911 654321", "STOP", tid="n4", da="99999"),
        ):
            assert (await post(http, mo_url, body))[0] == 200
    finally:
        assert await receiver.stop() == 0
    rows = await conn.fetch("SELECT msisdn, reason FROM campaign.suppressions ORDER BY msisdn")
    assert [(r["msisdn"], r["reason"]) for r in rows] == [
        ("+12025550123", "opt_out"),
        ("+447700900123", "opt_out"),
        ("+447911123456", "opt_out"),
    ]
    actions = await conn.fetch("SELECT tid, action FROM campaign.incoming_messages ORDER BY tid")
    assert [(r["tid"], r["action"]) for r in actions] == [
        ("n1", "opt_out"),
        ("n2", "opt_out"),
        ("n3", "opt_out"),
        ("n4", None),
    ]
    assert "optout_ignored" in receiver.event_names()


# Short limits so the tests are quick; each test asserts that the connection was closed,
# with a safety timeout far above the limit, never how fast. The limit not under test is
# far above the safety timeout, so only the one under test can have closed it.
SAFETY_S = 30.0


def _head(length: int) -> bytes:
    return (
        f"POST /webhooks/dr/{TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def test_slow_clients_half_sent_headers_or_body_are_closed(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    body = orjson.dumps(dr("slow-1"))
    with capture_logs() as logs:
        async with running_server(pool, read_timeout_s=1.0, keepalive_s=300.0) as server:
            answers = await asyncio.gather(
                *(
                    raw_exchange(server.url, _head(len(body))[:40], timeout_s=SAFETY_S)
                    for _ in range(5)
                ),
                # A header trickled a byte at a time: every byte arrives in time, the
                # whole request never does.
                raw_exchange(
                    server.url,
                    [_head(len(body))[:-2], *(b"X" for _ in range(10_000))],
                    pause_s=0.05,
                    timeout_s=SAFETY_S,
                ),
                raw_exchange(server.url, _head(len(body)) + body[:10], timeout_s=SAFETY_S),
                # Connected, and nothing sent at all.
                raw_exchange(server.url, b"", timeout_s=SAFETY_S),
            )
    # Closed without an answer: the platform retries a delivery that failed, not a 4xx.
    assert answers == [b""] * 8
    assert await conn.fetchval("SELECT count(*) FROM campaign.delivery_reports") == 0
    timed_out = [e for e in logs if e["event"] == "webhook_read_timed_out"]
    assert {e["phase"] for e in timed_out} == {"headers", "body"}
    assert all(e["remote"] == "127.0.0.1" for e in timed_out)


async def test_an_idle_kept_alive_connection_is_closed(pool: asyncpg.Pool) -> None:
    body = orjson.dumps(dr("idle-1"))
    async with running_server(pool, read_timeout_s=300.0, keepalive_s=1.0) as server:
        answers = await asyncio.gather(
            # Silent after one request; silent after one request and half of the next.
            raw_exchange(server.url, _head(len(body)) + body, timeout_s=SAFETY_S),
            raw_exchange(server.url, _head(len(body)) + body + _head(9)[:30], timeout_s=SAFETY_S),
        )
    assert [a.count(b"HTTP/1.1 200 OK") for a in answers] == [1, 1]


async def test_a_peer_outside_allow_networks_is_closed_before_any_request(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    with capture_logs() as logs:
        async with running_server(pool, allow_networks=("10.0.0.0/8",)) as server:
            # Fifty half-sent requests and one that sends nothing: all closed, none answered.
            half_sent = [
                raw_exchange(server.url, _head(100)[:30], timeout_s=SAFETY_S) for _ in range(50)
            ]
            silent = raw_exchange(server.url, b"", timeout_s=SAFETY_S)
            answers = await asyncio.gather(*half_sent, silent)
            # Health and metrics too: the listener refuses the peer, not a route.
            with pytest.raises(aiohttp.ClientConnectionError):
                await post(http, f"{server.url}/webhooks/dr/{TOKEN}", dr("refused"))
    assert answers == [b""] * 51
    refused = [e for e in logs if e["event"] == "webhook_connection_refused"]
    assert refused and all(e["remote"] == "127.0.0.1" for e in refused)
    # Rate-limited: a scanner cannot write a line per connection.
    assert len(refused) < 52
    assert await conn.fetchval("SELECT count(*) FROM campaign.delivery_reports") == 0


async def test_reports_with_only_a_correlation_id_are_each_stored(
    pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    """Four recipients' 7500s without a transid, two without a timestamp and two sharing
    one, are four reports: a 200 tells the platform all four are safe."""
    at = "2026-01-02T03:04:05.678"
    items = [
        dr(None, "7500", correlation_id=f"r{n}", at=None if n <= 2 else at) for n in range(1, 5)
    ]
    async with running_server(pool) as server:
        url = f"{server.url}/webhooks/dr/{TOKEN}"
        first = await post(http, url, items)
        again = await post(http, url, items)
    assert first == (200, {"status": "ok", "reports": 4})
    assert again[0] == 200
    rows = await conn.fetch(
        "SELECT transid, correlation_id, code FROM campaign.delivery_reports ORDER BY id"
    )
    assert sorted(r["correlation_id"] for r in rows) == ["r1", "r2", "r3", "r4"]
    assert {(r["transid"], r["code"]) for r in rows} == {(None, "7500")}
