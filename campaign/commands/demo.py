"""`campaign demo`: the whole product on one machine.

An embedded PostgreSQL (unless a DSN is configured), the API simulator and a worker with
every role, all in this process; a seeded campaign of personalised recipients with a
realistic outcome mix, a STOP reply and a few bad numbers. Progress per stage, then a
summary of what happened and where the data lives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import structlog

from campaign import config, db
from campaign.simulator import SimulatorConfig, start_simulator
from campaign.statuses import ACCEPTED, FINAL, UNSENT
from campaign.worker import Worker

log = structlog.get_logger("campaign.demo")

QUERIES = (
    "demo_create_campaign",
    "demo_seed_recipients",
    "demo_insert_recipient",
    "demo_counts",
    "demo_is_suppressed",
    "demo_campaign_status",
    "demo_delivery_stats",
    "control_resume",
)


@functools.cache
def _queries() -> Mapping[str, str]:
    return db.require(db.load_queries(), QUERIES)


SERVICE = "demo"
SERVICE_KEY = "demo-service-key"
TOKEN = "demo-webhook-token"  # noqa: S105 - a loopback-only demo, not a secret
BODY = "Hi $(name), your November code is $(code). Details: {{link_1}} Reply STOP to opt out"
STOP_NUMBER_INDEX = 7
# Numbers a real list would hold too: each ends `invalid` with its reason.
BAD_NUMBERS = ("12345", "not a number", "+999123456789", "")
# A realistic mix of final report codes (see the API facts): mostly delivered.
OUTCOMES = {"7500": 0.93, "7203": 0.02, "7102": 0.01, "7206": 0.01, "7208": 0.01, "7201": 0.02}
TIMEOUT_S = 600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _msisdn(i: int) -> str:
    return f"+9198{i:08d}"


class Progress:
    """One live line per stage on a terminal; a log line every few seconds otherwise."""

    def __init__(self, stage: str, total: int) -> None:
        self.stage = stage
        self.total = total
        self._tty = sys.stderr.isatty()
        self._started = time.monotonic()
        self._last_log = 0.0

    def update(self, done: int) -> None:
        elapsed = time.monotonic() - self._started
        rate = done / elapsed if elapsed > 0 else 0.0
        share = done / self.total if self.total else 1.0
        if self._tty:
            filled = int(share * 30)
            bar = "#" * filled + "-" * (30 - filled)
            sys.stderr.write(
                f"\r{self.stage:<9} [{bar}] {done:>9,}/{self.total:,}  {rate:>9,.0f}/s"
            )
            sys.stderr.flush()
        elif time.monotonic() - self._last_log >= 2.0 or done >= self.total:
            self._last_log = time.monotonic()
            log.info(
                "demo_progress", stage=self.stage, done=done, total=self.total, per_s=round(rate)
            )

    def finish(self, done: int) -> float:
        self.update(done)
        if self._tty:
            sys.stderr.write("\n")
        return time.monotonic() - self._started


async def _seed(conn: db.Connection, recipients: int) -> tuple[int, int]:
    """Create the campaign (draft) and its recipients; returns (campaign id, rows)."""
    campaign_id = await conn.fetchval(_queries()["demo_create_campaign"], SERVICE, BODY)
    good = max(recipients - len(BAD_NUMBERS) - 1, 0)
    await conn.execute(_queries()["demo_seed_recipients"], campaign_id, good)
    # Bad input a real list carries: malformed numbers, and a row without its variables.
    await conn.executemany(
        _queries()["demo_insert_recipient"],
        [(campaign_id, n, {"name": "Bad", "code": "X"}) for n in BAD_NUMBERS]
        + [(campaign_id, _msisdn(good + 1), {"name": "No code"})],
    )
    return int(campaign_id), good + len(BAD_NUMBERS) + 1


async def _counts(conn: db.Connection, campaign_id: int) -> dict[str, int]:
    rows = await conn.fetch(_queries()["demo_counts"], campaign_id)
    return {r["status"]: int(r["n"]) for r in rows}


def _settings(base: config.Settings, *, sim_url: str, port: int, rate: float) -> config.Settings:
    batch = int(min(1000, max(1, rate)))
    return dataclasses.replace(
        base,
        api=config.ApiSettings(base_url=sim_url, timeout_s=10.0),
        services={
            SERVICE: config.ServiceSettings(
                key=SERVICE_KEY,
                sender_id="DEMOBK",
                rate_per_s=rate,
                batch_size=batch,
                max_in_flight=4,
                in_doubt_grace_s=30.0,
            )
        },
        producer=dataclasses.replace(base.producer, poll_interval_s=0.2),
        webhooks=dataclasses.replace(
            base.webhooks,
            listen=f"127.0.0.1:{port}",
            public_url=f"http://127.0.0.1:{port}",
            token=TOKEN,
        ),
        reconciler=dataclasses.replace(base.reconciler, interval_s=0.2),
        worker=dataclasses.replace(base.worker, worker_id="demo-worker", stats_interval_s=10.0),
    )


async def _wait_for(conn: db.Connection, sql: str, *args: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await conn.fetchval(sql, *args):
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: timed out waiting for {sql.split()[0:4]}")
        await asyncio.sleep(0.05)


async def run_demo(dsn: str, settings: config.Settings, *, recipients: int, rate: float) -> int:
    conn = await db.connect(dsn)
    try:
        applied = await db.migrate(conn)
        log.info(
            "demo_database_ready",
            database=db.describe_dsn(dsn),
            applied=len(applied),
            schema_version=await db.schema_version(conn),
        )
        seeding = Progress("seeding", recipients)
        campaign_id, total = await _seed(conn, recipients)
        seeding.finish(total)

        port = _free_port()
        sim_config = SimulatorConfig(
            keys=(SERVICE_KEY,),
            rate_per_s=rate * 1.05,
            dr_delay_distribution="exponential",
            dr_delay_min_s=0.2,
            dr_delay_mean_s=1.0,
            dr_delay_max_s=5.0,
            dr_interim_ratio=0.1,
            dr_outcomes=OUTCOMES,
            dr_batch_size=100,
            seed=7,
        )
        async with await start_simulator(sim_config) as sim:
            demo_settings = _settings(settings, sim_url=sim.base_url, port=port, rate=rate)
            worker = Worker(settings=demo_settings, dsn=dsn)
            running = asyncio.create_task(worker.run(), name="demo-worker")
            try:
                while worker.webhooks is None or not worker.webhooks.url:
                    if running.done():
                        return await running
                    await asyncio.sleep(0.05)
                # A customer replied STOP to an earlier campaign: their number is suppressed.
                stop_number = _msisdn(STOP_NUMBER_INDEX)
                await sim.send_mo(
                    oa=stop_number.lstrip("+"),
                    message="STOP",
                    url=f"{worker.webhooks.url}/webhooks/mo/{TOKEN}",
                )
                await _wait_for(conn, _queries()["demo_is_suppressed"], stop_number)
                await conn.fetchrow(_queries()["control_resume"], campaign_id)
                summary = await _follow(conn, campaign_id, total, running)
            finally:
                worker.request_stop()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(running, timeout=60)
            sim_stats = sim.stats(summary=True)
    finally:
        await conn.close()
    _print_summary(summary, sim_stats, dsn=dsn, campaign_id=campaign_id)
    return 0 if summary["completed"] else 1


async def _follow(
    conn: db.Connection, campaign_id: int, total: int, running: asyncio.Task[int]
) -> dict[str, Any]:
    """Show sending and report progress until the campaign is completed."""
    sending = Progress("sending", total)
    reports = Progress("reports", total)
    sent_s: float | None = None
    deadline = time.monotonic() + TIMEOUT_S
    completed = False
    while time.monotonic() < deadline and not running.done():
        counts = await _counts(conn, campaign_id)
        unsent = sum(counts.get(s, 0) for s in UNSENT)
        final = sum(counts.get(s, 0) for s in FINAL)
        if sent_s is None:
            if unsent == 0:
                sent_s = sending.finish(total)
            else:
                sending.update(total - unsent)
        else:
            reports.update(final)
        status = await conn.fetchval(_queries()["demo_campaign_status"], campaign_id)
        if status == "completed":
            completed = True
            break
        await asyncio.sleep(0.25)
    reports_s = reports.finish(final)
    stats = await conn.fetchrow(_queries()["demo_delivery_stats"], campaign_id)
    assert stats is not None
    counts = await _counts(conn, campaign_id)
    accepted = sum(counts.get(s, 0) for s in ACCEPTED)
    send_window_s = (
        (stats["last_sent"] - stats["first_sent"]).total_seconds() if stats["first_sent"] else 0.0
    )
    return {
        "completed": completed,
        "counts": counts,
        "total": total,
        "accepted": accepted,
        "send_s": sent_s,
        "send_rate_per_s": accepted / send_window_s if send_window_s > 0 else None,
        "reports_s": reports_s,
        "lag": list(stats["lag"] or []),
    }


def _print_summary(
    summary: Mapping[str, Any], sim_stats: Mapping[str, Any], *, dsn: str, campaign_id: int
) -> None:
    counts: Mapping[str, int] = summary["counts"]
    total = summary["total"]
    out = sys.stdout
    out.write(
        f"\ncampaign {campaign_id}: {'completed' if summary['completed'] else 'NOT completed'}\n\n"
    )
    out.write(f"  {'status':<11} {'recipients':>12} {'share':>7}\n")
    for status in (*FINAL, "queued", "unknown", "pending", "sending"):
        n = counts.get(status, 0)
        if n:
            out.write(f"  {status:<11} {n:>12,} {100.0 * n / total:>6.2f}%\n")
    out.write(f"  {'total':<11} {total:>12,}\n\n")
    rate = summary["send_rate_per_s"]
    out.write(
        f"  accepted by the API   {summary['accepted']:,}"
        + (f" at {rate:,.0f} destinations/s\n" if rate else "\n")
    )
    lag = summary["lag"]
    if lag:
        out.write(
            f"  report lag            p50 {lag[0]:.2f} s  p95 {lag[1]:.2f} s  p99 {lag[2]:.2f} s\n"
        )
    destinations = sim_stats.get("destinations", {})
    reports = sim_stats.get("reports", {})
    out.write(
        f"  simulator             {destinations.get('accepted', 0):,} destinations "
        f"accepted, {reports.get('sent', 0):,} reports sent\n"
    )
    out.write(f"\n  data: {db.describe_dsn(dsn)}\n")
    out.write(f"  look: campaign status {campaign_id}    or in psql: table campaign.recipients\n")
    out.flush()


async def run(args: argparse.Namespace, settings: config.Settings) -> int:

    if args.recipients < 10:
        print("campaign demo: --recipients must be at least 10", file=sys.stderr)
        return 2
    if args.rate <= 0:
        print("campaign demo: --rate must be greater than 0", file=sys.stderr)
        return 2
    async with db.database(settings) as dsn:
        return await run_demo(dsn, settings, recipients=args.recipients, rate=args.rate)
