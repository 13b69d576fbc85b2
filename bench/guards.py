"""The stages of issue 14 (guard rails), beside those of bench/stages.py.

check          `campaign check` over a draft campaign of distinct numbers (1,000,000 by
               default): recipients checked per second; target: the whole list in under
               30 s. Ceiling: a bare loop reading the same pages and normalising each
               number, the one step no check can skip.
submit_capped  the submit stage with `[policy] max_per_msisdn` configured (no number
               reaches it: every row pays the locks, the count and the reservation);
               ceiling: the raw submit loop, as for submit.
submit_windowed  the submit stage with a sending window on the campaign, open now in the
               recipients' zone (every row pays the local-time check, none waits).
submit_nodup   the submit stage with `allow_duplicates` on the campaign: the duplicate
               rule (on in submit, as by default) off, so the pair prices it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from bench import harness, stages
from bench.harness import SERVICE, SERVICE_KEY, Context, Result
from campaign import config, db, sms
from campaign.commands import check as check_command

CHECK_TARGET_S = 30.0
PAGE = check_command.PAGE


async def _check_product(dsn: str, campaign_id: int) -> tuple[float, int]:
    settings = config.Settings(
        services={SERVICE: config.ServiceSettings(key=SERVICE_KEY, sender_id="BENCH")}
    )
    queries = db.require(db.load_queries(), check_command.QUERIES)
    conn = await db.connect(dsn)
    try:
        started = time.monotonic()
        async with conn.transaction(readonly=True, isolation="repeatable_read"):
            report = await check_command.check(conn, queries, campaign_id, settings)
        return time.monotonic() - started, report.checked
    finally:
        await conn.close()


async def _check_raw(dsn: str, campaign_id: int) -> tuple[float, int]:
    conn = await db.connect(dsn)
    try:
        started = time.monotonic()
        after, seen = 0, 0
        while True:
            rows = await conn.fetch(
                "SELECT id, msisdn FROM campaign.recipients"
                " WHERE campaign_id >= $1 AND campaign_id <= $1 AND id > $2"
                " AND status = 'pending' ORDER BY campaign_id, id LIMIT $3",
                campaign_id,
                after,
                PAGE,
            )
            if not rows:
                break
            after = rows[-1]["id"]
            for r in rows:
                sms.normalise_msisdn(r["msisdn"])
            seen += len(rows)
        return time.monotonic() - started, seen
    finally:
        await conn.close()


async def check(ctx: Context) -> Result:
    n = ctx.sizes.check
    await harness.reset(ctx.dsn)
    conn = await db.connect(ctx.dsn)
    try:
        campaign_id = await harness.seed_recipients(conn, count=n, status="draft")
    finally:
        await conn.close()
    product: list[float] = []
    raw: list[float] = []
    for _ in range(ctx.sizes.rounds):
        seconds, checked = await _check_product(ctx.dsn, campaign_id)
        if checked != n:
            raise RuntimeError(f"check: {checked} of {n} recipients checked")
        product.append(seconds)
        raw.append((await _check_raw(ctx.dsn, campaign_id))[0])
    best, ceiling_s = min(product), min(raw)
    # The target is for 1,000,000 recipients: scaled to the size run.
    allowed_s = CHECK_TARGET_S * n / 1_000_000
    return Result(
        stage="check",
        unit="recipients/s",
        figure=n / best,
        ceiling=n / ceiling_s,
        ratio=harness.ratio(n / best, n / ceiling_s),
        target="1,000,000 in < 30 s",
        met=best < allowed_s,
        n=n,
        duration_s=best,
        notes=f"distinct numbers, one text; best of {len(product)}",
        details={"check_runs_s": product, "raw_runs_s": raw},
    )


async def submit_capped(ctx: Context) -> Result:
    return await stages.submit_stage(
        ctx,
        stage="submit_capped",
        simulator="simulator-capped",
        notes="max_per_msisdn = 3, none reached",
        policy=config.PolicySettings(max_per_msisdn=3),
    )


# The bench's numbers (+91 98...) have one zone.
BENCH_ZONE = ZoneInfo("Asia/Kolkata")


async def submit_windowed(ctx: Context) -> Result:
    # Open from three hours ago to three hours ahead, local time: a whole run sends in it.
    now = datetime.now(UTC).astimezone(BENCH_ZONE).replace(second=0, microsecond=0)
    start, end = (now - timedelta(hours=3)).time(), (now + timedelta(hours=3)).time()
    return await stages.submit_stage(
        ctx,
        stage="submit_windowed",
        simulator="simulator-windowed",
        notes=f"window {start:%H:%M}-{end:%H:%M} Asia/Kolkata, open for every row",
        campaign={"window_start": start, "window_end": end},
    )


async def submit_nodup(ctx: Context) -> Result:
    return await stages.submit_stage(
        ctx,
        stage="submit_nodup",
        simulator="simulator-nodup",
        notes="allow_duplicates = true: the duplicate rule off",
        campaign={"allow_duplicates": True},
    )


STAGES: dict[str, Callable[[Context], Awaitable[stages.StageResult]]] = {
    **stages.STAGES,
    "check": check,
    "submit_capped": submit_capped,
    "submit_windowed": submit_windowed,
    "submit_nodup": submit_nodup,
}
