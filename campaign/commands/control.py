"""`campaign migrate`, and `pause` / `resume` / `cancel` of one campaign."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import structlog

from campaign import config, db
from campaign.statuses import CampaignStatus

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


@dataclass(frozen=True, slots=True)
class _Control:
    query: str
    target: CampaignStatus
    # Statuses the move starts from (the query's own condition), and those that already
    # mean what the user asked for: those answer success without a change.
    sources: tuple[CampaignStatus, ...]
    reached: tuple[CampaignStatus, ...]


CONTROLS = {
    "pause": _Control("control_pause", "paused", ("draft", "ready", "running"), ("paused",)),
    "resume": _Control("control_resume", "ready", ("draft", "paused"), ("ready", "running")),
    "cancel": _Control(
        "control_cancel", "cancelled", ("draft", "ready", "running", "paused"), ("cancelled",)
    ),
}
QUERIES = (*(c.query for c in CONTROLS.values()), "control_campaign_status")


async def cmd_control(args: argparse.Namespace, settings: config.Settings) -> int:
    """Pause, resume or cancel: 0 when the campaign is (now or already) there, 1 when its
    status does not allow the move, 2 when there is no such campaign."""
    control = CONTROLS[args.command]
    queries = db.require(db.load_queries(), QUERIES)
    async with db.database(settings) as dsn:
        conn = await db.connect(dsn, timeout_s=settings.database.connect_timeout_s)
        try:
            await db.check_schema(conn)
            row = await conn.fetchrow(queries[control.query], args.campaign_id)
            current = None
            if row is None:
                current = await conn.fetchval(queries["control_campaign_status"], args.campaign_id)
        finally:
            await conn.close()
    if row is not None:
        log.info(
            "campaign_status_changed",
            campaign_id=args.campaign_id,
            status=control.target,
            previous_status=row["previous_status"],
        )
        return 0
    if current is None:
        print(f"campaign {args.campaign_id}: not found", file=sys.stderr)
        return 2
    if current in control.reached:
        log.info("campaign_status_unchanged", campaign_id=args.campaign_id, status=current)
        return 0
    print(
        f"campaign {args.campaign_id} is {current}: {args.command} needs a campaign that is "
        f"{' or '.join(control.sources)}",
        file=sys.stderr,
    )
    return 1
