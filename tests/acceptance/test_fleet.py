"""Three `campaign worker` processes share one service's 3,000 destinations/s, measured by
the simulator (in this process) in 1 s windows; one worker is SIGKILLed and the other two
take its share; the campaign still ends with every msisdn accepted exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from campaign.simulator import Simulator, SimulatorConfig, start_simulator

KEY = "fleet-test-key-5d2a"
TOKEN = "fleet-test-token-9f31c0"
RATE_PER_S = 3000.0
BATCH_SIZE = 1000
RECIPIENTS = 84_000
# Phases, in seconds: all three sending, then two after the kill.
STEADY_S = 14.0
AFTER_KILL_S = 10.0
TAKEOVER_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(path: Path, *, base_url: str, port: int) -> Path:
    path.write_text(
        f"""
[api]
base_url = "{base_url}"
timeout_s = 5.0

[services.default]
key = "{KEY}"
sender_id = "FLEET"
rate_per_s = {RATE_PER_S}
batch_size = {BATCH_SIZE}
max_in_flight = 4
in_doubt_grace_s = 2.0

[producer]
poll_interval_s = 0.2
queue_size = 4
lease_s = 5.0
backoff_base_s = 0.05
backoff_max_s = 0.2
recovery_interval_s = 0.5

[webhooks]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
token = "{TOKEN}"

[reconciler]
interval_s = 0.1

[worker]
stats_interval_s = 1.0
shutdown_grace_s = 5.0

[database]
pool_min = 1
pool_max = 4
""",
        encoding="utf-8",
    )
    return path


@dataclass
class Proc:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path

    def events(self) -> list[dict[str, object]]:
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [orjson.loads(line) for line in lines if line.startswith("{")]

    async def stop(self, signum: int = signal.SIGTERM, *, timeout_s: float = 20.0) -> int:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout=timeout_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            return -9


@contextlib.asynccontextmanager
async def processes() -> AsyncIterator[list[Proc]]:
    """Started `python -m campaign` processes; any still running are killed on exit."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in started:
            if p.proc.returncode is None:
                p.proc.kill()
                await p.proc.wait()


async def spawn(
    started: list[Proc], config_path: Path, dsn: str, workdir: Path, name: str, *args: str
) -> Proc:
    env = os.environ | {"CAMPAIGN_DATABASE_DSN": dsn, "PYTHONUNBUFFERED": "1"}
    env.pop("CAMPAIGN_CONFIG", None)
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "campaign",
            "--config",
            str(config_path),
            "--log-format",
            "json",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
        )
    started.append(Proc(name, proc, log_path))
    return started[-1]


async def wait_healthy(url: str, proc: Proc, *, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert proc.proc.returncode is None, proc.log_path.read_text()
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} not healthy within {timeout_s} s")


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], *, timeout_s: float) -> None:
    """Poll `check()` until true; the timeout is a safety limit, not a measurement."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def fleet_sizes(proc: Proc) -> list[int]:
    return [
        int(str(e["live_workers"])) for e in proc.events() if e.get("event") == "fleet_rate_changed"
    ]


def window_sums(windows: dict[int, int], first: int, last: int, width: int) -> list[int]:
    """Sums of `width` consecutive windows, for every start in [first, last - width + 1]."""
    return [
        sum(windows.get(w, 0) for w in range(start, start + width))
        for start in range(first, last - width + 2)
    ]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    config = SimulatorConfig(
        keys=(KEY,),
        # Far above the fleet's limit: what is measured is our limiter, not the simulator's.
        rate_per_s=20_000.0,
        stats_window_s=1.0,
        dr_delay_min_s=0.01,
        dr_delay_max_s=0.15,
        dr_batch_size=100,
        callback_retries=20,
        callback_retry_interval_s=0.5,
        seed=9,
    )
    async with await start_simulator(config) as simulator:
        yield simulator


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_three_workers_hold_one_rate_and_share_a_dead_workers_part(
    sim: Simulator, conn: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "fleet.toml", base_url=sim.base_url, port=port)
    campaign_id = await conn.fetchval(
        "INSERT INTO campaign.campaigns (name, service, body, status) "
        "VALUES ('fleet', 'default', 'Hello $(n)', 'draft') RETURNING id"
    )
    await conn.execute(
        "INSERT INTO campaign.recipients (campaign_id, msisdn, variables) "
        "SELECT $1, '9198' || lpad(g::text, 8, '0'), jsonb_build_object('n', g) "
        "FROM generate_series(1, $2::int) g",
        campaign_id,
        RECIPIENTS,
    )
    async with processes() as started:
        webhooks = await spawn(started, cfg, dsn, tmp_path, "webhooks", "webhooks")
        await wait_healthy(f"http://127.0.0.1:{port}/healthz", webhooks)
        workers = [
            await spawn(
                started,
                cfg,
                dsn,
                tmp_path,
                name,
                "worker",
                "--worker-id",
                name,
                "--no-webhooks",
                "--no-reconciler",
            )
            for name in ("w1", "w2", "w3")
        ]

        async def all_take_a_third() -> bool:
            return all(fleet_sizes(w)[-1:] == [3] for w in workers)

        await wait_for("three workers sharing", all_take_a_third, timeout_s=30.0)
        await conn.execute(
            "UPDATE campaign.campaigns SET status = 'ready' WHERE id = $1", campaign_id
        )
        # Simulator windows are counted from its start: map our clock onto them.
        offset = time.monotonic() - sim.stats(summary=True)["uptime_s"]
        ready_at = time.monotonic() - offset
        await asyncio.sleep(STEADY_S)
        victim = workers[2]
        killed_at = time.monotonic() - offset
        assert await victim.stop(signal.SIGKILL) == -signal.SIGKILL
        await asyncio.sleep(AFTER_KILL_S)

        async def completed() -> bool:
            status = await conn.fetchval(
                "SELECT status FROM campaign.campaigns WHERE id = $1", campaign_id
            )
            return bool(status == "completed")

        await wait_for("the campaign to complete", completed, timeout_s=60.0)
        for w in workers[:2]:
            assert await w.stop() == 0, w.log_path.read_text()
        assert await webhooks.stop() == 0

    stats = sim.stats(summary=True)
    windows = {int(k): v for k, v in stats["accepted_per_window"].items()}
    limit_10s = RATE_PER_S * 10
    print(
        f"\naccepted per 1 s window: {[windows.get(w, 0) for w in range(max(windows) + 1)]}"
        f"\nready at {ready_at:.1f} s, killed at {killed_at:.1f} s"
    )
    # Every 10 s window of the whole run: never above the limit by more than one batch.
    everywhere = window_sums(windows, 0, max(windows), 10)
    assert max(everywhere) <= limit_10s + BATCH_SIZE, everywhere
    # Three workers sending (from the second after the campaign became ready to the
    # second before the kill): within 10 % of the limit.
    steady = window_sums(windows, math.ceil(ready_at) + 1, math.floor(killed_at) - 1, 10)
    assert len(steady) >= 2, "the steady phase holds fewer than two 10 s windows"
    print(f"fleet rate per 10 s window, 3 workers: {steady} (limit {limit_10s:.0f})")
    assert all(0.9 * limit_10s <= s <= limit_10s + BATCH_SIZE for s in steady), steady
    # Within 5 s of the kill the other two send the whole rate again.
    takeover_from = math.ceil(killed_at + TAKEOVER_S)
    after = window_sums(windows, takeover_from, takeover_from + 4, 5)
    print(f"5 s from {TAKEOVER_S:.0f} s after the kill, 2 workers: {after}")
    assert after and 0.9 * RATE_PER_S * 5 <= after[0] <= RATE_PER_S * 5 + BATCH_SIZE, after
    for w in workers[:2]:
        assert 2 in fleet_sizes(w), f"{w.name} never saw the fleet shrink to two"
    # Our limiter did the limiting: the simulator never had to refuse anything.
    assert stats["requests"]["by_result"].keys() <= {"1001"}, stats["requests"]["by_result"]

    # The same ledger as one worker: every recipient final and delivered, each msisdn
    # accepted exactly once.
    counts = {
        r["status"]: r["n"]
        for r in await conn.fetch(
            "SELECT status, count(*) AS n FROM campaign.recipients "
            "WHERE campaign_id = $1 GROUP BY 1",
            campaign_id,
        )
    }
    assert counts == {"delivered": RECIPIENTS}
    assert stats["destinations"]["accepted"] == RECIPIENTS
    assert stats["destinations"]["distinct_msisdns"] == RECIPIENTS
    assert stats["destinations"]["duplicate_msisdns"] == 0
    # Clean stops deregistered; only the killed worker's row is left, to expire.
    rows = await conn.fetch("SELECT worker_id FROM campaign.workers")
    assert [r["worker_id"] for r in rows] == ["w3"]
