"""`campaign demo`: the whole product on one machine."""

from __future__ import annotations

import argparse

import structlog

from campaign import config, db

log = structlog.get_logger("campaign.demo")


async def run(args: argparse.Namespace, settings: config.Settings) -> int:
    from campaign.cli import database

    async with database(settings) as dsn:
        conn = await db.connect(dsn)
        try:
            applied = await db.migrate(conn)
            version = await db.schema_version(conn)
        finally:
            await conn.close()
        log.info(
            "demo_database_ready",
            database=db.describe_dsn(dsn),
            applied=len(applied),
            schema_version=version,
        )
    return 0
