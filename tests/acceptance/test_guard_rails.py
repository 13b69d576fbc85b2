"""Guard rails while sending, end to end: the real `campaign worker` against the simulator
over real sockets, in real time. A three-country campaign whose window is open in one zone
only; a canary that fails; the rolling brake mid-campaign and a resume."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from campaign.simulator import Simulator, SimulatorConfig, start_simulator
from tests.helpers.proc import (
    SERVICE_KEY,
    Processes,
    free_port,
    wait_until,
    webhooks_at,
    write_config,
)
from tests.helpers.seed import add_recipients, campaign_status, create_campaign, statuses

INDIA = [f"9198{i:08d}" for i in range(40)]  # Asia/Calcutta, UTC+05:30, no DST
JAPAN = [f"8190123{i:05d}" for i in range(20)]  # Asia/Tokyo, UTC+09:00, no DST
ARIZONA = [f"1602555{i:04d}" for i in range(20)]  # America/Phoenix, UTC-07:00, no DST


def config_file(tmp_path: Path, sim: Simulator, **sections: Any) -> Path:
    return write_config(
        tmp_path / "c.toml",
        api={"base_url": sim.base_url},
        webhooks=webhooks_at(free_port()),
        **sections,
    )


@pytest.fixture
async def failing_sim() -> AsyncIterator[Simulator]:
    """Most reports fail (unregistered sender id, route down), as on a bad route."""
    config = SimulatorConfig(
        keys=(SERVICE_KEY,),
        dr_delay_min_s=0.01,
        dr_delay_max_s=0.05,
        dr_outcomes={"7500": 0.3, "7101": 0.5, "7201": 0.2},
        callback_retries=10,
        callback_retry_interval_s=1.0,
        seed=3,
    )
    async with await start_simulator(config) as simulator:
        yield simulator


@pytest.fixture
async def good_sim() -> AsyncIterator[Simulator]:
    config = SimulatorConfig(keys=(SERVICE_KEY,), dr_delay_min_s=0.01, dr_delay_max_s=0.05, seed=4)
    async with await start_simulator(config) as simulator:
        yield simulator


async def test_three_countries_only_the_open_zone_is_sent(
    good_sim: Simulator,
    conn: asyncpg.Connection,
    dsn: str,
    tmp_path: Path,
    campaign_process: Processes,
) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    india_now = now + timedelta(hours=5, minutes=30)
    start = (india_now - timedelta(hours=1)).time()
    end = (india_now + timedelta(hours=1)).time()
    cid = await create_campaign(conn, window_start=start, window_end=end)
    await add_recipients(conn, cid, [*INDIA, *JAPAN, *ARIZONA])
    worker = await campaign_process.start("worker", config=config_file(tmp_path, good_sim), dsn=dsn)

    async def india_delivered() -> bool:
        return (await statuses(conn, cid)).get("delivered", 0) == len(INDIA)

    await wait_until(india_delivered, what="the Indian recipients delivered")
    assert await worker.stop() == 0
    assert await statuses(conn, cid) == {"delivered": len(INDIA), "pending": 40}
    assert good_sim.stats()["destinations"]["accepted"] == len(INDIA)

    def opening(offset: timedelta) -> datetime:
        day = (now + offset).date()
        for days in (-1, 0, 1, 2):
            candidate = datetime.combine(day + timedelta(days=days), start, UTC) - offset
            if candidate > now:
                return candidate
        raise AssertionError("no opening")

    rows = await conn.fetch(
        "SELECT msisdn, attempts, next_attempt_at FROM campaign.recipients "
        "WHERE campaign_id = $1 AND status = 'pending'",
        cid,
    )
    expected = {m: opening(timedelta(hours=9)) for m in JAPAN}
    expected |= {m: opening(timedelta(hours=-7)) for m in ARIZONA}
    assert {r["msisdn"]: r["next_attempt_at"] for r in rows} == expected
    assert {r["attempts"] for r in rows} == {0}


async def test_a_failing_canary_pauses_before_the_list_goes_out(
    failing_sim: Simulator,
    conn: asyncpg.Connection,
    dsn: str,
    tmp_path: Path,
    campaign_process: Processes,
) -> None:
    canary, batch = 20, 100
    cid = await create_campaign(conn, canary_size=canary, max_failure_ratio=0.2)
    await add_recipients(conn, cid, [f"9198{i:08d}" for i in range(2000)])
    cfg = config_file(tmp_path, failing_sim, services={"default": {"batch_size": batch}}, policy={})
    worker = await campaign_process.start("worker", config=cfg, dsn=dsn)

    async def paused() -> bool:
        return await campaign_status(conn, cid) == "paused"

    await wait_until(paused, what="the campaign paused by its canary")
    assert await worker.stop() == 0
    accepted = int(failing_sim.stats()["destinations"]["accepted"])
    assert canary <= accepted <= canary + batch
    reason = await conn.fetchval("SELECT paused_reason FROM campaign.campaigns WHERE id = $1", cid)
    assert reason.startswith("canary: ") and "top codes: 7101 x" in reason
    warnings = [e for e in worker.events() if e["event"] == "campaign_auto_paused"]
    assert [(e["campaign_id"], e["by"], e["level"]) for e in warnings] == [
        (cid, "canary", "warning")
    ]
    assert (await statuses(conn, cid))["pending"] >= 2000 - canary - batch


async def test_the_rolling_brake_pauses_mid_campaign_and_a_resume_counts_new_reports(
    failing_sim: Simulator,
    conn: asyncpg.Connection,
    dsn: str,
    tmp_path: Path,
    campaign_process: Processes,
) -> None:
    total, window = 3000, 100
    cid = await create_campaign(conn, max_failure_ratio=0.5)
    await add_recipients(conn, cid, [f"9198{i:08d}" for i in range(total)])
    cfg = config_file(
        tmp_path,
        failing_sim,
        services={"default": {"batch_size": 50, "rate_per_s": 200.0}},
        policy={"failure_window": window},
    )
    worker = await campaign_process.start("worker", config=cfg, dsn=dsn)

    async def paused() -> bool:
        return await campaign_status(conn, cid) == "paused"

    await wait_until(paused, what="the brake")
    first = await conn.fetchval("SELECT paused_reason FROM campaign.campaigns WHERE id = $1", cid)
    assert first.startswith("brake: ") and f"of the last {window} reports failed" in first

    async def settled() -> int:
        counts = await statuses(conn, cid)
        return counts.get("sending", 0) == 0 and counts.get("queued", 0) == 0

    await wait_until(settled, what="requests in flight to finish")
    sent_before = int(failing_sim.stats()["destinations"]["accepted"])
    assert sent_before < total
    counts = await statuses(conn, cid)
    assert counts["pending"] == total - sent_before  # nothing lost, nothing sent twice

    # The operator resumes: the campaign sends again and is braked again only once a
    # window of new reports is in.
    await conn.execute("UPDATE campaign.campaigns SET status = 'ready' WHERE id = $1", cid)

    async def paused_again() -> bool:
        return await paused() and int(failing_sim.stats()["destinations"]["accepted"]) > (
            sent_before
        )

    await wait_until(paused_again, what="the brake after the resume")
    assert int(failing_sim.stats()["destinations"]["accepted"]) >= sent_before + window
    assert await worker.stop() == 0
    paused_events = [e for e in worker.events() if e["event"] == "campaign_auto_paused"]
    assert [e["by"] for e in paused_events] == ["brake", "brake"]
