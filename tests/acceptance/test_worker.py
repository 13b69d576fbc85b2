"""The real `campaign worker` as a subprocess, every role in one process, against the
simulator over real sockets: lifecycle, control by SQL, visibility."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import orjson
import pytest

from campaign.simulator import Faults, FaultSpec, Simulator, SimulatorConfig, start_simulator

KEY = "worker-test-key"
TOKEN = "worker-test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(
    path: Path,
    *,
    base_url: str,
    port: int,
    rate_per_s: float = 5000.0,
    batch_size: int = 500,
    max_in_flight: int = 2,
    timeout_s: float = 5.0,
    shutdown_grace_s: float = 10.0,
) -> Path:
    path.write_text(
        f"""
[api]
base_url = "{base_url}"
timeout_s = {timeout_s}

[services.default]
key = "{KEY}"
sender_id = "TESTID"
rate_per_s = {rate_per_s}
batch_size = {batch_size}
max_in_flight = {max_in_flight}
in_doubt_grace_s = 2.0

[producer]
poll_interval_s = 0.2
lease_s = 10.0
backoff_base_s = 0.05
backoff_max_s = 0.2
recovery_interval_s = 0.2

[webhooks]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{port}"
token = "{TOKEN}"

[reconciler]
interval_s = 0.1

[worker]
stats_interval_s = 0.5
shutdown_grace_s = {shutdown_grace_s}

[database]
pool_min = 1
pool_max = 6
""",
        encoding="utf-8",
    )
    return path


class WorkerProcess:
    def __init__(self, config_path: Path, dsn: str, log_path: Path) -> None:
        self.config_path = config_path
        self.dsn = dsn
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, *args: str) -> None:
        env = os.environ | {"CAMPAIGN_DATABASE_DSN": self.dsn}
        env.pop("CAMPAIGN_CONFIG", None)
        with self.log_path.open("ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "campaign",
                "--config",
                str(self.config_path),
                "--log-format",
                "json",
                "worker",
                *args,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log_file,
                env=env,
            )

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout=timeout_s)

    def events(self) -> list[dict[str, object]]:
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return [orjson.loads(line) for line in lines if line.startswith("{")]

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    config = SimulatorConfig(
        keys=(KEY,),
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


async def seed(conn: asyncpg.Connection, n: int, *, status: str = "ready") -> int:
    cid = await conn.fetchval(
        "INSERT INTO campaign.campaigns (name, service, body, status) "
        "VALUES ('w', 'default', 'Hello $(name)', $1) RETURNING id",
        status,
    )
    await conn.execute(
        "INSERT INTO campaign.recipients (campaign_id, msisdn, variables) "
        "SELECT $1, '+9198' || lpad(g::text, 8, '0'), jsonb_build_object('name', 'N' || g) "
        "FROM generate_series(1, $2::int) g",
        cid,
        n,
    )
    return int(cid)


async def counts(conn: asyncpg.Connection, cid: int) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT status, count(*) AS n FROM campaign.recipients WHERE campaign_id = $1 GROUP BY 1",
        cid,
    )
    return {r["status"]: r["n"] for r in rows}


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], *, timeout_s: float = 60.0, interval_s: float = 0.05
) -> None:
    """Poll an async predicate; the timeout is a safety limit, not a measurement."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(interval_s)


async def campaign_status(conn: asyncpg.Connection, cid: int) -> str:
    return str(await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id = $1", cid))


async def test_one_process_sends_receives_reconciles_and_completes(
    sim: Simulator, conn: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.toml", base_url=sim.base_url, port=free_port())
    worker = WorkerProcess(cfg, dsn, tmp_path / "worker.log")
    cid = await seed(conn, 3000)
    await worker.start()
    try:

        async def completed() -> bool:
            return await campaign_status(conn, cid) == "completed"

        await wait_until(completed)
        await asyncio.sleep(0.6)  # one more stats interval, so worker_stats shows the traffic
        worker.signal(signal.SIGTERM)
        assert await worker.wait() == 0
    finally:
        await worker.kill()
    assert await counts(conn, cid) == {"delivered": 3000}
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
    text = worker.log_path.read_text()
    assert KEY not in text and TOKEN not in text


async def test_sigterm_mid_campaign_then_restart_sends_each_recipient_once(
    sim: Simulator, conn: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        base_url=sim.base_url,
        port=free_port(),
        rate_per_s=1000.0,
        batch_size=100,
    )
    cid = await seed(conn, 3000)
    first = WorkerProcess(cfg, dsn, tmp_path / "w1.log")
    await first.start()
    try:

        async def some_sent() -> bool:
            return int(sim.stats()["destinations"]["accepted"]) >= 500

        await wait_until(some_sent)
        first.signal(signal.SIGTERM)
        assert await first.wait() == 0
    finally:
        await first.kill()
    # The all-in-one worker starts its receiver before the first claim and stops it after
    # the last request's results are written, so reports keep landing while it stops.
    names = [e["event"] for e in first.events()]
    assert names.index("webhooks_started") < names.index("batch_claimed")
    last_sent = len(names) - 1 - names[::-1].index("batch_sent")
    assert last_sent < names.index("webhooks_stopping") < names.index("worker_stopped")
    mid = await counts(conn, cid)
    assert "sending" not in mid
    assert mid.get("pending", 0) > 0, "the worker finished before the signal; slow it down"
    second = WorkerProcess(cfg, dsn, tmp_path / "w2.log")
    await second.start()
    try:

        async def completed() -> bool:
            return await campaign_status(conn, cid) == "completed"

        await wait_until(completed)
        second.signal(signal.SIGTERM)
        assert await second.wait() == 0
    finally:
        await second.kill()
    assert await counts(conn, cid) == {"delivered": 3000}
    stats = sim.stats()
    assert stats["destinations"]["accepted"] == 3000
    assert stats["destinations"]["duplicate_msisdns"] == 0


async def test_pause_resume_cancel_by_sql_take_effect_within_a_second(
    sim: Simulator, conn: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        base_url=sim.base_url,
        port=free_port(),
        rate_per_s=400.0,
        batch_size=40,
        max_in_flight=1,
    )
    cid = await seed(conn, 4000)
    worker = WorkerProcess(cfg, dsn, tmp_path / "w.log")
    await worker.start()

    def accepted() -> int:
        return int(sim.stats()["destinations"]["accepted"])

    try:

        async def started() -> bool:
            return accepted() >= 200

        await wait_until(started)
        await conn.execute("UPDATE campaign.campaigns SET status = 'paused' WHERE id = $1", cid)
        await asyncio.sleep(1.0)  # in-flight batches finish; no new ones after this
        at_pause = accepted()
        await asyncio.sleep(1.0)
        assert accepted() == at_pause, "a paused campaign kept sending"

        await conn.execute("UPDATE campaign.campaigns SET status = 'ready' WHERE id = $1", cid)

        async def resumed() -> bool:
            return accepted() > at_pause

        await wait_until(resumed, timeout_s=5.0)
        await conn.execute("UPDATE campaign.campaigns SET status = 'cancelled' WHERE id = $1", cid)

        async def settled() -> bool:
            c = await counts(conn, cid)
            return not any(c.get(s) for s in ("pending", "sending", "queued", "unknown"))

        await wait_until(settled, timeout_s=20.0)
        worker.signal(signal.SIGTERM)
        assert await worker.wait() == 0
    finally:
        await worker.kill()
    final = await counts(conn, cid)
    assert final.get("cancelled", 0) > 0
    assert final.get("delivered", 0) == accepted()
    assert sum(final.values()) == 4000
    assert await campaign_status(conn, cid) == "cancelled"


async def test_second_signal_exits_at_once(
    conn: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    hang = SimulatorConfig(
        keys=(KEY,), faults=Faults(slow_response=FaultSpec(probability=1.0, delay_s=60.0))
    )
    async with await start_simulator(hang) as slow:
        cfg = write_config(
            tmp_path / "c.toml",
            base_url=slow.base_url,
            port=free_port(),
            timeout_s=60.0,
            shutdown_grace_s=60.0,
        )
        await seed(conn, 10)
        worker = WorkerProcess(cfg, dsn, tmp_path / "w.log")
        await worker.start()
        try:

            async def posting() -> bool:
                return bool(slow.stats()["requests"]["total"])

            await wait_until(posting)
            worker.signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert worker.proc is not None and worker.proc.returncode is None
            started = time.monotonic()
            worker.signal(signal.SIGTERM)
            code = await worker.wait(timeout_s=10.0)
            assert time.monotonic() - started < 5.0
            assert code != 0
        finally:
            await worker.kill()
    assert "worker_killed" in [e["event"] for e in worker.events()]


async def test_a_role_that_cannot_start_stops_the_worker_with_an_error(
    sim: Simulator, dsn: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(tmp_path / "c.toml", base_url=sim.base_url, port=port)
        worker = WorkerProcess(cfg, dsn, tmp_path / "w.log")
        await worker.start()
        try:
            code = await worker.wait(timeout_s=30.0)
        finally:
            await worker.kill()
    assert code != 0
    failed = [e for e in worker.events() if e["event"] == "command_failed"]
    assert failed and "address" in str(failed[0]["error"]).lower()


async def test_worker_refuses_an_unmigrated_database(
    sim: Simulator, empty_dsn: str, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.toml", base_url=sim.base_url, port=free_port())
    worker = WorkerProcess(cfg, empty_dsn, tmp_path / "w.log")
    await worker.start()
    try:
        assert await worker.wait() == 2
    finally:
        await worker.kill()
    assert "run `campaign migrate`" in worker.log_path.read_text()


async def test_receiver_only_worker_serves_health_and_no_sender(
    sim: Simulator, conn: asyncpg.Connection, dsn: str, tmp_path: Path
) -> None:
    import aiohttp

    port = free_port()
    cfg = write_config(tmp_path / "c.toml", base_url=sim.base_url, port=port)
    cid = await seed(conn, 20)
    worker = WorkerProcess(cfg, dsn, tmp_path / "w.log")
    await worker.start("--no-sender")
    try:
        async with aiohttp.ClientSession() as http:

            async def healthy() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(healthy, timeout_s=20.0)
        await asyncio.sleep(0.5)
        assert await counts(conn, cid) == {"pending": 20}
        assert sim.stats()["requests"]["total"] == 0
        worker.signal(signal.SIGINT)
        assert await worker.wait() == 0
    finally:
        await worker.kill()
