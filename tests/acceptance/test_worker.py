"""The real `campaign worker` as a subprocess, every role in one process, against the
simulator over real sockets: lifecycle, control by SQL, visibility."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from campaign.simulator import Faults, FaultSpec, Simulator, SimulatorConfig, start_simulator
from tests.helpers.proc import (
    SERVICE_KEY,
    WEBHOOK_TOKEN,
    Processes,
    free_port,
    wait_until,
    webhooks_at,
    write_config,
)
from tests.helpers.seed import campaign_status, campaign_with_recipients, statuses


def worker_config(
    tmp_path: Path, base_url: str, port: int, *, api: dict[str, Any] | None = None, **sections: Any
) -> Path:
    """The default test config against `base_url`, reports to 127.0.0.1:`port`."""
    return write_config(
        tmp_path / "c.toml",
        api={"base_url": base_url} | (api or {}),
        webhooks=webhooks_at(port),
        **sections,
    )


def service(**keys: Any) -> dict[str, Any]:
    return {"default": keys}


async def seed(conn: asyncpg.Connection, n: int) -> int:
    """A ready campaign of `n` recipients with a personalised text."""
    return await campaign_with_recipients(
        conn, n, name="w", body="Hello $(name)", variables=lambda i: {"name": f"N{i}"}
    )


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    config = SimulatorConfig(
        keys=(SERVICE_KEY,),
        dr_delay_min_s=0.01,
        dr_delay_max_s=0.1,
        dr_batch_size=50,
        # The platform retries a report 3 times 60 s apart: a restart of a few seconds loses
        # nothing. Scaled down, the retries must still outlast a restart of `campaign worker`
        # on a busy machine (several seconds of Python start-up), or reports for requests
        # answered while the first worker stopped are lost and their recipients stay queued.
        callback_retries=10,
        callback_retry_interval_s=1.0,
        seed=1,
    )
    async with await start_simulator(config) as simulator:
        yield simulator


async def test_one_process_sends_receives_reconciles_and_completes(
    sim: Simulator, conn: asyncpg.Connection, dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    cfg = worker_config(tmp_path, sim.base_url, free_port())
    cid = await seed(conn, 3000)
    worker = await campaign_process.start("worker", config=cfg, dsn=dsn)

    async def completed() -> bool:
        return await campaign_status(conn, cid) == "completed"

    await wait_until(completed, what="the campaign to complete")
    await asyncio.sleep(0.6)  # one more stats interval, so worker_stats shows the traffic
    assert await worker.stop() == 0
    assert await statuses(conn, cid) == {"delivered": 3000}
    stats = sim.stats()
    assert stats["destinations"]["accepted"] == 3000
    assert stats["destinations"]["duplicate_msisdns"] == 0
    events = worker.events()
    names = [e["event"] for e in events]
    assert "campaign_completed" in names and "worker_stopped" in names
    worker_stats = [e for e in events if e["event"] == "worker_stats"]
    assert sum(int(e["accepted"]) for e in worker_stats) == 3000
    assert any(float(e["reports_per_s"]) > 0 for e in worker_stats)
    for e in events:
        if e["event"] in ("batch_sent", "batch_claimed"):
            assert e["campaign_id"] == cid and "batch_id" in e
    text = worker.log()
    assert SERVICE_KEY not in text and WEBHOOK_TOKEN not in text


async def test_sigterm_mid_campaign_then_restart_sends_each_recipient_once(
    sim: Simulator, conn: asyncpg.Connection, dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    cfg = worker_config(
        tmp_path,
        sim.base_url,
        free_port(),
        services=service(rate_per_s=1000.0, batch_size=100),
    )
    cid = await seed(conn, 3000)
    first = await campaign_process.start("worker", config=cfg, dsn=dsn, name="w1")

    async def some_sent() -> bool:
        return int(sim.stats()["destinations"]["accepted"]) >= 500

    await wait_until(some_sent, what="500 destinations accepted")
    assert await first.stop() == 0
    # The all-in-one worker starts its receiver before the first claim and stops it after
    # the last request's results are written, so reports keep landing while it stops.
    names = first.event_names()
    assert names.index("webhooks_started") < names.index("batch_claimed")
    last_sent = len(names) - 1 - names[::-1].index("batch_sent")
    assert last_sent < names.index("webhooks_stopping") < names.index("worker_stopped")
    mid = await statuses(conn, cid)
    assert "sending" not in mid
    assert mid.get("pending", 0) > 0, "the worker finished before the signal; slow it down"
    second = await campaign_process.start("worker", config=cfg, dsn=dsn, name="w2")

    async def completed() -> bool:
        return await campaign_status(conn, cid) == "completed"

    await wait_until(completed, what="the campaign to complete")
    assert await second.stop() == 0
    assert await statuses(conn, cid) == {"delivered": 3000}
    stats = sim.stats()
    assert stats["destinations"]["accepted"] == 3000
    assert stats["destinations"]["duplicate_msisdns"] == 0


async def test_pause_resume_cancel_by_sql_take_effect(
    sim: Simulator, conn: asyncpg.Connection, dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    cfg = worker_config(
        tmp_path,
        sim.base_url,
        free_port(),
        services=service(rate_per_s=400.0, batch_size=40, max_in_flight=1),
    )
    cid = await seed(conn, 4000)
    worker = await campaign_process.start("worker", config=cfg, dsn=dsn)

    def accepted() -> int:
        return int(sim.stats()["destinations"]["accepted"])

    async def started() -> bool:
        return accepted() >= 200

    await wait_until(started, what="200 destinations accepted")
    await conn.execute("UPDATE campaign.campaigns SET status = 'paused' WHERE id = $1", cid)

    async def nothing_in_flight() -> bool:
        # Batches claimed before the pause are still sent; none is claimed after it.
        return not await conn.fetchval(
            "SELECT count(*) FROM campaign.batches "
            "WHERE campaign_id = $1 AND status IN ('claimed', 'posting')",
            cid,
        )

    await wait_until(nothing_in_flight, what="the batches claimed before the pause to finish")
    at_pause = accepted()
    await asyncio.sleep(1.0)
    assert accepted() == at_pause, "a paused campaign kept sending"

    await conn.execute("UPDATE campaign.campaigns SET status = 'ready' WHERE id = $1", cid)

    async def resumed() -> bool:
        return accepted() > at_pause

    await wait_until(resumed, what="sending to resume")
    await conn.execute("UPDATE campaign.campaigns SET status = 'cancelled' WHERE id = $1", cid)

    async def settled() -> bool:
        c = await statuses(conn, cid)
        return not any(c.get(s) for s in ("pending", "sending", "queued", "unknown"))

    await wait_until(settled, what="every recipient final")
    assert await worker.stop() == 0
    final = await statuses(conn, cid)
    assert final.get("cancelled", 0) > 0
    assert final.get("delivered", 0) == accepted()
    assert sum(final.values()) == 4000
    assert await campaign_status(conn, cid) == "cancelled"


async def test_second_signal_exits_at_once(
    conn: asyncpg.Connection, dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    grace_s = 60.0
    hang = SimulatorConfig(
        keys=(SERVICE_KEY,),
        faults=Faults(slow_response=FaultSpec(probability=1.0, delay_s=grace_s)),
    )
    async with await start_simulator(hang) as slow:
        cfg = worker_config(
            tmp_path,
            slow.base_url,
            free_port(),
            api={"timeout_s": grace_s},
            worker={"shutdown_grace_s": grace_s},
        )
        await seed(conn, 10)
        worker = await campaign_process.start("worker", config=cfg, dsn=dsn)

        async def posting() -> bool:
            return bool(slow.stats()["requests"]["total"])

        await wait_until(posting, what="a request at the simulator")
        worker.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert worker.returncode is None
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        code = await worker.wait(timeout_s=grace_s)
        # Without the second signal it would wait out the grace period for the hanging
        # request; how much sooner it exits depends on the machine, not on the worker.
        assert time.monotonic() - started < grace_s / 2
        assert code != 0
    assert "worker_killed" in worker.event_names()


async def test_a_role_that_cannot_start_stops_the_worker_with_an_error(
    sim: Simulator, dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = worker_config(tmp_path, sim.base_url, port)
        worker = await campaign_process.start("worker", config=cfg, dsn=dsn)
        code = await worker.wait(timeout_s=30.0)
    assert code != 0
    failed = [e for e in worker.events() if e["event"] == "command_failed"]
    assert failed and "address" in str(failed[0]["error"]).lower()


async def test_worker_refuses_an_unmigrated_database(
    sim: Simulator, empty_dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    cfg = worker_config(tmp_path, sim.base_url, free_port())
    worker = await campaign_process.run("worker", config=cfg, dsn=empty_dsn)
    assert worker.returncode == 2
    assert "run `campaign migrate`" in worker.log()


async def test_receiver_only_worker_serves_health_and_no_sender(
    sim: Simulator, conn: asyncpg.Connection, dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    port = free_port()
    cfg = worker_config(tmp_path, sim.base_url, port)
    cid = await seed(conn, 20)
    worker = await campaign_process.start("worker", "--no-sender", config=cfg, dsn=dsn)
    await worker.wait_http(f"http://127.0.0.1:{port}/healthz")
    await asyncio.sleep(0.5)
    assert await statuses(conn, cid) == {"pending": 20}
    assert sim.stats()["requests"]["total"] == 0
    assert await worker.stop(signal.SIGINT) == 0
