"""What every stage shares: the result record, the machine, a fresh database, processes.

A stage is an async function taking a `Context` and returning a `Result`: its figure, the
ceiling measured in the same run on the same machine, and the target from issue 7.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from campaign import db

SERVICE = "bench"
SERVICE_KEY = "bench-service-key"
WEBHOOK_TOKEN = "bench-webhook-token"
TABLES = (
    "campaign.delivery_reports",
    "campaign.incoming_messages",
    "campaign.webhook_rejects",
    "campaign.suppressions",
    "campaign.batches",
    "campaign.recipients",
    "campaign.campaigns",
    "campaign.workers",
    "campaign.service_rates",
)


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each stage does; `quick()` keeps the whole run under two minutes."""

    submit: int = 200_000
    ingest: int = 100_000
    reconcile: int = 200_000
    e2e: int = 1_000_000
    memory: int = 10_000_000
    latency_trials: int = 20
    check: int = 1_000_000
    # Seconds over which the idle stage counts commits and CPU.
    idle_s: float = 60.0
    # Throughput stages run product and ceiling alternately this many times and keep the
    # best of each: one run on a shared 2-core machine varies by +-15 %.
    rounds: int = 3

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            submit=50_000,
            ingest=20_000,
            reconcile=50_000,
            e2e=20_000,
            memory=100_000,
            latency_trials=8,
            check=50_000,
            idle_s=15.0,
            rounds=1,
        )


@dataclass(frozen=True, slots=True)
class Context:
    """Where a stage runs: a migrated database of its own, sizes, a folder for logs."""

    dsn: str
    sizes: Sizes
    work_dir: Path
    # Ceilings already measured in this run, by stage (end to end derives its own).
    ceilings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Result:
    stage: str
    unit: str
    figure: float
    ceiling: float
    # figure / ceiling for rates; ceiling / figure for latency and memory (1.0 is the raw path).
    ratio: float
    target: str
    met: bool
    n: int
    duration_s: float
    notes: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "unit": self.unit,
            "figure": round(self.figure, 3),
            "ceiling": round(self.ceiling, 3),
            "ratio": round(self.ratio, 3),
            "target": self.target,
            "met": self.met,
            "n": self.n,
            "duration_s": round(self.duration_s, 3),
            "notes": self.notes,
            "details": dict(self.details),
        }


def ratio(figure: float, ceiling: float) -> float:
    return figure / ceiling if ceiling > 0 else 0.0


async def machine(dsn: str) -> dict[str, Any]:
    conn = await db.connect(dsn)
    try:
        pg_version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "postgresql": pg_version,
        "platform": platform.platform(),
    }


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def server_dsn() -> AsyncIterator[str]:
    """CAMPAIGN_BENCH_DSN, else CAMPAIGN_TEST_DSN, else an embedded server for the run."""
    env = os.environ.get("CAMPAIGN_BENCH_DSN") or os.environ.get("CAMPAIGN_TEST_DSN")
    if env:
        yield env
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = db.EmbeddedServer(data_dir=Path(tempfile.mkdtemp(prefix="campaign-bench-pg-")))
        dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def fresh_database(server: str, *, name: str | None = None) -> AsyncIterator[str]:
    """A migrated database for this run only, dropped afterwards."""
    name = name or f"campaign_bench_{os.getpid()}"
    admin = await db.connect(server)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(server, name)
    try:
        conn = await db.connect(dsn)
        try:
            await db.migrate(conn)
        finally:
            await conn.close()
        yield dsn
    finally:
        admin = await db.connect(server)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def reset(dsn: str) -> None:
    """Empty every table so each stage starts from the same state."""
    conn = await db.connect(dsn)
    try:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


async def seed_recipients(
    conn: db.Connection | db.PoolConnection,
    *,
    count: int,
    body: str = "Hello from the benchmark",
    status: str = "ready",
) -> int:
    """A campaign of `count` valid Indian mobile numbers; returns its id."""
    async with conn.transaction():
        campaign_id = int(
            await conn.fetchval(
                "INSERT INTO campaign.campaigns (name, service, body, status) "
                "VALUES ('bench', $1, $2, $3) RETURNING id",
                SERVICE,
                body,
                status,
            )
        )
        await insert_recipients(conn, campaign_id, count)
    await conn.execute("ANALYZE campaign.recipients")
    return campaign_id


async def insert_recipients(
    conn: db.Connection | db.PoolConnection, campaign_id: int, count: int
) -> None:
    # Chunks keep one statement's memory bounded for the 10M-row memory stage.
    chunk = 1_000_000
    for start in range(0, count, chunk):
        await conn.execute(
            "INSERT INTO campaign.recipients (campaign_id, msisdn) "
            "SELECT $1, '9198' || lpad(i::text, 8, '0') FROM generate_series($2::int, $3::int) i",
            campaign_id,
            start,
            min(count, start + chunk) - 1,
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(slots=True)
class Process:
    """A child process of this run, its output in a log file."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    # A process this one works with (a worker's simulator), when a stage needs it.
    peer: Process | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self, *, timeout_s: float = 15.0) -> int | None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


async def spawn(
    name: str, args: Sequence[str], *, work_dir: Path, env: Mapping[str, str] | None = None
) -> Process:
    log_path = work_dir / f"{name}.log"
    with log_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    return Process(name=name, proc=proc, log_path=log_path)


@contextlib.asynccontextmanager
async def running(process: Process) -> AsyncIterator[Process]:
    try:
        yield process
    finally:
        await process.stop()


async def wait_http(process: Process, url: str, *, timeout_s: float = 30.0) -> None:
    """Until `url` answers 200; fails early when the process died."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            if process.proc.returncode is not None:
                raise RuntimeError(
                    f"{process.name} exited with {process.proc.returncode}:\n"
                    f"{process.log_text()[-3000:]}"
                )
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{process.name}: {url} not ready after {timeout_s} s")
            await asyncio.sleep(0.05)


async def wait_log(process: Process, event: str, *, timeout_s: float = 30.0) -> None:
    """Until the process logged `event` (JSON log lines)."""
    deadline = time.monotonic() + timeout_s
    needle = f'"{event}"'
    while needle not in process.log_text():
        if process.proc.returncode is not None:
            raise RuntimeError(
                f"{process.name} exited with {process.proc.returncode}:\n"
                f"{process.log_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.name}: no {event} after {timeout_s} s")
        await asyncio.sleep(0.05)


async def start_simulator(
    work_dir: Path, *, settings: Sequence[str] = (), name: str = "simulator"
) -> tuple[Process, str]:
    """`campaign simulate` in its own process, no rate limit; returns it and its base URL."""
    port = free_port()
    args = ["-m", "campaign", "simulate", "--listen", f"127.0.0.1:{port}"]
    args += ["--key", SERVICE_KEY, "--rate", "0", "--seed", "7"]
    for setting in settings:
        args += ["--set", setting]
    process = await spawn(name, args, work_dir=work_dir)
    base_url = f"http://127.0.0.1:{port}"
    try:
        await wait_http(process, f"{base_url}/simulate/stats?summary=1")
    except BaseException:
        await process.stop()
        raise
    return process, base_url


def write_config(
    path: Path, *, base_url: str, webhooks_port: int, events: bool | None = None
) -> Path:
    """A worker config for the bench service, defaults elsewhere; reports come back to it.
    `events` None: the outbox as CAMPAIGN_BENCH_EVENTS says (on unless "off")."""
    if events is None:
        events = os.environ.get("CAMPAIGN_BENCH_EVENTS") != "off"
    lines = [
        "[api]",
        f'base_url = "{base_url}"',
        "[services.bench]",
        f'key = "{SERVICE_KEY}"',
        'sender_id = "BENCH"',
        "rate_per_s = 1000000.0",
        "batch_size = 1000",
        "max_in_flight = 4",
        "[webhooks]",
        f'listen = "127.0.0.1:{webhooks_port}"',
        f'public_url = "http://127.0.0.1:{webhooks_port}"',
        f'token = "{WEBHOOK_TOKEN}"',
        # A free ops port each: benches run beside other workers on this host.
        "[ops]",
        'listen = "127.0.0.1:0"',
        "[logging]",
        'format = "json"',
        'level = "info"',
        # The event outbox on (the default) or off: the e2e100_noevents stage measures
        # the cost of the triggers (docs/performance.md).
        "[events]",
        f"enabled = {'true' if events else 'false'}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (p99 of 20 trials is the worst one)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, int(-(-fraction * len(ordered) // 1)) - 1))
    return ordered[rank]
