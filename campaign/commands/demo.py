"""`campaign demo`: the whole product on one machine.

An embedded PostgreSQL (unless a DSN is configured), the API simulator and a worker with
every role, all in this process; a seeded campaign of personalised recipients with a
realistic outcome mix, a STOP reply, a few bad numbers and a few customers listed twice.
Progress per stage, then a summary of what happened and where the data lives.

The terminal is the person's, the log is the file's: for its run the demo re-routes the
logging the CLI set up, so every event goes as JSON lines (secrets redacted) to a log file
it names, and only warnings and errors reach the terminal. On a terminal they are printed
above rich's progress bars through the same Console, so the two never share a line; piped,
the demo writes one line per finished stage instead of bars.

Each run deletes the demo campaigns of earlier runs first, so the embedded database holds
one run's rows, not every run's; `campaign demo --reset` deletes the embedded database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import platformdirs
import structlog
from rich import progress
from rich.console import Console
from rich.text import Text

from campaign import config, db, logs
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
    "demo_guard_rails",
    "demo_learning",
    "demo_delete_earlier",
    "demo_vacuum",
    "demo_limit_wal",
    "demo_reload_config",
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
# Customers listed twice, the second time written another way (no '+'): each second row
# ends `duplicate`, the first one is sent.
DUPLICATE_INDEXES = (2, 3, 5)
# A realistic mix of final report codes (see the API facts): mostly delivered.
OUTCOMES = {"7500": 0.93, "7203": 0.02, "7102": 0.01, "7206": 0.01, "7208": 0.01, "7201": 0.02}
TIMEOUT_S = 600.0
# The demo campaign sends this many recipients first and judges them before the rest.
CANARY_SIZE = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _msisdn(i: int) -> str:
    return f"+9198{i:08d}"


def default_log_file() -> Path:
    return Path(platformdirs.user_log_dir("campaign")) / "demo.log"


def embedded_data_dir(settings: config.Settings) -> Path | None:
    """The embedded database's directory, as `db.database` picks it; None with a DSN."""
    if settings.database_dsn:
        return None
    return Path(settings.database.data_dir) if settings.database.data_dir else db.default_data_dir()


def _disk_size(path: Path) -> str:
    size_b = 0
    for folder, _, files in os.walk(path):
        for name in files:
            # A running server removes and recycles files while we count.
            with contextlib.suppress(OSError):
                size_b += os.lstat(os.path.join(folder, name)).st_size
    return f"{size_b / 1e6:,.0f} MB"


class _ConsoleHandler(logging.Handler):
    """Log records printed through the demo's Console: above the live bars, never into them."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self._console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._console.print(Text.from_ansi(self.format(record)), soft_wrap=True)
        except Exception:
            self.handleError(record)


class Screen:
    """What the person running the demo sees, on stderr: on a terminal one live bar per
    stage (rich), with warnings printed above them; piped, one line per finished stage."""

    def __init__(self, *, tty: bool) -> None:
        self.tty = tty
        self.console = Console(file=sys.stderr, highlight=False, soft_wrap=True)
        self._bars = progress.Progress(
            progress.TextColumn("{task.description:<8}"),
            progress.BarColumn(bar_width=40),
            progress.TextColumn("{task.completed:>9,.0f}/{task.total:,.0f}"),
            progress.TextColumn("{task.fields[rate]:>10}"),
            progress.TimeElapsedColumn(),
            console=self.console,
            # The counts change four times a second; rendering more often only takes CPU
            # (and the GIL) from the worker in this process.
            refresh_per_second=4,
        )
        self._tasks: dict[str, tuple[progress.TaskID, float]] = {}

    def log_handler(self, secrets: Iterable[str]) -> logging.Handler:
        handler = _ConsoleHandler(self.console)
        handler.setFormatter(logs.formatter(json=False, colors=self.tty, secrets=secrets))
        return handler

    def say(self, line: str) -> None:
        self.console.print(line, markup=False)

    def __enter__(self) -> Screen:
        if self.tty:
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    def start(self, stage: str, total: int) -> None:
        task = self._bars.add_task(stage, total=total, rate="", visible=self.tty)
        self._tasks[stage] = (task, time.monotonic())

    def update(self, stage: str, done: int) -> None:
        task, started = self._tasks[stage]
        elapsed_s = time.monotonic() - started
        rate = f"{done / elapsed_s:,.0f}/s" if elapsed_s > 0 else ""
        self._bars.update(task, completed=done, rate=rate)

    def finish(self, stage: str, done: int) -> float:
        """Freeze the stage's bar (or write its line); returns the stage's seconds."""
        task, started = self._tasks[stage]
        elapsed_s = time.monotonic() - started
        self.update(stage, done)
        self._bars.stop_task(task)
        log.info("demo_stage_finished", stage=stage, done=done, duration_s=round(elapsed_s, 3))
        if not self.tty:
            total = int(self._bars.tasks[task].total or 0)
            rate = f" ({done / elapsed_s:,.0f}/s)" if elapsed_s > 0 else ""
            self.say(f"{stage:<8} {done:,}/{total:,} in {elapsed_s:.1f} s{rate}")
        return elapsed_s


async def _seed(conn: db.Connection, recipients: int) -> tuple[int, int]:
    """Create the campaign (draft) and its recipients; returns (campaign id, rows)."""
    campaign_id = await conn.fetchval(
        _queries()["demo_create_campaign"], SERVICE, BODY, min(CANARY_SIZE, recipients)
    )
    extra = len(BAD_NUMBERS) + 1 + len(DUPLICATE_INDEXES)
    good = max(recipients - extra, max(DUPLICATE_INDEXES))
    await conn.execute(_queries()["demo_seed_recipients"], campaign_id, good)
    # Bad input a real list carries: malformed numbers, a row without its variables, and
    # customers listed twice.
    await conn.executemany(
        _queries()["demo_insert_recipient"],
        [(campaign_id, n, {"name": "Bad", "code": "X"}) for n in BAD_NUMBERS]
        + [(campaign_id, _msisdn(good + 1), {"name": "No code"})]
        + [
            (campaign_id, _msisdn(i).lstrip("+"), {"name": "Again", "code": "X"})
            for i in DUPLICATE_INDEXES
        ],
    )
    return int(campaign_id), good + extra


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
        # SIM full (7206) is in the demo's report mix: sent once more within the demo.
        policy=dataclasses.replace(base.policy, retry_after_s=2.0),
    )


async def _wait_for(conn: db.Connection, sql: str, *args: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await conn.fetchval(sql, *args):
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: timed out waiting for {sql.split()[0:4]}")
        await asyncio.sleep(0.05)


@dataclasses.dataclass(frozen=True, slots=True)
class Where:
    """Where the demo keeps its data and its log, said at the start and in the summary."""

    dsn: str
    data_dir: Path | None
    log_file: Path

    def database(self) -> str:
        if self.data_dir is None:
            return db.describe_dsn(self.dsn)
        return f"embedded PostgreSQL in {self.data_dir}"


class _WorkerStopped(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"the demo's worker stopped with exit code {code}")
        self.code = code


async def _delete_earlier_runs(conn: db.Connection, screen: Screen) -> None:
    deleted = int(await conn.fetchval(_queries()["demo_delete_earlier"], SERVICE))
    if deleted:
        await conn.execute(_queries()["demo_vacuum"])
        log.info("demo_earlier_runs_deleted", campaigns=deleted)
        screen.say(
            f"cleanup  deleted {deleted:,} earlier demo campaign(s); this run reuses the space"
        )


async def run_demo(
    dsn: str,
    settings: config.Settings,
    *,
    recipients: int,
    rate: float,
    screen: Screen,
    where: Where,
) -> int:
    conn = await db.connect(dsn)
    try:
        applied = await db.migrate(conn)
        log.info(
            "demo_database_ready",
            database=db.describe_dsn(dsn),
            applied=len(applied),
            schema_version=await db.schema_version(conn),
        )
        if where.data_dir is not None:
            await conn.execute(_queries()["demo_limit_wal"])
            await conn.fetchval(_queries()["demo_reload_config"])
        await _delete_earlier_runs(conn, screen)
        with screen:
            screen.start("seeding", recipients)
            campaign_id, total = await _seed(conn, recipients)
            screen.finish("seeding", total)
            summary, sim_stats = await _send(
                conn, dsn, settings, campaign_id=campaign_id, total=total, rate=rate, screen=screen
            )
    except _WorkerStopped as exc:
        return exc.code
    finally:
        await conn.close()
    _print_summary(summary, sim_stats, where=where, campaign_id=campaign_id)
    return 0 if summary["completed"] else 1


async def _send(
    conn: db.Connection,
    dsn: str,
    settings: config.Settings,
    *,
    campaign_id: int,
    total: int,
    rate: float,
    screen: Screen,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start the simulator and a worker, send the STOP reply, release the campaign and
    follow it to completion; returns the summary and the simulator's statistics."""
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
                    # It said why in the log (worker_not_started, an error: on the terminal too).
                    raise _WorkerStopped(await running)
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
            summary = await _follow(conn, campaign_id, total, running, screen)
        finally:
            worker.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(running, timeout=60)
        return summary, sim.stats(summary=True)


async def _follow(
    conn: db.Connection,
    campaign_id: int,
    total: int,
    running: asyncio.Task[int],
    screen: Screen,
) -> dict[str, Any]:
    """Show sending and report progress until the campaign is completed."""
    screen.start("sending", total)
    screen.start("reports", total)
    sent_s: float | None = None
    unsent, final = total, 0
    deadline = time.monotonic() + TIMEOUT_S
    completed = False
    while time.monotonic() < deadline and not running.done():
        counts = await _counts(conn, campaign_id)
        unsent = sum(counts.get(s, 0) for s in UNSENT)
        final = sum(counts.get(s, 0) for s in FINAL)
        if sent_s is None:
            if unsent == 0:
                sent_s = screen.finish("sending", total)
            else:
                screen.update("sending", total - unsent)
        screen.update("reports", final)
        status = await conn.fetchval(_queries()["demo_campaign_status"], campaign_id)
        if status == "completed":
            completed = True
            break
        await asyncio.sleep(0.25)
    if sent_s is None:
        screen.finish("sending", total - unsent)
    reports_s = screen.finish("reports", final)
    stats = await conn.fetchrow(_queries()["demo_delivery_stats"], campaign_id)
    assert stats is not None
    counts = await _counts(conn, campaign_id)
    accepted = sum(counts.get(s, 0) for s in ACCEPTED)
    learning = await conn.fetchrow(_queries()["demo_learning"], campaign_id)
    assert learning is not None
    send_window_s = (
        (stats["last_sent"] - stats["first_sent"]).total_seconds() if stats["first_sent"] else 0.0
    )
    guards = await conn.fetchrow(_queries()["demo_guard_rails"], campaign_id)
    assert guards is not None
    return {
        "guard_rails": _guard_rails(guards),
        "completed": completed,
        "counts": counts,
        "total": total,
        "accepted": accepted,
        "send_s": sent_s,
        "send_rate_per_s": accepted / send_window_s if send_window_s > 0 else None,
        "reports_s": reports_s,
        "lag": list(stats["lag"] or []),
        "retried": int(learning["retried"]),
        "suppressed_by_reports": int(learning["suppressed"]),
        "events": dict(learning["events"]),
    }


def _guard_rails(row: db.Record) -> str:
    """What the campaign's sending window, canary and brake were and did, in one line."""
    parts = []
    if row["window_start"] is not None:
        parts.append(
            f"window {row['window_start']:%H:%M}-{row['window_end']:%H:%M} recipients' local "
            f"time ({row['waiting_for_window']:,} waiting)"
        )
    if row["canary_size"] is not None:
        verdict = "judged, sending went on" if row["canary_judged_at"] else "not judged"
        if row["status"] == "paused" and (row["paused_reason"] or "").startswith("canary"):
            verdict = "failed, campaign paused"
        parts.append(f"canary {row['canary_size']:,} ({verdict})")
    if row["max_failure_ratio"] is not None:
        braked = row["status"] == "paused" and (row["paused_reason"] or "").startswith("brake")
        parts.append(
            f"brake at {row['max_failure_ratio']:.0%} failed"
            + (" (fired: paused)" if braked else " (not fired)")
        )
    return ", ".join(parts)


def _print_summary(
    summary: Mapping[str, Any], sim_stats: Mapping[str, Any], *, where: Where, campaign_id: int
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
    if summary.get("guard_rails"):
        out.write(f"  guard rails           {summary['guard_rails']}\n")
    lag = summary["lag"]
    if lag:
        out.write(
            f"  report lag            p50 {lag[0]:.2f} s  p95 {lag[1]:.2f} s  p99 {lag[2]:.2f} s\n"
        )
    out.write(
        f"  learnt from reports   {summary['retried']:,} sent once more (transient failure), "
        f"{summary['suppressed_by_reports']:,} numbers suppressed (do not exist)\n"
    )
    events = summary["events"]
    if events:
        kinds = ", ".join(f"{kind} {n:,}" for kind, n in sorted(events.items()))
        out.write(f"  events (outbox)       {sum(events.values()):,}: {kinds}\n")
    destinations = sim_stats.get("destinations", {})
    reports = sim_stats.get("reports", {})
    out.write(
        f"  simulator             {destinations.get('accepted', 0):,} destinations "
        f"accepted, {reports.get('sent', 0):,} reports sent\n"
    )
    out.write(f"\n  data: {where.database()}")
    if where.data_dir is not None:
        out.write(f", {_disk_size(where.data_dir)} on disk\n")
        out.write("        the next run replaces this campaign; campaign demo --reset deletes it\n")
    else:
        out.write("\n")
    out.write(f"  log:  {where.log_file}\n")
    out.write(f"  look: campaign status {campaign_id}    or in psql: table campaign.recipients\n")
    out.write(
        f"  page: campaign report {campaign_id} --html report.html    (its dashboard, as a file)\n"
    )
    out.flush()


def _server_pid(data_dir: Path) -> int | None:
    """The pid of a PostgreSQL server running in `data_dir`, from its postmaster.pid."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a stale file left by a crash
    except PermissionError:
        return pid
    return pid


def reset(settings: config.Settings) -> int:
    """Delete the embedded database the demo (and every command without a DSN) uses."""
    data_dir = embedded_data_dir(settings)
    if data_dir is None:
        print(
            "campaign demo --reset: a database DSN is configured; --reset deletes only the "
            "embedded database, so nothing was deleted",
            file=sys.stderr,
        )
        return 2
    if not data_dir.exists():
        print(f"campaign demo --reset: nothing to delete, {data_dir} does not exist")
        return 0
    if not (data_dir / "PG_VERSION").is_file():
        print(
            f"campaign demo --reset: {data_dir} is not a PostgreSQL data directory; "
            "not deleting it",
            file=sys.stderr,
        )
        return 2
    pid = _server_pid(data_dir)
    if pid is not None:
        print(
            f"campaign demo --reset: PostgreSQL (pid {pid}) is running in {data_dir}; "
            "stop the campaign command using it first",
            file=sys.stderr,
        )
        return 1
    size = _disk_size(data_dir)
    shutil.rmtree(data_dir)
    print(f"campaign demo --reset: deleted the embedded database {data_dir} ({size})")
    return 0


async def run(args: argparse.Namespace, settings: config.Settings) -> int:
    if args.reset:
        return reset(settings)
    if args.recipients < 10:
        print("campaign demo: --recipients must be at least 10", file=sys.stderr)
        return 2
    if args.rate <= 0:
        print("campaign demo: --rate must be greater than 0", file=sys.stderr)
        return 2
    log_file = Path(args.log_file) if args.log_file else default_log_file()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    # The demo's own service key and token are secrets too, wherever the log goes.
    secrets = [*settings.secrets(), SERVICE_KEY, TOKEN]
    screen = Screen(tty=sys.stderr.isatty())
    to_file = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    to_file.setFormatter(logs.formatter(json=True, secrets=secrets))
    logs.install(
        [to_file, screen.log_handler(secrets)], level=args.log_level or settings.logging.level
    )
    data_dir = embedded_data_dir(settings)
    screen.say(
        f"campaign demo: {args.recipients:,} recipients, rate limit {args.rate:,.0f} destinations/s"
    )
    if data_dir is not None:
        screen.say(f"  data: embedded PostgreSQL in {data_dir} (campaign demo --reset deletes it)")
    screen.say(f"  log:  {log_file} (every event, as JSON lines)")
    async with db.database(settings) as dsn:
        where = Where(dsn=dsn, data_dir=data_dir, log_file=log_file)
        if data_dir is None:
            screen.say(f"  data: {where.database()}")
        return await run_demo(
            dsn, settings, recipients=args.recipients, rate=args.rate, screen=screen, where=where
        )
