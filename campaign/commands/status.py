"""`campaign status`: counts per status, rate, ETA, oldest pending, report lag."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from campaign import config, db
from campaign.statuses import RECIPIENT_STATUSES, UNSENT

STATUSES = RECIPIENT_STATUSES
QUERIES = ("status_campaigns", "status_activity")


@dataclass(frozen=True, slots=True)
class CampaignStatus:
    id: int
    name: str
    service: str
    status: str
    priority: int
    total: int
    counts: dict[str, int]
    rate_per_s: float
    eta_s: float | None
    oldest_pending: str | None
    report_lag_p50_s: float | None
    report_lag_p95_s: float | None


async def collect(
    conn: db.Connection, queries: Mapping[str, str], campaign_id: int | None, *, limit: int = 20
) -> list[CampaignStatus]:
    rows = await conn.fetch(queries["status_campaigns"], campaign_id, limit)
    result = []
    for row in rows:
        activity = await conn.fetchrow(queries["status_activity"], row["id"])
        assert activity is not None  # an aggregate query always returns one row
        counts: dict[str, int] = {s: int(row["counts"].get(s, 0)) for s in STATUSES}
        rate = activity["sent_last_minute"] / 60.0
        unsent = sum(counts[s] for s in UNSENT)
        eta = unsent / rate if rate > 0 else None
        oldest: dt.datetime | None = activity["oldest_pending"]
        result.append(
            CampaignStatus(
                id=row["id"],
                name=row["name"],
                service=row["service"],
                status=row["status"],
                priority=row["priority"],
                total=sum(counts.values()),
                counts=counts,
                rate_per_s=round(rate, 2),
                eta_s=round(eta) if eta is not None else None,
                oldest_pending=oldest.isoformat() if oldest else None,
                report_lag_p50_s=_round(activity["p50_s"]),
                report_lag_p95_s=_round(activity["p95_s"]),
            )
        )
    return result


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 2)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def render(campaigns: Sequence[CampaignStatus]) -> str:
    """A plain-text table per campaign, for a terminal."""
    if not campaigns:
        return "no campaigns\n"
    lines = []
    for c in campaigns:
        lines.append(
            f"campaign {c.id} {c.name!r}  service={c.service}  status={c.status}  "
            f"priority={c.priority}  recipients={c.total:,}"
        )
        shown = [(s, n) for s, n in c.counts.items() if n]
        for status, n in shown:
            share = 100.0 * n / c.total if c.total else 0.0
            lines.append(f"  {status:<11} {n:>12,}  {share:5.1f}%")
        lag = (
            f"{c.report_lag_p50_s}s p50 / {c.report_lag_p95_s}s p95"
            if c.report_lag_p50_s is not None
            else "-"
        )
        lines.append(
            f"  rate {c.rate_per_s:,.1f}/s  eta {_duration(c.eta_s)}  "
            f"oldest pending {c.oldest_pending or '-'}  report lag {lag}"
        )
        lines.append("")
    return "\n".join(lines)


async def cmd_status(args: argparse.Namespace, settings: config.Settings) -> int:

    queries = db.require(db.load_queries(), QUERIES)
    async with db.database(settings) as dsn:
        conn = await db.connect(dsn, timeout_s=settings.database.connect_timeout_s)
        try:
            await db.check_schema(conn)
            while True:
                campaigns = await collect(conn, queries, args.campaign_id, limit=args.limit)
                if args.json:
                    out = orjson.dumps([asdict(c) for c in campaigns]).decode() + "\n"
                else:
                    out = render(campaigns)
                if args.watch and not args.json and sys.stdout.isatty():
                    sys.stdout.write("\x1b[2J\x1b[H")
                sys.stdout.write(out)
                sys.stdout.flush()
                if not args.watch:
                    break
                await asyncio.sleep(args.interval)
        finally:
            await conn.close()
    if args.campaign_id is not None and not campaigns:
        print(f"campaign {args.campaign_id}: not found", file=sys.stderr)
        return 1
    return 0
