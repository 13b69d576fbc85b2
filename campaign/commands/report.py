"""`campaign report ID [--html FILE]`: one campaign's dashboard figures, to keep or send.

Without --html the JSON of /api/campaigns/{id} is printed; with it, the dashboard page with
those figures inside is written to FILE: one self-contained HTML file (no server, no
internet needed to open it) to send to stakeholders after a campaign.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import orjson

from campaign import config, dashboard, db


async def cmd_report(args: argparse.Namespace, settings: config.Settings) -> int:
    """0, or 2 when there is no such campaign."""
    queries = db.require(db.load_queries(), dashboard.QUERIES)
    async with db.database(settings) as dsn:
        conn = await db.connect(dsn, timeout_s=settings.database.connect_timeout_s)
        try:
            await db.check_schema(conn)
            detail = await dashboard.campaign(conn, queries, args.campaign_id)
        finally:
            await conn.close()
    if detail is None:
        print(f"campaign {args.campaign_id}: not found", file=sys.stderr)
        return 2
    if args.html is None:
        sys.stdout.write(orjson.dumps(detail, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    path = Path(args.html)
    await asyncio.to_thread(path.write_text, dashboard.report_page(detail), encoding="utf-8")
    print(f"campaign {args.campaign_id}: report written to {path}")
    return 0
