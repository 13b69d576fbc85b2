"""Reading the platform precisely: 7005, success items without a correlation id, a
service's own base_url, report timestamps without an offset. The real worker (drain
mode) or receiver against the simulator over real sockets, and a real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import aiohttp
import asyncpg
from structlog.testing import capture_logs

from campaign.simulator import Faults, FaultSpec, SimulatorConfig
from tests.helpers.proc import SERVICE_KEY
from tests.helpers.seed import add_recipients, create_campaign, numbers, statuses
from tests.helpers.sending import drain, make_settings
from tests.helpers.sim import fast_config, post, simulator, sms
from tests.helpers.webhooks import TOKEN, running_server

ALWAYS = FaultSpec(probability=1.0)


def sim_config(**knobs: Any) -> SimulatorConfig:
    return fast_config(keys=(SERVICE_KEY,), **knobs)


async def rows(conn: asyncpg.Connection, campaign_id: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM campaign.recipients WHERE campaign_id = $1 ORDER BY id", campaign_id
    )


async def test_7005_request_expired_expires_its_recipients(conn, dsn) -> None:
    async with simulator(sim_config(faults=Faults(error_7005=ALWAYS))) as sim:
        cid = await create_campaign(conn)
        await add_recipients(conn, cid, numbers(3))
        assert await drain(make_settings(sim.base_url), dsn) == 0
        assert sim.stats()["destinations"]["accepted"] == 0
    assert await statuses(conn, cid) == {"expired": 3}
    assert {(r["error_code"], r["attempts"]) for r in await rows(conn, cid)} == {("7005", 1)}


async def test_one_destination_takes_its_single_item_without_a_correlation_id(conn, dsn) -> None:
    async with simulator(sim_config(faults=Faults(no_correlation_id=ALWAYS))) as sim:
        cid = await create_campaign(conn)
        await add_recipients(conn, cid, numbers(1))
        assert await drain(make_settings(sim.base_url), dsn) == 0
        stats = sim.stats()
    # Queued at the first answer: never in doubt, never sent a second time.
    assert stats["destinations"]["accepted"] == 1
    [row] = await rows(conn, cid)
    assert row["status"] == "queued" and row["attempts"] == 1
    assert row["transid"] is not None and stats["faults"] == {"no_correlation_id": 1}


async def test_several_destinations_without_correlation_ids_stay_in_doubt_and_are_logged(
    conn, dsn
) -> None:
    faults = Faults(no_correlation_id=FaultSpec(probability=1.0, requests=(1, 1)))
    async with simulator(sim_config(faults=faults)) as sim:
        cid = await create_campaign(conn)
        await add_recipients(conn, cid, numbers(2))
        with capture_logs() as logs:
            assert await drain(make_settings(sim.base_url), dsn) == 0
    unmatched = [e for e in logs if e["event"] == "response_unmatched"]
    assert len(unmatched) == 1, "once per request"
    assert unmatched[0]["unmatched"] == 2 and unmatched[0]["destinations"] == 2
    assert unmatched[0]["item"]["code"] == "1001" and unmatched[0]["item"]["transid"]
    in_doubt = [e for e in logs if e["event"] == "batch_sent" and e["in_doubt"] == 2]
    assert len(in_doubt) == 1
    assert not any(SERVICE_KEY in str(e) for e in logs)


async def test_a_service_base_url_overrides_the_api_base_url(conn, dsn) -> None:
    async with simulator(sim_config()) as main, simulator(sim_config()) as other:
        settings = make_settings(main.base_url, services={"eu": {"base_url": other.base_url}})
        eu = await create_campaign(conn, service="eu")
        await add_recipients(conn, eu, numbers(2))
        default = await create_campaign(conn)
        await add_recipients(conn, default, numbers(3, start=10))
        assert await drain(settings, dsn) == 0
        assert other.stats()["destinations"]["accepted"] == 2
        assert main.stats()["destinations"]["accepted"] == 3
    assert await statuses(conn, eu) == {"queued": 2}
    assert await statuses(conn, default) == {"queued": 3}


async def test_report_timestamps_without_an_offset_are_read_in_report_timezone(pool, conn) -> None:
    config = sim_config(timestamp_zone="Asia/Kolkata", dr_delay_max_s=0.0)
    async with (
        running_server(pool, report_timezone="Asia/Kolkata") as server,
        simulator(config) as sim,
        aiohttp.ClientSession() as session,
    ):
        url = f"{server.url}/webhooks/dr/{TOKEN}"
        body = sms(["447700900001", "447700900002"], notifyurl=url)
        answer = await post(session, sim, body, key=SERVICE_KEY)
        assert [r["code"] for r in answer.results] == ["1001", "1001"]
        await sim.wait_reports_sent()
    stored = await conn.fetch("SELECT raw, reported_at, received_at FROM campaign.delivery_reports")
    assert len(stored) == 2
    for row in stored:
        written = row["raw"]["deliveryInfoNotification"]["deliveryInfo"]["timeStamp"]
        assert "+" not in written and not written.endswith("Z"), written
        # Local time 5:30 ahead read as UTC would be stored 5.5 hours in the future.
        assert abs(row["reported_at"] - row["received_at"]) < timedelta(hours=1)
