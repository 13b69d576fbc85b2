"""The soak: delivery reports posted at a steady rate near the ingest ceiling for
CAMPAIGN_SOAK_S seconds (default 30, so that `make test` stays short; set 600 for a longer
soak) while a campaign sends; afterwards no report is lost, the p99 answer time is
reported, and the receiving process's memory stayed flat."""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import psutil
import pytest

from campaign.simulator import start_simulator
from tests.helpers.faults import SOAK, fault_run, seed, sim_config, wait_final
from tests.helpers.proc import WEBHOOK_TOKEN
from tests.helpers.seed import queued_campaign
from tests.helpers.webhooks import dr

pytestmark = pytest.mark.slow

SOAK_S = float(os.environ.get("CAMPAIGN_SOAK_S", "30"))
# Reports per second posted by the test, in arrays of PER_POST (the simulator's
# dr_batch_size=100 shape); the campaign's own reports come on top.
RATE_PER_S = float(os.environ.get("CAMPAIGN_SOAK_RATE", "4000"))
PER_POST = 50
MAX_IN_FLIGHT = 64
MAX_TRIES = 20


@pytest.mark.timeout(SOAK_S + 480)
async def test_soak_reports_at_a_steady_rate_while_a_campaign_sends(
    conn: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    posts = int(SOAK_S * RATE_PER_S / PER_POST)
    reports = posts * PER_POST
    soak_id = await queued_campaign(conn, reports, name="soak", prefix="soak-")
    # The sending campaign lasts about as long as the soak.
    sending_id = await seed(conn, count=max(1000, int(SOAK_S * 500)))
    sim = await start_simulator(sim_config())
    try:
        async with fault_run(
            dsn, sim, tmp_path, service={"rate_per_s": 500.0}, lease_s=30.0
        ) as run:
            receiver = await run.start_webhooks()
            url = f"http://127.0.0.1:{run.webhook_port}/webhooks/dr/{WEBHOOK_TOKEN}"
            sender = await run.start_worker("soak-sender", drain=True)
            latencies: list[float] = []
            retried = 0
            samples: list[int] = []
            process = psutil.Process(receiver.proc.pid)

            async def sample_memory(stop: asyncio.Event) -> None:
                while not stop.is_set():
                    samples.append(process.memory_info().rss)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=1.0)

            async def post(session: aiohttp.ClientSession, n: int) -> None:
                nonlocal retried
                body = orjson.dumps(
                    [dr(f"soak-{n * PER_POST + i}", "7500") for i in range(PER_POST)]
                )
                for attempt in range(MAX_TRIES):
                    started = time.monotonic()
                    async with session.post(url, data=body) as resp:
                        await resp.read()
                        status = resp.status
                    latencies.append(time.monotonic() - started)
                    if status == 200:
                        return
                    assert status == 503, f"answer {status}"
                    retried += 1
                    await asyncio.sleep(0.5 * (attempt + 1))
                raise AssertionError(f"post {n} not stored after {MAX_TRIES} tries")

            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_memory(stop))
            limit = asyncio.Semaphore(MAX_IN_FLIGHT)
            interval_s = PER_POST / RATE_PER_S
            t0 = time.monotonic()
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_IN_FLIGHT)
            ) as session:

                async def one(n: int) -> None:
                    async with limit:
                        await post(session, n)

                async with asyncio.TaskGroup() as tasks:
                    for n in range(posts):
                        # A steady schedule, not as fast as possible: post n is due at n * interval.
                        delay = t0 + n * interval_s - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        tasks.create_task(one(n))
            posted_s = time.monotonic() - t0
            stop.set()
            await sampler
            code = await asyncio.wait_for(sender.proc.wait(), timeout=120)
            assert code == 0, sender.output()[-3000:]
            # Reports arrive faster than one reconciler matches them on two busy cores; the
            # backlog drains after the soak. The limit only stops a broken run.
            soak_counts = await wait_final(conn, soak_id, timeout_s=180)
            sending_counts = await wait_final(conn, sending_id, timeout_s=180)
            assert receiver.proc.returncode is None, "the receiver died"

        stored = await conn.fetchval(
            "SELECT count(*) FROM campaign.delivery_reports WHERE transid LIKE 'soak-%'"
        )
        assert stored == reports, "every report answered 200 is stored, once"
        assert soak_counts == {"delivered": reports}
        assert set(sending_counts) == {"delivered"}

        latencies.sort()
        p50 = latencies[len(latencies) // 2]
        p99 = latencies[int(len(latencies) * 0.99)]
        # Memory flat: after a warm-up tenth, the last third's peak stays near the first's.
        steady = samples[len(samples) // 10 :]
        third = max(1, len(steady) // 3)
        early, late = max(steady[:third]), max(steady[-third:])
        SOAK.append(
            f"soak {SOAK_S:.0f} s: {reports} reports in {posts} posts at "
            f"{reports / posted_s:.0f}/s (target {RATE_PER_S:.0f}/s) plus "
            f"{sum(sending_counts.values())} campaign reports; lost 0; 503 retries {retried}; "
            f"answer p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; receiver RSS "
            f"{early / 2**20:.0f} MiB -> {late / 2**20:.0f} MiB "
            f"(median {statistics.median(steady) / 2**20:.0f} MiB)"
        )
        assert late <= early * 1.25 + 32 * 2**20, f"memory grew: {SOAK[-1]}"
    finally:
        await sim.close()
