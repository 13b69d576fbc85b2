"""The fault matrix's harness: real `python -m campaign` processes (tests/helpers/proc.py),
the simulator in this process, a campaign's ledger checked against what the simulator
accepted.

`FaultRun` starts the webhooks process (receiver + reconciler) and workers against one
database; `ledger()` compares every recipient with the simulator's record; `RESULTS`
collects one summary row per fault for the terminal summary (tests/faults/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from campaign.simulator import Simulator, SimulatorConfig
from tests.helpers.proc import (
    SERVICE_KEY,
    CampaignProcess,
    Processes,
    free_port,
    processes,
    webhooks_at,
    write_config,
)
from tests.helpers.seed import campaign_with_recipients

FINAL = frozenset(
    {"delivered", "failed", "rejected", "invalid", "suppressed", "expired", "cancelled"}
)
RECIPIENTS = 20_000


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the summary table."""

    fault: str
    recipients: int
    lost: int
    duplicated: int
    in_doubt: int
    time_s: float


RESULTS: list[Row] = []
# Lines of the soak's report (rate, p99 answer time, memory), printed with the table.
SOAK: list[str] = []


def summary_table(rows: Sequence[Row]) -> str:
    """The summary as a Markdown table (printed at the end of the run, kept in the docs)."""
    lines = [
        "| fault | recipients | lost | duplicated | in doubt | time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r.fault} | {r.recipients} | {r.lost} | {r.duplicated} | {r.in_doubt} "
            f"| {r.time_s:.1f} |"
        )
    return "\n".join(lines)


def sim_config(**knobs: Any) -> SimulatorConfig:
    """Reports within 10-150 ms, in arrays of 100; failed callbacks retried for ~10 s."""
    values: dict[str, Any] = {
        "keys": (SERVICE_KEY,),
        "dr_delay_min_s": 0.01,
        "dr_delay_max_s": 0.15,
        "dr_batch_size": 100,
        "callback_retries": 20,
        "callback_retry_interval_s": 0.5,
        "dr_timeout_s": 5.0,
        "seed": 8,
    } | knobs
    return SimulatorConfig(**values)


def fault_config(
    path: Path,
    *,
    base_url: str,
    webhook_port: int,
    service: Mapping[str, Any] | None = None,
    api_timeout_s: float = 2.0,
    lease_s: float = 3.0,
) -> Path:
    """The test config scaled for the fault runs: fast polls, short leases and backoff."""
    return write_config(
        path,
        api={"base_url": base_url, "timeout_s": api_timeout_s},
        services={
            "default": {
                "sender_id": "FAULTS",
                "rate_per_s": 20_000.0,
                "batch_size": 1000,
                "max_in_flight": 4,
                "in_doubt_grace_s": 15.0,
                "max_attempts": 20,
            }
            | dict(service or {})
        },
        producer={
            "poll_interval_s": 0.1,
            "lease_s": lease_s,
            "backoff_base_s": 0.05,
            "backoff_max_s": 0.5,
            "recovery_interval_s": 0.25,
        },
        webhooks=webhooks_at(webhook_port) | {"store_timeout_s": 3.0},
        worker={"shutdown_grace_s": 5.0, "stats_interval_s": 5.0},
    )


@dataclass
class FaultRun:
    """Processes of one fault run against one database; all killed on exit."""

    dsn: str
    config_path: Path
    webhook_port: int
    started: Processes

    @property
    def processes(self) -> list[CampaignProcess]:
        return self.started.started

    async def start_webhooks(self) -> CampaignProcess:
        process = await self.started.start(
            "webhooks", config=self.config_path, dsn=self.dsn, name="webhooks"
        )
        await process.wait_http(f"http://127.0.0.1:{self.webhook_port}/healthz")
        return process

    async def start_worker(self, name: str, *, drain: bool = False) -> CampaignProcess:
        # The receiver and reconciler run in their own process (start_webhooks), so
        # several senders can share one database and one DR URL.
        args = ["--worker-id", name, "--no-webhooks", "--no-reconciler"]
        args += ["--drain"] if drain else []
        return await self.started.start(
            "worker", *args, config=self.config_path, dsn=self.dsn, name=name
        )

    def outputs(self) -> str:
        return self.started.outputs()


@contextlib.asynccontextmanager
async def fault_run(
    dsn: str,
    sim: Simulator,
    workdir: Path,
    *,
    service: Mapping[str, Any] | None = None,
    api_timeout_s: float = 2.0,
    lease_s: float = 3.0,
) -> AsyncIterator[FaultRun]:
    port = free_port()
    config_path = fault_config(
        workdir / "campaign.toml",
        base_url=sim.base_url,
        webhook_port=port,
        service=service,
        api_timeout_s=api_timeout_s,
        lease_s=lease_s,
    )
    async with processes(workdir) as started:
        yield FaultRun(dsn=dsn, config_path=config_path, webhook_port=port, started=started)


async def seed(conn: asyncpg.Connection, count: int = RECIPIENTS, *, status: str = "ready") -> int:
    """A campaign of `count` valid, distinct numbers, inserted in one transaction."""
    return await campaign_with_recipients(
        conn,
        count,
        name="faults",
        body="Fault run $(n)",
        status=status,
        variables=lambda i: {"n": i},
    )


async def wait_final(
    conn: asyncpg.Connection, campaign_id: int, *, timeout_s: float = 180.0
) -> dict[str, int]:
    """Until no recipient is pending, sending, queued or unknown (a safety limit only).

    Generous: the ledger, not the time, is what this matrix checks. (A match statement
    once stalled past its 30 s step timeout twice in a row here: a quadratic plan made
    from statistics older than the backlog, fixed in reconciler.sql and pinned by
    test_a_backlog_met_with_old_statistics_costs_linear_work.)"""
    deadline = time.monotonic() + timeout_s
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        rows = await conn.fetch(
            "SELECT status, count(*) AS n FROM campaign.recipients WHERE campaign_id = $1 "
            "GROUP BY status",
            campaign_id,
        )
        counts = {r["status"]: r["n"] for r in rows}
        if set(counts) <= FINAL:
            return counts
        await asyncio.sleep(0.2)
    return counts


@dataclass(frozen=True, slots=True)
class Ledger:
    recipients: int
    statuses: Mapping[str, int]
    lost: int
    duplicated: int
    in_doubt: int
    accepted: int
    problems: tuple[str, ...]


async def ledger(conn: asyncpg.Connection, sim: Simulator, campaign_id: int) -> Ledger:
    """Compare the campaign's recipients with what the simulator accepted.

    Every DR comes from the simulator and carries the transid it issued with the
    destination's correlation id, so the delivery_reports table is the simulator's record
    of (correlation id, transid) pairs; its counters give how often each id was accepted.
    """
    stats = sim.stats()
    accepted_by_corr: dict[str, int] = stats["correlation_ids"]
    rows = await conn.fetch(
        "SELECT id, correlation_id, status, transid, attempts, dr_code FROM campaign.recipients "
        "WHERE campaign_id = $1",
        campaign_id,
    )
    issued = {
        (r["correlation_id"], r["transid"])
        for r in await conn.fetch(
            "SELECT DISTINCT correlation_id, transid FROM campaign.delivery_reports "
            "WHERE transid IS NOT NULL AND correlation_id IN (SELECT correlation_id "
            "FROM campaign.recipients WHERE campaign_id = $1)",
            campaign_id,
        )
    }
    # Reports that left the transid out (the transid_missing fault): the simulator's list.
    omitted: dict[str, list[str]] = stats.get("transids_omitted", {})
    issued |= {(c, t) for c, ts in omitted.items() for t in ts}
    in_doubt = int(
        await conn.fetchval(
            "SELECT coalesce(sum(destinations), 0) FROM campaign.batches "
            "WHERE campaign_id = $1 AND status IN ('in_doubt', 'abandoned')",
            campaign_id,
        )
    )
    problems: list[str] = []
    statuses: dict[str, int] = {}
    lost = 0
    mine = set()
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        corr = r["correlation_id"]
        mine.add(corr)
        times = accepted_by_corr.get(corr, 0)
        if r["status"] != "delivered" or times == 0:
            lost += 1
            if len(problems) < 5:
                problems.append(f"recipient {r['id']} {r['status']} accepted {times}x")
            continue
        # In doubt and settled by reports without a transid: the row never learned it.
        unlearned = r["transid"] is None and corr in omitted
        if (corr, r["transid"]) not in issued and not unlearned:
            problems.append(f"recipient {r['id']}: transid {r['transid']} not issued for it")
        if times > 1 and r["attempts"] < times:
            problems.append(
                f"recipient {r['id']} accepted {times}x but only {r['attempts']} attempts "
                "were counted: a duplicate without doubt"
            )
    strangers = set(accepted_by_corr) - mine
    if strangers:
        problems.append(f"{len(strangers)} accepted correlation ids belong to no recipient")
    duplicated = sum(times - 1 for times in accepted_by_corr.values() if times > 1)
    if duplicated > in_doubt:
        problems.append(f"{duplicated} duplicates but only {in_doubt} destinations in doubt")
    # The outbox: one recipient_final event per recipient, with its final status (a final
    # status replaced by another writes one more; under these faults none is).
    events = {
        r["recipient_id"]: (r["n"], r["status"])
        for r in await conn.fetch(
            "SELECT recipient_id, count(*) AS n, max(status) AS status FROM campaign.events "
            "WHERE kind = 'recipient_final' AND campaign_id = $1 GROUP BY recipient_id",
            campaign_id,
        )
    }
    wrong = [r["id"] for r in rows if events.get(r["id"]) != (1, r["status"])]
    if wrong:
        problems.append(
            f"{len(wrong)} recipients without exactly one recipient_final event of their "
            f"status, e.g. {wrong[0]}: {events.get(wrong[0])}"
        )
    transids = {t for _, t in issued}
    if len(transids) != stats["destinations"]["accepted"]:
        problems.append(
            f"simulator accepted {stats['destinations']['accepted']} destinations, "
            f"{len(transids)} transids reached the database"
        )
    return Ledger(
        recipients=len(rows),
        statuses=statuses,
        lost=lost,
        duplicated=duplicated,
        in_doubt=in_doubt,
        accepted=stats["destinations"]["accepted"],
        problems=tuple(problems[:20]),
    )
