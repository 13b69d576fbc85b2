"""The stages of issue 7, each with the ceiling it is compared with.

submit     producer + senders (in this process) -> simulator (own process) -> results
           written; ceiling: a raw asyncpg + aiohttp loop doing the same claims, posts and
           unnest updates.
ingest     load generator (own process) -> WebhookServer -> committed; ceiling: a bare
           aiohttp handler that parses with orjson and commits the raw report through one
           asyncpg group-commit INSERT before it answers 200 (durable, what a user would
           build by hand); also printed: the ratio to a handler that parses and stores
           nothing.
reconcile  stored reports -> recipient statuses with the Reconciler; ceiling: one raw
           UPDATE ... FROM by transid.
e2e        recipients inserted -> all final with one report each: the simulator and one
           `campaign worker` (sender, webhooks, reconciler) in their own processes, one
           report per callback POST (the platform's shape); the ceiling is derived from the
           submit, durable ingest and reconcile ceilings (the raw paths one after the other),
           measured by this stage when the run has not measured them already.
e2e100     the same with 100 reports per callback POST: informational, no target.
e2e100_noevents  e2e100 with the event outbox off ([events] enabled = false): the pair
           gives the cost of the events (issue 16).
memory     RSS of a `campaign worker` process sending a large campaign; ceiling: its RSS
           idle.
latency    insert of a ready campaign -> first request at the simulator, p50 / p99;
           ceiling: a raw LISTEN that posts on the notification.
idle       a `campaign worker` (every role) with nothing to send: database commits per
           second (pg_stat_database.xact_commit of the run's database, which counts
           read-only transactions too) and its share of a core (/proc). Ceilings: the same
           window without the worker (commits) and a bare asyncio process holding a
           LISTEN connection (CPU). Then a second worker is SIGKILLed: seconds until the
           survivor takes its share (fleet takeover).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bench import harness
from bench.harness import SERVICE, SERVICE_KEY, WEBHOOK_TOKEN, Context, Result
from campaign import config, db
from campaign.batch import Lane
from campaign.producer import Producer
from campaign.reconciler import Reconciler
from campaign.sender import Sender, create_session, sessions_needed
from campaign.webhooks import WebhookServer

MESSAGING_PATH = "/resources/v1/messaging"
# The target column of a row kept for information (the table prints "-" as met).
INFORMATIONAL = "informational"
FINAL = ("delivered", "failed", "rejected", "invalid", "suppressed", "expired", "cancelled")


# --------------------------------------------------------------------------- submit


async def _wait_for(
    check: Callable[[], Awaitable[bool]], *, interval_s: float, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not done after {timeout_s} s")
        await asyncio.sleep(interval_s)


async def submit_pipeline(
    dsn: str,
    base_url: str,
    n: int,
    *,
    policy: config.PolicySettings | None = None,
    campaign: Mapping[str, object] | None = None,
) -> float:
    """Seconds for the product's producer and senders to send `n` pending recipients;
    `campaign`: columns of the campaign to set before it is sent (a policy of its own)."""
    service = config.ServiceSettings(
        key=SERVICE_KEY, sender_id="BENCH", rate_per_s=1_000_000.0, batch_size=1000
    )
    producer_settings = config.ProducerSettings()
    queries = db.load_queries()
    pool = await db.create_pool(dsn, min_size=2, max_size=10)
    try:
        async with pool.acquire() as conn:
            campaign_id = await harness.seed_recipients(conn, count=n, status="draft")
            columns = dict(campaign or {})
            assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns, start=2))
            await conn.execute(
                "UPDATE campaign.campaigns SET status = 'ready'"
                + (f", {assignments}" if assignments else "")
                + " WHERE id = $1",
                campaign_id,
                *columns.values(),
            )
        lane = Lane(name=SERVICE, settings=service, queue_size=producer_settings.queue_size)
        producer = Producer(
            pool=pool,
            queries=queries,
            lanes={SERVICE: lane},
            settings=producer_settings,
            worker_id="bench",
            notify_url=None,
            policy=policy,
        )
        watch = await db.connect(dsn)

        async def done() -> bool:
            sent = await watch.fetchval(
                "SELECT coalesce(sum(destinations), 0) FROM campaign.batches "
                "WHERE status NOT IN ('claimed', 'posting')"
            )
            return int(sent) >= n

        try:
            async with create_session(connections=sessions_needed([lane])) as session:
                sender = Sender(
                    pool=pool,
                    queries=queries,
                    lane=lane,
                    session=session,
                    api=config.ApiSettings(base_url=base_url),
                    producer=producer_settings,
                    worker_id="bench",
                    on_taken=producer.wake,
                )
                stop = asyncio.Event()
                started = time.monotonic()
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(producer.run(stop))
                    tg.create_task(sender.run(stop))
                    try:
                        # 20 ms: under 1 % of a run; polling less leaves the CPU to the pipeline.
                        await _wait_for(done, interval_s=0.02, timeout_s=300)
                    finally:
                        elapsed = time.monotonic() - started
                        stop.set()
            queued = await watch.fetchval(
                "SELECT count(*) FROM campaign.recipients WHERE status = 'queued'"
            )
        finally:
            await watch.close()
        if queued != n:
            raise RuntimeError(f"submit: {queued} of {n} recipients queued")
        return elapsed
    finally:
        await pool.close()


# The same index-friendly form as claim_batch (see producer.sql), so the ceiling is a fair one.
RAW_CLAIM = """
UPDATE campaign.recipients r SET status = 'sending'
  FROM (SELECT id FROM campaign.recipients
         WHERE campaign_id >= $1 AND campaign_id <= $1 AND status = 'pending'
         ORDER BY campaign_id, id LIMIT $2 FOR UPDATE SKIP LOCKED) p
 WHERE r.id = p.id
RETURNING r.id, r.msisdn, r.correlation_id
"""
RAW_RESULTS = """
UPDATE campaign.recipients r SET status = 'queued', transid = u.transid, sent_at = now()
  FROM unnest($1::bigint[], $2::text[]) AS u(id, transid)
 WHERE r.id = u.id
"""


async def submit_raw(dsn: str, base_url: str, n: int, *, in_flight: int = 4) -> float:
    """Seconds for a bare claim / post / unnest-update loop to send `n` recipients."""
    pool = await db.create_pool(dsn, min_size=in_flight, max_size=in_flight + 1)
    try:
        async with pool.acquire() as conn:
            campaign_id = await harness.seed_recipients(conn, count=n, status="running")

        async def loop(session: aiohttp.ClientSession) -> int:
            sent = 0
            while True:
                rows = await pool.fetch(RAW_CLAIM, campaign_id, 1000)
                if not rows:
                    return sent
                body = orjson.dumps(
                    {
                        "deliverychannel": "sms",
                        "channels": {
                            "sms": {"text": "Hello from the benchmark", "senderid": "BENCH"}
                        },
                        "destination": [
                            {"msisdn": [r["msisdn"]], "correlationid": r["correlation_id"]}
                            for r in rows
                        ],
                    }
                )
                async with session.post(
                    base_url + MESSAGING_PATH,
                    data=body,
                    headers={"key": SERVICE_KEY, "Content-Type": "application/json"},
                ) as resp:
                    answer = orjson.loads(await resp.read())
                by_correlation = {a["correlationid"]: a["transid"] for a in answer["response"]}
                await pool.execute(
                    RAW_RESULTS,
                    [r["id"] for r in rows],
                    [by_correlation[r["correlation_id"]] for r in rows],
                )
                sent += len(rows)

        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=in_flight)
        ) as session:
            started = time.monotonic()
            counts = await asyncio.gather(*(loop(session) for _ in range(in_flight)))
            elapsed = time.monotonic() - started
        if sum(counts) != n:
            raise RuntimeError(f"raw submit: {sum(counts)} of {n} sent")
        return elapsed
    finally:
        await pool.close()


async def submit_stage(
    ctx: Context,
    *,
    stage: str,
    simulator: str,
    notes: str,
    policy: config.PolicySettings | None = None,
    campaign: Mapping[str, object] | None = None,
) -> Result:
    """Rounds of the product's then the raw loop's sending of ctx.sizes.submit recipients,
    each from a freshly reset database to one simulator process; the best of each."""
    n = ctx.sizes.submit
    sim, base_url = await harness.start_simulator(ctx.work_dir, name=simulator)
    pipeline_runs: list[float] = []
    raw_runs: list[float] = []
    async with harness.running(sim):
        for _ in range(ctx.sizes.rounds):
            await harness.reset(ctx.dsn)
            pipeline_runs.append(
                await submit_pipeline(ctx.dsn, base_url, n, policy=policy, campaign=campaign)
            )
            await harness.reset(ctx.dsn)
            raw_runs.append(await submit_raw(ctx.dsn, base_url, n))
    pipeline_s, raw_s = min(pipeline_runs), min(raw_runs)
    figure, ceiling = n / pipeline_s, n / raw_s
    r = harness.ratio(figure, ceiling)
    return Result(
        stage=stage,
        unit="destinations/s",
        figure=figure,
        ceiling=ceiling,
        ratio=r,
        target=">= 25,000/s and >= 70% of raw",
        met=figure >= 25_000 and r >= 0.70,
        n=n,
        duration_s=pipeline_s,
        notes=f"{notes}; best of {len(raw_runs)}",
        details={"pipeline_runs_s": pipeline_runs, "raw_runs_s": raw_runs},
    )


async def submit(ctx: Context) -> Result:
    result = await submit_stage(
        ctx,
        stage="submit",
        simulator="simulator-submit",
        notes="same text for all; 1000 per request; 4 in flight",
    )
    ctx.ceilings["submit"] = result.ceiling
    return result


# --------------------------------------------------------------------------- ingest


async def _loadgen(
    ctx: Context, url: str, n: int, name: str, *, per_request: int = 1
) -> dict[str, Any]:
    process = await harness.spawn(
        name,
        [
            "-m", "bench.loadgen", "--url", url, "--requests", str(n),
            "--reports-per-request", str(per_request), "--timeout-s", "120",
        ],
        work_dir=ctx.work_dir,
    )  # fmt: skip
    code = await asyncio.wait_for(process.proc.wait(), timeout=180)
    text = process.log_text().strip().splitlines()
    if code != 0 or not text:
        raise RuntimeError(f"{name} failed ({code}): {process.log_text()[-2000:]}")
    result: dict[str, Any] = orjson.loads(text[-1])
    return result


@contextlib.asynccontextmanager
async def _serve(app: web.Application, port: int) -> Any:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield
    finally:
        await runner.cleanup()


def bare_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        orjson.loads(await request.read())
        return web.json_response({"status": "ok", "reports": 1})

    app = web.Application()
    app.router.add_post("/webhooks/dr/{token}", handle)
    return app


DURABLE_TABLE = "public.bench_durable_reports"
DURABLE_INSERT = f"""
INSERT INTO {DURABLE_TABLE} (body)
SELECT value FROM jsonb_array_elements($1::text::jsonb)
"""
OK_BODY = orjson.dumps({"status": "ok", "reports": 1})


def durable_app(pool: db.Pool) -> web.Application:
    """The receiver a user would write by hand: parse with orjson, no validation, and answer
    200 only once the raw report is committed; concurrent requests share one INSERT (group
    commit: the next group forms while one commits, never after a fixed sleep)."""
    waiting: list[tuple[bytes, asyncio.Future[None]]] = []
    wake = asyncio.Event()

    async def flush() -> None:
        while True:
            await wake.wait()
            wake.clear()
            while waiting:
                group = waiting[:]
                waiting.clear()
                # A POST of several reports is an array: its elements join the document.
                document = b"[" + b",".join(body for body, _ in group) + b"]"
                try:
                    await pool.execute(DURABLE_INSERT, document.decode())
                except Exception as exc:
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in group:
                        if not future.done():
                            future.set_result(None)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if isinstance(orjson.loads(body), list):
            body = body.strip()[1:-1]
        future = asyncio.get_running_loop().create_future()
        waiting.append((body, future))
        wake.set()
        await future
        return web.Response(body=OK_BODY, content_type="application/json")

    async def flusher(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(flush())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = web.Application()
    app.router.add_post("/webhooks/dr/{token}", handle)
    app.cleanup_ctx.append(flusher)
    return app


async def ingest(ctx: Context) -> Result:
    n = ctx.sizes.ingest
    product_runs: list[dict[str, Any]] = []
    durable_runs: list[dict[str, Any]] = []
    bare_runs: list[dict[str, Any]] = []
    for _ in range(ctx.sizes.rounds):
        product_runs.append(await _ingest_product(ctx, n))
        durable_runs.append(await _ingest_durable(ctx, n))
        bare_runs.append(await _ingest_bare(ctx, n))
    product = _fastest(product_runs)
    # Not a target: the same receiver when the platform sends 100 reports per POST, where
    # one request's overhead is shared.
    batched = await _ingest_product(ctx, max(1, n // 100), per_request=100)
    batched_rate = n // 100 * 100 / float(batched["duration_s"])
    batched_durable = await _ingest_durable(ctx, max(1, n // 100), per_request=100)
    ctx.ceilings["ingest100"] = n // 100 * 100 / float(batched_durable["duration_s"])
    figure = n / float(product["duration_s"])
    durable = n / float(_fastest(durable_runs)["duration_s"])
    bare = n / float(_fastest(bare_runs)["duration_s"])
    ctx.ceilings["ingest"] = durable
    ctx.ceilings["ingest_bare"] = bare
    r = harness.ratio(figure, durable)
    return Result(
        stage="ingest",
        unit="reports/s",
        figure=figure,
        ceiling=durable,
        ratio=r,
        target=">= 8,000/s and >= 80% of durable handler",
        met=figure >= 8_000 and r >= 0.80,
        n=n,
        duration_s=float(product["duration_s"]),
        notes=(
            f"1 report per POST, 32 connections; best of {len(durable_runs)}; "
            f"bare handler (stores nothing) {bare:,.0f}/s, "
            f"ratio {harness.ratio(figure, bare):.2f}; "
            f"100 per POST: {batched_rate:,.0f}/s (durable {ctx.ceilings['ingest100']:,.0f}/s)"
        ),
        details={
            "ceiling": "durable: bare aiohttp + orjson + one group-commit INSERT of the raw report",
            "bare_ceiling": bare,
            "bare_ratio": harness.ratio(figure, bare),
            "product_runs": product_runs,
            "durable_runs": durable_runs,
            "bare_runs": bare_runs,
            "batched": batched,
            "batched_durable": batched_durable,
        },
    )


def _fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return min(runs, key=lambda r: float(r["duration_s"]))


async def _ingest_product(ctx: Context, n: int, *, per_request: int = 1) -> dict[str, Any]:
    """The load generator against the product's receiver; its result and server stats."""
    await harness.reset(ctx.dsn)
    path = f"/webhooks/dr/{WEBHOOK_TOKEN}"
    pool = await db.create_pool(ctx.dsn, min_size=2, max_size=10)
    try:
        port = harness.free_port()
        server = WebhookServer(
            pool=pool,
            settings=config.WebhookSettings(listen=f"127.0.0.1:{port}", token=WEBHOOK_TOKEN),
            optout=config.OptOutSettings(),
            queries=db.load_queries(),
        )
        await server.start()
        try:
            product = await _loadgen(
                ctx, f"{server.url}{path}", n, "loadgen-ingest", per_request=per_request
            )
        finally:
            await server.stop()
        stored = await pool.fetchval("SELECT count(*) FROM campaign.delivery_reports")
    finally:
        await pool.close()
    if product["statuses"] != {"200": n} or stored != n * per_request:
        raise RuntimeError(f"ingest: answers {product['statuses']}, {stored} of {n} stored")
    product["server_stats"] = dict(vars_of(server.stats))
    return product


async def _ingest_bare(ctx: Context, n: int) -> dict[str, Any]:
    """The same load against a bare aiohttp handler that parses and answers 200."""
    port = harness.free_port()
    async with _serve(bare_app(), port):
        return await _loadgen(
            ctx, f"http://127.0.0.1:{port}/webhooks/dr/{WEBHOOK_TOKEN}", n, "loadgen-bare"
        )


async def _ingest_durable(ctx: Context, n: int, *, per_request: int = 1) -> dict[str, Any]:
    """The same load against the hand-built durable receiver; every report committed."""
    await harness.reset(ctx.dsn)
    pool = await db.create_pool(ctx.dsn, min_size=2, max_size=4)
    try:
        await pool.execute(
            f"CREATE TABLE IF NOT EXISTS {DURABLE_TABLE} ("
            "id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body jsonb NOT NULL, "
            "received_at timestamptz NOT NULL DEFAULT now())"
        )
        await pool.execute(f"TRUNCATE {DURABLE_TABLE}")
        port = harness.free_port()
        async with _serve(durable_app(pool), port):
            result = await _loadgen(
                ctx,
                f"http://127.0.0.1:{port}/webhooks/dr/{WEBHOOK_TOKEN}",
                n,
                "loadgen-durable",
                per_request=per_request,
            )
        stored = await pool.fetchval(f"SELECT count(*) FROM {DURABLE_TABLE}")
        await pool.execute(f"TRUNCATE {DURABLE_TABLE}")
    finally:
        await pool.close()
    if result["statuses"] != {"200": n} or stored != n * per_request:
        raise RuntimeError(
            f"durable ingest: answers {result['statuses']}, {stored} of {n * per_request} stored"
        )
    return result


def vars_of(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__slots__}


# --------------------------------------------------------------------------- reconcile

SEED_QUEUED = """
WITH c AS (
    INSERT INTO campaign.campaigns (name, service, body, status)
    VALUES ('bench', $2, 'Hello', 'running') RETURNING id
)
INSERT INTO campaign.recipients (campaign_id, msisdn, status, transid, sent_at, msisdn_e164)
SELECT c.id, '9198' || lpad(i::text, 8, '0'), 'queued', 'bench-' || i, now(),
       '+9198' || lpad(i::text, 8, '0')
  FROM c, generate_series(0, $1::int - 1) i
"""
SEED_REPORTS = """
INSERT INTO campaign.delivery_reports
       (transid, correlation_id, code, delivery_status, description, destination, reported_at, raw)
SELECT 'bench-' || i, 'r' || (i + 1), '7500', 'Delivered', 'Delivered',
       '9198' || lpad(i::text, 8, '0'), now(), '{}'::jsonb
  FROM generate_series(0, $1::int - 1) i
 ORDER BY random()
"""
RAW_RECONCILE = """
UPDATE campaign.recipients r
   SET status = 'delivered', dr_code = d.code, dr_status = d.delivery_status,
       dr_description = d.description, dr_at = d.reported_at, updated_at = now()
  FROM campaign.delivery_reports d
 WHERE d.transid = r.transid AND d.state = 'new'
"""


async def seed_reconcile(dsn: str, n: int) -> None:
    await harness.reset(dsn)
    conn = await db.connect(dsn)
    try:
        await conn.execute(SEED_QUEUED, n, SERVICE)
        await conn.execute(SEED_REPORTS, n)
        await conn.execute("ANALYZE campaign.recipients")
        await conn.execute("ANALYZE campaign.delivery_reports")
    finally:
        await conn.close()


async def reconcile_product(dsn: str, n: int) -> float:
    await seed_reconcile(dsn, n)
    pool = await db.create_pool(dsn, min_size=1, max_size=4)
    try:
        reconciler = Reconciler(
            pool=pool, settings=config.ReconcilerSettings(), queries=db.load_queries()
        )
        started = time.monotonic()
        matched = 0
        for _ in range(n):
            result = await reconciler.run_once()
            matched += result.reports_matched
            if not result.full:
                break
        elapsed = time.monotonic() - started
        delivered = await pool.fetchval(
            "SELECT count(*) FROM campaign.recipients WHERE status = 'delivered'"
        )
    finally:
        await pool.close()
    if matched != n or delivered != n:
        raise RuntimeError(f"reconcile: {matched} matched, {delivered} of {n} delivered")
    return elapsed


async def reconcile_raw(dsn: str, n: int) -> float:
    await seed_reconcile(dsn, n)
    conn = await db.connect(dsn)
    try:
        started = time.monotonic()
        status = await conn.execute(RAW_RECONCILE)
        elapsed = time.monotonic() - started
    finally:
        await conn.close()
    if int(status.split()[-1]) != n:
        raise RuntimeError(f"raw reconcile: {status}")
    return elapsed


async def reconcile(ctx: Context) -> Result:
    n = ctx.sizes.reconcile
    product_runs: list[float] = []
    raw_runs: list[float] = []
    for _ in range(ctx.sizes.rounds):
        product_runs.append(await reconcile_product(ctx.dsn, n))
        raw_runs.append(await reconcile_raw(ctx.dsn, n))
    product_s, raw_s = min(product_runs), min(raw_runs)
    figure, ceiling = n / product_s, n / raw_s
    ctx.ceilings["reconcile"] = ceiling
    return Result(
        stage="reconcile",
        unit="reports/s",
        figure=figure,
        ceiling=ceiling,
        ratio=harness.ratio(figure, ceiling),
        target=">= 30,000/s",
        met=figure >= 30_000,
        n=n,
        duration_s=product_s,
        notes=f"reports in random order, batch_size 5000; best of {len(raw_runs)}",
        details={"product_runs_s": product_runs, "raw_runs_s": raw_runs},
    )


# --------------------------------------------------------------------------- e2e


@contextlib.asynccontextmanager
async def _product(
    ctx: Context,
    name: str,
    *,
    flags: tuple[str, ...] = (),
    sim_settings: tuple[str, ...] = (),
    events: bool | None = None,
) -> Any:
    """The simulator and a `campaign worker` (with `flags`), both started and idle."""
    sim, base_url = await harness.start_simulator(
        ctx.work_dir, settings=sim_settings, name=f"simulator-{name}"
    )
    async with harness.running(sim):
        cfg = harness.write_config(
            ctx.work_dir / f"{name}.toml",
            base_url=base_url,
            webhooks_port=harness.free_port(),
            events=events,
        )
        worker = await harness.spawn(
            f"worker-{name}",
            ["-m", "campaign", "--config", str(cfg), "worker", *flags],
            work_dir=ctx.work_dir,
            env={"CAMPAIGN_DATABASE_DSN": ctx.dsn},
        )
        async with harness.running(worker):
            await harness.wait_log(worker, "worker_started")
            # The simulator's process, for its CPU time (see _e2e).
            worker.peer = sim
            yield worker, base_url


# Reports are not wanted where only sending is measured.
NO_REPORTS = ("faults.lost_report.probability=1.0",)
SENDER_ONLY = ("--no-webhooks", "--no-reconciler")


async def _submit_ceiling(ctx: Context) -> float:
    """The submit stage's ceiling alone: the raw claim / post / update loop."""
    n = ctx.sizes.submit
    sim, base_url = await harness.start_simulator(ctx.work_dir, name="simulator-submit-raw")
    runs: list[float] = []
    async with harness.running(sim):
        for _ in range(ctx.sizes.rounds):
            await harness.reset(ctx.dsn)
            runs.append(await submit_raw(ctx.dsn, base_url, n))
    return n / min(runs)


async def _ingest_ceiling(ctx: Context) -> float:
    """The ingest stage's (durable) ceiling alone: the hand-built receiver, one per POST."""
    n = ctx.sizes.ingest
    runs = [await _ingest_durable(ctx, n) for _ in range(ctx.sizes.rounds)]
    return n / float(_fastest(runs)["duration_s"])


async def _ingest100_ceiling(ctx: Context) -> float:
    """The same receiver when each POST carries 100 reports; reports/s."""
    posts = max(1, ctx.sizes.ingest // 100)
    runs = [await _ingest_durable(ctx, posts, per_request=100) for _ in range(ctx.sizes.rounds)]
    return posts * 100 / float(_fastest(runs)["duration_s"])


async def _reconcile_ceiling(ctx: Context) -> float:
    """The reconcile stage's ceiling alone: one raw UPDATE ... FROM."""
    n = ctx.sizes.reconcile
    return n / min([await reconcile_raw(ctx.dsn, n) for _ in range(ctx.sizes.rounds)])


# What end to end is derived from, and how to measure each when the run has not. The
# ingest ceiling is the durable receiver with as many reports per POST as the stage sends.
E2E_CEILINGS: dict[str, Callable[[Context], Awaitable[float]]] = {
    "submit": _submit_ceiling,
    "ingest": _ingest_ceiling,
    "ingest100": _ingest100_ceiling,
    "reconcile": _reconcile_ceiling,
}


def e2e_ceiling_names(per_post: int) -> list[str]:
    return ["submit", "ingest" if per_post == 1 else f"ingest{per_post}", "reconcile"]


async def derived_ceiling(ctx: Context, *, per_post: int = 1) -> tuple[float, list[str]]:
    """1 / sum(1 / ceiling) of the raw paths one after the other; the ceilings this run had
    not measured yet are measured now (and kept for later stages). Returns the ceiling and
    the names of the ceilings measured here."""
    names = e2e_ceiling_names(per_post)
    measured = []
    for name in names:
        if ctx.ceilings.get(name, 0.0) <= 0:
            ctx.ceilings[name] = await E2E_CEILINGS[name](ctx)
            measured.append(name)
    return 1 / sum(1 / ctx.ceilings[name] for name in names), measured


async def e2e(ctx: Context) -> Result:
    """End to end in the platform's shape: one delivery report per callback POST."""
    return await _e2e(ctx, per_post=1)


async def e2e100(ctx: Context) -> Result:
    """Informational: end to end with 100 reports per callback POST."""
    return await _e2e(ctx, per_post=100)


async def e2e100_noevents(ctx: Context) -> Result:
    """Informational: e2e100 with the event outbox off, so the pair prices the events."""
    return await _e2e(ctx, per_post=100, events=False)


async def _e2e(ctx: Context, *, per_post: int, events: bool | None = None) -> Result:
    n = ctx.sizes.e2e
    ceiling, measured = await derived_ceiling(ctx, per_post=per_post)
    await harness.reset(ctx.dsn)
    sim_settings = (f"dr_batch_size={per_post}", "dr_delay_min_s=0.1", "dr_delay_max_s=1.0")
    name = ("e2e" if per_post == 1 else f"e2e{per_post}") + ("_noevents" if events is False else "")
    async with _product(ctx, name, sim_settings=sim_settings, events=events) as (
        worker,
        base_url,
    ):
        sim = worker.peer
        assert sim is not None
        conn = await db.connect(ctx.dsn)
        try:
            campaign_id = await harness.seed_recipients(conn, count=n)
            started = time.monotonic()
            cpu_0 = {"worker": cpu_s(worker.pid), "simulator": cpu_s(sim.pid)}

            async def completed() -> bool:
                status = await conn.fetchval(
                    "SELECT status FROM campaign.campaigns WHERE id = $1", campaign_id
                )
                return bool(status == "completed")

            await _wait_for(completed, interval_s=0.05, timeout_s=max(120.0, n / 500))
            elapsed = time.monotonic() - started
            # Where the CPU went: the worker (sender, receiver, reconciler in one process)
            # and the simulator (API and callback client), in CPU microseconds per message.
            cpu_us = {
                "worker": (cpu_s(worker.pid) - cpu_0["worker"]) * 1e6 / n,
                "simulator": (cpu_s(sim.pid) - cpu_0["simulator"]) * 1e6 / n,
            }
            delivered = await conn.fetchval(
                "SELECT count(*) FROM campaign.recipients WHERE status = 'delivered'"
            )
            reports = await conn.fetchval("SELECT count(*) FROM campaign.delivery_reports")
        finally:
            await conn.close()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base_url}/simulate/stats?summary=1") as resp,
        ):
            sim_stats = await resp.json()
    if delivered != n or reports != n:
        raise RuntimeError(f"{name}: {delivered} delivered, {reports} reports, of {n}")
    figure = n / elapsed
    r = harness.ratio(figure, ceiling)
    notes = (
        f"insert committed -> campaign completed; DRs {per_post} per POST, 0.1-1 s late; "
        f"events {'off' if events is False else 'on'}; "
        f"CPU per message: worker {cpu_us['worker']:.0f} us, simulator "
        f"{cpu_us['simulator']:.0f} us"
    ) + (f"; ceilings measured here: {', '.join(measured)}" if measured else "")
    return Result(
        stage=name,
        unit="messages/s",
        figure=figure,
        ceiling=ceiling,
        ratio=r,
        target=">= 5,000/s and >= 80% of derived" if per_post == 1 else INFORMATIONAL,
        met=(figure >= 5_000 and r >= 0.80) if per_post == 1 else True,
        n=n,
        duration_s=elapsed,
        notes=notes,
        details={
            "ceiling": "derived: 1 / (1/submit + 1/ingest + 1/reconcile), raw ceilings; "
            f"ingest is the durable handler at {per_post} report(s) per POST",
            "ceilings": {k: ctx.ceilings[k] for k in e2e_ceiling_names(per_post)},
            "ceilings_measured_here": measured,
            "reports_per_post": per_post,
            "cpu_us_per_message": cpu_us,
            "simulator": {
                "accepted": sim_stats["destinations"]["accepted"],
                "duplicate_msisdns": sim_stats["destinations"]["duplicate_msisdns"],
                "reports": sim_stats["reports"],
            },
        },
    )


# --------------------------------------------------------------------------- memory


def _rss_mb(pid: int) -> float:
    """Resident set size from /proc (Linux), so the bench needs no extra dependency."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def memory(ctx: Context) -> Result:
    n = ctx.sizes.memory
    await harness.reset(ctx.dsn)
    async with _product(ctx, "memory", flags=SENDER_ONLY, sim_settings=NO_REPORTS) as (worker, _):
        await asyncio.sleep(1.0)
        idle_mb = _rss_mb(worker.pid)
        conn = await db.connect(ctx.dsn)
        try:
            # Drafted first, so the worker samples while sending, not while rows arrive.
            campaign_id = await harness.seed_recipients(conn, count=n, status="draft")
            await conn.execute(
                "UPDATE campaign.campaigns SET status = 'ready' WHERE id = $1", campaign_id
            )
            started = time.monotonic()
            samples: list[tuple[float, float]] = []  # (progress, rss MB)
            deadline = started + max(120.0, n / 2000)
            while True:
                sent = int(
                    await conn.fetchval(
                        "SELECT coalesce(sum(destinations), 0) FROM campaign.batches "
                        "WHERE status NOT IN ('claimed', 'posting')"
                    )
                )
                samples.append((sent / n, _rss_mb(worker.pid)))
                if sent >= n:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"memory: {sent} of {n} sent")
                await asyncio.sleep(0.5)
            elapsed = time.monotonic() - started
        finally:
            await conn.close()
    peak = max(mb for _, mb in samples)
    early = [mb for progress, mb in samples if 0.2 <= progress <= 0.3] or [samples[0][1]]
    late = [mb for progress, mb in samples if progress >= 0.5] or [samples[-1][1]]
    growth = max(late) - max(early)
    flat = growth <= max(10.0, 0.05 * peak)
    return Result(
        stage="memory",
        unit="MB RSS",
        figure=peak,
        ceiling=idle_mb,
        ratio=harness.ratio(idle_mb, peak),
        target="< 200 MB, flat",
        met=peak < 200 and flat,
        n=n,
        duration_s=elapsed,
        notes=f"growth after 25% sent: {growth:+.1f} MB; {n / elapsed:,.0f} destinations/s",
        details={
            "idle_mb": idle_mb,
            "growth_mb": growth,
            "samples": [
                (round(p, 3), round(mb, 1)) for p, mb in samples[:: max(1, len(samples) // 200)]
            ],
        },
    )


# --------------------------------------------------------------------------- latency


async def _requests_seen(session: aiohttp.ClientSession, base_url: str) -> int:
    async with session.get(f"{base_url}/simulate/stats?summary=1") as resp:
        stats = await resp.json()
    return int(stats["requests"]["total"])


async def _first_request_s(
    conn: db.Connection, session: aiohttp.ClientSession, base_url: str
) -> float:
    """Insert a ready campaign of 10 recipients; seconds until the simulator saw a request."""
    before = await _requests_seen(session, base_url)
    async with conn.transaction():
        campaign_id = await conn.fetchval(
            "INSERT INTO campaign.campaigns (name, service, body, status) "
            "VALUES ('latency', $1, 'Hello', 'ready') RETURNING id",
            SERVICE,
        )
        await harness.insert_recipients(conn, campaign_id, 10)
    committed = time.monotonic()
    deadline = committed + 10
    while await _requests_seen(session, base_url) == before:
        if time.monotonic() > deadline:
            raise TimeoutError("latency: no request within 10 s")
        await asyncio.sleep(0.002)
    return time.monotonic() - committed


async def _trials(ctx: Context, base_url: str) -> list[float]:
    conn = await db.connect(ctx.dsn)
    try:
        async with aiohttp.ClientSession() as session:
            seconds = []
            for trial in range(ctx.sizes.latency_trials):
                # Off the poll interval's phase, so polling cannot pass for NOTIFY.
                await asyncio.sleep(0.15 + 0.07 * (trial % 5))
                seconds.append(await _first_request_s(conn, session, base_url))
            return seconds
    finally:
        await conn.close()


async def _raw_listener(dsn: str, base_url: str) -> Any:
    """LISTEN campaign_work and post one destination on every notification."""
    conn = await db.connect(dsn)
    session = aiohttp.ClientSession()
    tasks: set[asyncio.Task[None]] = set()
    body = orjson.dumps(
        {
            "deliverychannel": "sms",
            "channels": {"sms": {"text": "Hello", "senderid": "BENCH"}},
            "destination": [{"msisdn": ["919800000001"], "correlationid": "raw"}],
        }
    )

    async def post() -> None:
        async with session.post(
            base_url + MESSAGING_PATH,
            data=body,
            headers={"key": SERVICE_KEY, "Content-Type": "application/json"},
        ) as resp:
            await resp.read()

    def on_notify(*_: object) -> None:
        task = asyncio.ensure_future(post())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await conn.add_listener("campaign_work", on_notify)

    async def close() -> None:
        await conn.close()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()

    return close


async def latency(ctx: Context) -> Result:
    await harness.reset(ctx.dsn)
    async with _product(ctx, "latency", flags=SENDER_ONLY, sim_settings=NO_REPORTS) as (
        _,
        base_url,
    ):
        product = await _trials(ctx, base_url)
    await harness.reset(ctx.dsn)
    sim, base_url = await harness.start_simulator(ctx.work_dir, name="simulator-latency-raw")
    async with harness.running(sim):
        close = await _raw_listener(ctx.dsn, base_url)
        try:
            raw = await _trials(ctx, base_url)
        finally:
            await close()
    p50, p99 = harness.percentile(product, 0.5), harness.percentile(product, 0.99)
    raw_p99 = harness.percentile(raw, 0.99)
    return Result(
        stage="latency",
        unit="s p99",
        figure=p99,
        ceiling=raw_p99,
        ratio=harness.ratio(raw_p99, p99),
        target="< 1 s p99",
        met=p99 < 1.0,
        n=len(product),
        duration_s=sum(product),
        notes=f"p50 {p50 * 1000:.0f} ms (raw {harness.percentile(raw, 0.5) * 1000:.0f} ms)",
        details={"trials_s": product, "raw_trials_s": raw, "p50_s": p50},
    )


# --------------------------------------------------------------------------- idle

IDLE_COMMITS_TARGET = 1.0
IDLE_CPU_TARGET = 0.5  # percent of one core
TAKEOVER_TARGET_S = 5.0
IDLE_SETTLE_S = 12.0
# A bare asyncio process that only holds a LISTEN connection: the least an idle worker
# that still wakes on NOTIFY could cost.
BARE_IDLE = """
import asyncio, sys
import asyncpg

async def main():
    conn = await asyncpg.connect(sys.argv[1])
    await conn.add_listener("campaign_work", lambda *a: None)
    print("listening", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far, from /proc/PID/stat (Linux)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces: the fields after its closing parenthesis.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def xact_commits(conn: db.Connection) -> int:
    """Commits of this database so far (pg_stat_database, read in a fresh snapshot)."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(
        await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
    )


async def _idle_window(
    conn: db.Connection, pid: int | None, window_s: float
) -> tuple[float, float]:
    """Commits per second of the database and the process's % of a core over `window_s`.

    Our own two probes are subtracted. Backends flush their counters to pg_stat_database
    when they go idle, at most once a second (at the latest ten seconds later): the window
    is long enough for that to be noise.
    """
    commits_0 = await xact_commits(conn)
    cpu_0 = cpu_s(pid) if pid else 0.0
    started = time.monotonic()
    await asyncio.sleep(window_s)
    elapsed = time.monotonic() - started
    cpu_1 = cpu_s(pid) if pid else 0.0
    # Let the last second's counters reach the shared statistics.
    await asyncio.sleep(1.5)
    commits_1 = await xact_commits(conn)
    # Each probe's SELECTs are committed too: pg_stat_clear_snapshot and the read.
    own = 2
    return max(0, commits_1 - commits_0 - own) / elapsed, 100 * (cpu_1 - cpu_0) / elapsed


async def _takeover_s(ctx: Context, base_url: str) -> tuple[float, dict[str, Any]]:
    """Two idle workers for one service; SIGKILL one; seconds until the other logged that
    it sends alone (fleet_rate_changed with live_workers 1)."""
    procs = []
    for name in ("a", "b"):
        cfg = harness.write_config(
            ctx.work_dir / f"takeover-{name}.toml",
            base_url=base_url,
            webhooks_port=harness.free_port(),
        )
        procs.append(
            await harness.spawn(
                f"worker-takeover-{name}",
                ["-m", "campaign", "--config", str(cfg), "worker", "--worker-id", f"take-{name}",
                 *SENDER_ONLY],
                work_dir=ctx.work_dir,
                env={"CAMPAIGN_DATABASE_DSN": ctx.dsn},
            )
        )  # fmt: skip
    survivor, victim = procs
    try:
        for proc in procs:
            await harness.wait_log(proc, "worker_started")

        def sizes() -> list[int]:
            return [
                int(line["live_workers"])
                for line in _events(survivor)
                if line.get("event") == "fleet_rate_changed"
            ]

        deadline = time.monotonic() + 60
        while sizes()[-1:] != [2]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"takeover: the survivor never saw two workers: {sizes()}")
            await asyncio.sleep(0.05)
        # Past the start-up: the workers are idle, as they would be when one dies.
        await asyncio.sleep(3.0)
        seen = len(sizes())
        victim.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await victim.proc.wait()
        while 1 not in sizes()[seen:]:
            if time.monotonic() > killed + 60:
                raise TimeoutError("takeover: the survivor never took the whole rate")
            await asyncio.sleep(0.02)
        return time.monotonic() - killed, {"fleet_sizes": sizes()}
    finally:
        for proc in procs:
            await proc.stop()


def _events(process: harness.Process) -> list[dict[str, Any]]:
    events = []
    for line in process.log_text().splitlines():
        with contextlib.suppress(ValueError):
            event = orjson.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events


async def idle(ctx: Context) -> list[Result]:
    window_s = ctx.sizes.idle_s
    await harness.reset(ctx.dsn)
    conn = await db.connect(ctx.dsn)
    try:
        # The database alone over the same window: what the worker is compared with.
        background, _ = await _idle_window(conn, None, window_s)
        bare = await harness.spawn("bare-idle", ["-c", BARE_IDLE, ctx.dsn], work_dir=ctx.work_dir)
        async with harness.running(bare):
            while "listening" not in bare.log_text():
                if bare.proc.returncode is not None:
                    raise RuntimeError(f"bare idle process: {bare.log_text()[-2000:]}")
                await asyncio.sleep(0.05)
            _, bare_cpu = await _idle_window(conn, bare.pid, window_s)
        async with _product(ctx, "idle") as (worker, _):
            # Past the start-up (fleet join, recovery's first pass, the first polls), and
            # past the counters of its burst of commits: a backend that committed within a
            # second of its last report holds its counts for up to 10 s (PostgreSQL's
            # PGSTAT_IDLE_INTERVAL), so after 5 s they fell into the window.
            await asyncio.sleep(IDLE_SETTLE_S)
            commits, cpu = await _idle_window(conn, worker.pid, window_s)
        await harness.reset(ctx.dsn)
        sim, base_url = await harness.start_simulator(ctx.work_dir, name="simulator-takeover")
        async with harness.running(sim):
            takeover, takeover_details = await _takeover_s(ctx, base_url)
    finally:
        await conn.close()
    worker_commits = max(0.0, commits - background)
    common = {"window_s": window_s, "background_commits_per_s": background}
    return [
        Result(
            stage="idle-commits",
            unit="commits/s",
            figure=worker_commits,
            ceiling=0.0,
            ratio=0.0,
            target=f"<= {IDLE_COMMITS_TARGET:g} commit/s per idle worker",
            met=worker_commits <= IDLE_COMMITS_TARGET,
            n=1,
            duration_s=window_s,
            notes=(
                f"xact_commit of the database over {window_s:.0f} s, less "
                f"{background:.2f}/s without the worker; ceiling: none (0)"
            ),
            details={**common, "commits_per_s_with_worker": commits},
        ),
        Result(
            stage="idle-cpu",
            unit="% of a core",
            figure=cpu,
            ceiling=bare_cpu,
            ratio=harness.ratio(bare_cpu, cpu),
            target=f"<= {IDLE_CPU_TARGET:g} % of a core",
            met=cpu <= IDLE_CPU_TARGET,
            n=1,
            duration_s=window_s,
            notes="utime + stime from /proc; ceiling: a bare asyncio LISTEN process",
            details=common,
        ),
        Result(
            stage="takeover",
            unit="s after a SIGKILL",
            figure=takeover,
            ceiling=0.0,
            ratio=0.0,
            target=f"< {TAKEOVER_TARGET_S:g} s",
            met=takeover < TAKEOVER_TARGET_S,
            n=1,
            duration_s=takeover,
            notes="2 idle workers, one killed -> the other logs it sends alone",
            details=takeover_details,
        ),
    ]


StageResult = Result | list[Result]
STAGES: dict[str, Callable[[Context], Awaitable[StageResult]]] = {
    "submit": submit,
    "ingest": ingest,
    "reconcile": reconcile,
    "e2e": e2e,
    "e2e100": e2e100,
    "e2e100_noevents": e2e100_noevents,
    "memory": memory,
    "latency": latency,
    "idle": idle,
}
