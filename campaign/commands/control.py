"""`campaign migrate`, and `pause` / `resume` / `cancel` of one campaign."""

from __future__ import annotations

import argparse
import sys

import structlog

from campaign import config, db

log = structlog.get_logger("campaign.cli")


async def cmd_migrate(args: argparse.Namespace, settings: config.Settings) -> int:
    async with db.database(settings) as dsn:
        conn = await db.connect(dsn, timeout_s=settings.database.connect_timeout_s)
        try:
            applied = await db.migrate(conn)
            version = await db.schema_version(conn)
        finally:
            await conn.close()
    log.info(
        "migrate_finished",
        applied=len(applied),
        schema_version=version,
        database=db.describe_dsn(dsn),
    )
    return 0


_CONTROL_SQL = {
    "pause": ("control_pause", "paused"),
    "resume": ("control_resume", "ready"),
    "cancel": ("control_cancel", "cancelled"),
}


async def cmd_control(args: argparse.Namespace, settings: config.Settings) -> int:
    query_name, new_status = _CONTROL_SQL[args.command]
    queries = db.require(db.load_queries(), [query_name])
    async with db.database(settings) as dsn:
        conn = await db.connect(dsn, timeout_s=settings.database.connect_timeout_s)
        try:
            await db.check_schema(conn)
            row = await conn.fetchrow(queries[query_name], args.campaign_id)
        finally:
            await conn.close()
    if row is None:
        print(
            f"campaign {args.campaign_id}: not found, or its status does not allow {args.command}",
            file=sys.stderr,
        )
        return 1
    log.info(
        "campaign_status_changed",
        campaign_id=args.campaign_id,
        status=new_status,
        previous_status=row["previous_status"],
    )
    return 0
