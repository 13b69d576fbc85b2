"""`campaign prune`: retention, so a year of traffic keeps the hot tables and indexes small.

Deletes, by age and per the `[retention]` settings, finished campaigns with their recipients
and batches, matched and orphaned delivery reports, finished batches, incoming messages,
webhook rejects, events (those a configured forwarder has not delivered are kept)
and long-dead workers. Every statement deletes at most `batch_size` rows
in its own transaction and skips locked rows, so it runs safely next to the workers.
A campaign's every chunk checks again that it is still finished and old enough (and
deletes only final recipients and finished batches), so a reopen or a claim that comes
after the listing wins.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping

import structlog

from campaign import config, db, statuses

log = structlog.get_logger(__name__)

QUERIES = (
    "prune_finished_campaigns",
    "prune_campaign_recipients",
    "prune_campaign_batches",
    "prune_campaign",
    "prune_delivery_reports",
    "prune_batches",
    "prune_incoming_messages",
    "prune_webhook_rejects",
    "prune_events",
    "prune_dead_workers",
)
# A worker silent this long is gone for good; its row only clutters the fleet table.
DEAD_WORKER_AFTER_S = 86_400.0
# Campaigns looked at per query; each is then emptied in batch_size chunks.
CAMPAIGNS_PER_PAGE = 100


class Pruner:
    def __init__(
        self,
        *,
        pool: db.Pool,
        queries: Mapping[str, str],
        settings: config.RetentionSettings,
        keep_unforwarded: bool = False,
    ) -> None:
        self._pool = pool
        # A forwarder is configured: events it has not delivered are kept.
        self._keep_unforwarded = keep_unforwarded
        self._queries = db.require(queries, QUERIES)
        self._settings = settings
        # Statements run, for the log line (and to show the work was chunked).
        self.statements = 0

    async def run(self) -> dict[str, int]:
        """Delete everything past retention; returns rows deleted per table."""
        s = self._settings
        deleted = {
            "campaigns": 0,
            "recipients": 0,
            "batches": 0,
            "delivery_reports": 0,
            "incoming_messages": 0,
            "webhook_rejects": 0,
            "events": 0,
            "workers": 0,
        }
        if s.campaigns_days:
            campaigns, recipients, batches = await self._prune_campaigns(s.campaigns_days)
            deleted["campaigns"] += campaigns
            deleted["recipients"] += recipients
            deleted["batches"] += batches
        for table, query, days in (
            ("delivery_reports", "prune_delivery_reports", s.reports_days),
            ("batches", "prune_batches", s.batches_days),
            ("incoming_messages", "prune_incoming_messages", s.incoming_days),
            ("webhook_rejects", "prune_webhook_rejects", s.rejects_days),
        ):
            if days:
                deleted[table] += await self._chunks(query, days)
        if s.events_days:
            deleted["events"] += await self._chunks(
                "prune_events", s.events_days, self._keep_unforwarded
            )
        deleted["workers"] = await self._execute("prune_dead_workers", DEAD_WORKER_AFTER_S)
        return deleted

    async def _prune_campaigns(self, days: int) -> tuple[int, int, int]:
        campaigns = recipients = batches = 0
        last_id = 0
        while True:
            ids: list[int] = [
                r["id"]
                for r in await self._pool.fetch(
                    self._queries["prune_finished_campaigns"], days, CAMPAIGNS_PER_PAGE, last_id
                )
            ]
            self.statements += 1
            for campaign_id in ids:
                recipients += await self._chunks(
                    "prune_campaign_recipients", campaign_id, days, list(statuses.FINAL)
                )
                batches += await self._chunks("prune_campaign_batches", campaign_id, days)
                gone = await self._execute("prune_campaign", campaign_id, days)
                campaigns += gone
                if gone:
                    log.info("campaign_pruned", campaign_id=campaign_id)
            if len(ids) < CAMPAIGNS_PER_PAGE:
                return campaigns, recipients, batches
            last_id = ids[-1]

    async def _chunks(self, query: str, *args: object) -> int:
        """Run a bounded delete (its limit the last parameter) until it deletes less than a
        full chunk."""
        total = 0
        while True:
            count = await self._execute(query, *args, self._settings.batch_size)
            total += count
            if count < self._settings.batch_size:
                return total

    async def _execute(self, query: str, *args: object) -> int:
        status = await self._pool.execute(self._queries[query], *args)
        self.statements += 1
        return int(status.split()[-1])


async def cmd_prune(args: argparse.Namespace, settings: config.Settings) -> int:
    """`campaign prune`: delete what is past `[retention]`, then exit."""

    queries = db.load_queries()
    async with db.database(settings) as dsn:
        conn = await db.connect(dsn, timeout_s=settings.database.connect_timeout_s)
        try:
            await db.check_schema(conn)
        finally:
            await conn.close()
        pool = await db.create_pool(
            dsn, min_size=1, max_size=1, timeout_s=settings.database.connect_timeout_s
        )
        try:
            started = time.monotonic()
            pruner = Pruner(
                pool=pool,
                queries=queries,
                settings=settings.retention,
                keep_unforwarded=bool(settings.events.forward_url),
            )
            deleted = await pruner.run()
        finally:
            await pool.close()
    log.info(
        "prune_finished",
        deleted=deleted,
        statements=pruner.statements,
        duration_ms=int((time.monotonic() - started) * 1000),
    )
    return 0
