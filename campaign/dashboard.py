"""What the dashboard shows: campaign figures from the database, and the page itself.

`campaigns()` and `campaign()` build the documented JSON of /api/campaigns and
/api/campaigns/{id} (docs/dashboard.md); `page()` is the one static page (HTML, CSS and
plain-SVG charts in one file, shipped in the package: no CDN, no build step);
`report_page()` is that page with one campaign's JSON inside it, for
`campaign report ID --html`. Statuses come from campaign/statuses.py, so a status added
there shows up in the funnel and the failures without a change here.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import math
from collections.abc import Mapping
from typing import Any

import orjson

from campaign import codes, db, statuses

QUERIES = (
    "dashboard_campaigns",
    "dashboard_series",
    "dashboard_report_delay",
    "dashboard_reasons",
    # The same count as `campaign status` shows (its query, one definition).
    "status_window_waiting",
)
# Campaigns listed at most on the page.
LIST_LIMIT = 50
# Points of the rate charts at most: the bucket widens with the campaign's length.
MAX_POINTS = 120
# Reasons (status, code) listed at most per campaign.
MAX_REASONS = 20
PERCENTILES = ("p50", "p90", "p95", "p99")
# The rate is measured over this much of the recent past (the query's last minute).
RATE_WINDOW_S = 60.0
# Final statuses that are not the goal: their reasons are the failures table.
NOT_DELIVERED = tuple(s for s in statuses.FINAL if s != "delivered")
# Campaign states in which nothing will be sent any more.
FINISHED = ("completed", "cancelled")
# Where `report_page` puts the campaign's JSON; the page renders it instead of fetching.
_DATA_MARK = "<!-- campaign-data -->"


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _ordered_counts(raw: Mapping[str, Any]) -> dict[str, int]:
    """Counts in the vocabulary's order; a status the code does not know yet goes last."""
    counts: dict[str, int] = {s: int(raw.get(s, 0)) for s in statuses.RECIPIENT_STATUSES}
    counts |= {s: int(n) for s, n in sorted(raw.items()) if s not in counts}
    return counts


def _sent_per_s(row: db.Record) -> float | None:
    """Accepted per second over the last minute (or since the start, if sooner); None once
    the campaign is finished (nothing more will be sent)."""
    if row["status"] in FINISHED:
        return None
    window_s = RATE_WINDOW_S
    if row["started_at"] is not None:
        since_s = (row["now"] - row["started_at"]).total_seconds()
        window_s = min(window_s, max(since_s, 1.0))
    return round(int(row["sent_last_minute"]) / window_s, 2)


def _summary(row: db.Record) -> dict[str, Any]:
    counts = _ordered_counts(row["counts"])
    total = sum(counts.values())
    final = sum(n for s, n in counts.items() if s in statuses.FINAL)
    unsent = sum(counts.get(s, 0) for s in statuses.UNSENT)
    sent_per_s = _sent_per_s(row)
    eta_s = None
    if row["status"] == "running" and sent_per_s:
        eta_s = round(unsent / sent_per_s, 1)
    return {
        "id": int(row["id"]),
        "name": row["name"],
        "service": row["service"],
        "status": row["status"],
        "priority": int(row["priority"]),
        "created_at": _iso(row["created_at"]),
        "started_at": _iso(row["started_at"]),
        "completed_at": _iso(row["completed_at"]),
        "total": total,
        "final": final,
        "progress": round(final / total, 4) if total else 0.0,
        "counts": counts,
        "sent_per_s": sent_per_s,
        "eta_s": eta_s,
        # Guard rails (issue 15): NULL until the campaigns table has the column.
        "paused_reason": row["paused_reason"],
    }


async def campaigns(
    conn: db.Connection, queries: Mapping[str, str], *, limit: int = LIST_LIMIT
) -> dict[str, Any]:
    """The body of GET /api/campaigns."""
    rows = await conn.fetch(queries["dashboard_campaigns"], None, limit)
    now = rows[0]["now"] if rows else dt.datetime.now(dt.UTC)
    return {
        "generated_at": _iso(now),
        "statuses": list(statuses.RECIPIENT_STATUSES),
        "final_statuses": list(statuses.FINAL),
        "campaigns": [_summary(row) for row in rows],
    }


async def campaign(
    conn: db.Connection, queries: Mapping[str, str], campaign_id: int
) -> dict[str, Any] | None:
    """The body of GET /api/campaigns/{id}; None when there is no such campaign."""
    row = await conn.fetchrow(queries["dashboard_campaigns"], campaign_id, 1)
    if row is None:
        return None
    detail = _summary(row)
    detail["generated_at"] = _iso(row["now"])
    detail["final_statuses"] = list(statuses.FINAL)
    detail["funnel"] = [{"status": s, "count": n} for s, n in detail["counts"].items()]
    detail["series"] = await _series(conn, queries, row)
    detail["report_delay_s"] = await _delay(conn, queries, campaign_id)
    reasons = await conn.fetch(
        queries["dashboard_reasons"], campaign_id, list(NOT_DELIVERED), MAX_REASONS
    )
    detail["failures"] = [
        {
            "status": r["status"],
            "code": r["code"],
            "meaning": codes.meaning(r["code"]),
            "count": int(r["n"]),
        }
        for r in reasons
    ]
    window = await conn.fetchrow(queries["status_window_waiting"], campaign_id)
    assert window is not None  # an aggregate: always one row
    detail["guard_rails"] = {
        "paused_reason": row["paused_reason"],
        # Recipients held back until their local sending window opens, and the next opening.
        "waiting_for_window": int(window["waiting"]),
        "next_window_opening": _iso(window["next_opening"]),
    }
    return detail


async def _series(
    conn: db.Connection, queries: Mapping[str, str], row: db.Record
) -> dict[str, Any]:
    """Sends and final reports per second over the campaign's life, MAX_POINTS at most."""
    start: dt.datetime | None = row["started_at"]
    if start is None:
        return {"start": None, "bucket_s": None, "points": []}
    end: dt.datetime = row["now"]
    if row["status"] in FINISHED and row["completed_at"] is not None:
        # Complete means every recipient final: the last report came before this.
        end = min(end, max(row["completed_at"], start + dt.timedelta(seconds=1)))
    span_s = max((end - start).total_seconds(), 1.0)
    bucket_s = max(1, math.ceil(span_s / MAX_POINTS))
    buckets = min(MAX_POINTS, math.ceil(span_s / bucket_s))
    rows = await conn.fetch(queries["dashboard_series"], row["id"], start, bucket_s, buckets)
    return {
        "start": _iso(start),
        "bucket_s": bucket_s,
        "points": [
            {
                "t_s": int(r["i"]) * bucket_s,
                "sends_per_s": round(int(r["sends"]) / bucket_s, 2),
                "reports_per_s": round(int(r["reports"]) / bucket_s, 2),
            }
            for r in rows
        ],
    }


async def _delay(conn: db.Connection, queries: Mapping[str, str], campaign_id: int) -> Any:
    row = await conn.fetchrow(queries["dashboard_report_delay"], campaign_id)
    assert row is not None  # an aggregate always returns one row
    values = row["percentiles_s"] or [None] * len(PERCENTILES)
    delay: dict[str, Any] = {"reports": int(row["reports"])}
    delay |= {
        name: None if v is None else round(float(v), 3)
        for name, v in zip(PERCENTILES, values, strict=True)
    }
    return delay


def page() -> str:
    """The dashboard page: one self-contained HTML file shipped in the package."""
    return (
        importlib.resources.files("campaign")
        .joinpath("static/dashboard.html")
        .read_text(encoding="utf-8")
    )


def report_page(detail: Mapping[str, Any]) -> str:
    """The page with one campaign's figures inside: a file to send, no server needed."""
    data = orjson.dumps(detail).decode()
    # Inside <script>, only "</" could end the element early; "<\/" is the same JSON.
    data = data.replace("</", "<\\/")
    script = f'<script id="campaign-data" type="application/json">{data}</script>'
    html = page()
    assert _DATA_MARK in html
    return html.replace(_DATA_MARK, script, 1)
