"""An idle `campaign worker` (every role, nothing to send) leaves the database nearly
alone: what it costs is an invariant of how it waits, not a speed. Its commits are
counted in pg_stat_database.xact_commit of the test's own database, which only this
worker and the test's probes use. How few exactly is measured by bench/ (the idle stage).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from tests.helpers.proc import Processes, free_port, webhooks_at, write_config

# Past the start-up (registration, recovery's first pass, the first polls and sweeps) and
# its counters: a backend may hold its counts up to 10 s before reporting them.
SETTLE_S = 12.0
WINDOW_S = 12.0
# The target is 1 commit/s (docs/performance.md, idle); the bound leaves room for a
# loaded machine. Before the idle backoff a worker made 11-16 commits/s.
MAX_COMMITS_PER_S = 2.0


async def xact_commits(conn: asyncpg.Connection) -> int:
    """This database's commits so far, read in a fresh statistics snapshot."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(
        await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
    )


async def test_an_idle_worker_commits_at_most_a_few_times_in_a_window(
    conn: asyncpg.Connection, dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    # The product's own intervals, not the tests' scaled-down ones.
    cfg = write_config(
        tmp_path / "idle.toml",
        webhooks=webhooks_at(free_port()),
        producer=None,
        reconciler=None,
        worker=None,
    )
    worker = await campaign_process.start("worker", config=cfg, dsn=dsn)
    await worker.wait_event("worker_started")
    await asyncio.sleep(SETTLE_S)
    before = await xact_commits(conn)
    await asyncio.sleep(WINDOW_S)
    # Backends report their counters when idle, at most once a second: let the last in.
    await asyncio.sleep(1.5)
    after = await xact_commits(conn)
    # Our own two probes (the snapshot clear and the read) commit too.
    commits = after - before - 2
    assert commits <= MAX_COMMITS_PER_S * WINDOW_S, (
        f"{commits} commits in {WINDOW_S:.0f} s of an idle worker"
    )
    assert await worker.stop() == 0, worker.log()
