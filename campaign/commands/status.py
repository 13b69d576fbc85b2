"""`campaign status`: counts per status, why recipients failed, rate, ETA, report lag,
replies and opt-outs (with the opt-out rate: of the recipients the API accepted).

The rate and the ETA follow the campaign's state: a running campaign shows the rate of
the last minute and an ETA; a paused one neither; a finished one its average rate over
its send window. Warnings say what a person would otherwise have to find in SQL: a
campaign whose service no live worker sends for, a campaign mostly invalid.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from campaign import codes, config, db, fleet
from campaign.statuses import ACCEPTED, MOSTLY_INVALID, RECIPIENT_STATUSES, UNSENT

STATUSES = RECIPIENT_STATUSES
QUERIES = (
    "status_campaigns",
    "status_activity",
    "status_reasons",
    "status_live_senders",
    "status_send_window",
    "status_window_waiting",
    "status_replies",
)
# Statuses whose reasons are worth listing, and how many reasons are shown.
EXPLAINED = ("invalid", "failed", "rejected", "expired", "capped")
TOP_REASONS = 5
# Campaign states in which nothing will be sent any more: --watch ends on them.
FINISHED = ("completed", "cancelled")


@dataclass(frozen=True, slots=True)
class Reason:
    status: str
    code: str
    meaning: str
    recipients: int
    example_id: int


@dataclass(frozen=True, slots=True)
class CampaignStatus:
    id: int
    name: str
    service: str
    status: str
    priority: int
    total: int
    counts: dict[str, int]
    # Running: destinations accepted per second over the last minute. Finished: the
    # average over the send window. Paused or draft: None.
    rate_per_s: float | None
    eta_s: float | None
    oldest_pending: str | None
    report_lag_p50_s: float | None
    report_lag_p95_s: float | None
    reasons: list[Reason] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Guard rails while sending: the campaign's own window ("09:00-21:00", None: the
    # service's or none), recipients waiting for their window and its next opening, the
    # canary and brake settings, and why the worker paused it.
    send_window: str | None = None
    waiting_for_window: int = 0
    next_window_opening: str | None = None
    canary_size: int | None = None
    max_failure_ratio: float | None = None
    paused_reason: str | None = None
    # Incoming messages linked to this campaign, the STOPs among them, and the STOPs as a
    # share of the recipients the API accepted (None before any was).
    replies: int = 0
    opt_outs: int = 0
    opt_out_rate: float | None = None


async def collect(
    conn: db.Connection, queries: Mapping[str, str], campaign_id: int | None, *, limit: int = 20
) -> list[CampaignStatus]:
    rows = await conn.fetch(queries["status_campaigns"], campaign_id, limit)
    return [await _one(conn, queries, row) for row in rows]


async def _one(conn: db.Connection, queries: Mapping[str, str], row: Any) -> CampaignStatus:
    activity = await conn.fetchrow(queries["status_activity"], row["id"])
    assert activity is not None  # an aggregate query always returns one row
    counts: dict[str, int] = {s: int(row["counts"].get(s, 0)) for s in STATUSES}
    total = sum(counts.values())
    unsent = sum(counts[s] for s in UNSENT)
    state: str = row["status"]
    rate: float | None = None
    eta: float | None = None
    if state in ("ready", "running"):
        rate = activity["sent_last_minute"] / 60.0
        eta = unsent / rate if rate > 0 and unsent else None
    elif state in FINISHED:
        window = await conn.fetchrow(queries["status_send_window"], row["id"])
        assert window is not None
        if window["first_sent"] is not None:
            span_s = (window["last_sent"] - window["first_sent"]).total_seconds()
            rate = window["accepted"] / span_s if span_s > 0 else float(window["accepted"])
    reasons = [
        Reason(
            status=r["status"],
            code=r["code"],
            meaning=codes.meaning(r["code"]),
            recipients=r["n"],
            example_id=r["example_id"],
        )
        for r in await conn.fetch(queries["status_reasons"], row["id"], EXPLAINED, TOP_REASONS)
    ]
    warnings: list[str] = []
    if state in ("ready", "running") and unsent:
        live = await conn.fetchval(
            queries["status_live_senders"], row["service"], fleet.DEAD_AFTER_S
        )
        if not live:
            warnings.append(
                f"no live worker sends for service {row['service']!r}: start one whose "
                "config has [services." + row["service"] + "], or fix the campaign's service"
            )
    if total and counts["invalid"] >= MOSTLY_INVALID * total:
        warnings.append(
            f"{counts['invalid'] / total:.0%} of the recipients are invalid: see the reasons"
        )
    replies = await conn.fetchrow(queries["status_replies"], row["id"])
    assert replies is not None
    accepted = sum(counts[s] for s in ACCEPTED)
    oldest: dt.datetime | None = activity["oldest_pending"]
    waiting = await conn.fetchrow(queries["status_window_waiting"], row["id"])
    assert waiting is not None
    opening: dt.datetime | None = waiting["next_opening"]
    if row["paused_reason"] and state == "paused":
        warnings.append(f"paused by the worker: {row['paused_reason']}")
    return CampaignStatus(
        id=row["id"],
        name=row["name"],
        service=row["service"],
        status=state,
        priority=row["priority"],
        total=total,
        counts=counts,
        rate_per_s=round(rate, 2) if rate is not None else None,
        eta_s=round(eta) if eta is not None else None,
        oldest_pending=oldest.isoformat() if oldest else None,
        report_lag_p50_s=_round(activity["p50_s"]),
        report_lag_p95_s=_round(activity["p95_s"]),
        reasons=reasons,
        warnings=warnings,
        send_window=(
            f"{row['window_start']:%H:%M}-{row['window_end']:%H:%M}"
            if row["window_start"] is not None
            else None
        ),
        waiting_for_window=int(waiting["waiting"]),
        next_window_opening=opening.isoformat() if opening else None,
        canary_size=row["canary_size"],
        max_failure_ratio=_round(row["max_failure_ratio"]),
        paused_reason=row["paused_reason"],
        replies=replies["replies"],
        opt_outs=replies["opt_outs"],
        opt_out_rate=round(replies["opt_outs"] / accepted, 4) if accepted else None,
    )


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 2)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _pace(c: CampaignStatus) -> str:
    if c.status in ("ready", "running"):
        rate = f"rate {c.rate_per_s or 0:,.1f}/s (last minute)"
        return f"{rate}  eta {_duration(c.eta_s)}" if c.eta_s is not None else rate
    if c.status in FINISHED:
        return f"average rate {c.rate_per_s:,.1f}/s" if c.rate_per_s is not None else "not sent"
    return c.status


def _guard_rails(c: CampaignStatus) -> list[str]:
    parts = []
    if c.send_window is not None:
        parts.append(f"window {c.send_window} local")
    if c.waiting_for_window:
        parts.append(
            f"waiting for their window {c.waiting_for_window:,} "
            f"(next opens {c.next_window_opening})"
        )
    if c.canary_size is not None:
        parts.append(f"canary {c.canary_size:,}")
    if c.max_failure_ratio is not None:
        parts.append(f"brake at {c.max_failure_ratio:.0%} failed")
    return parts


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
        for warning in c.warnings:
            lines.append(f"  ! {warning}")
        shown = [(s, n) for s, n in c.counts.items() if n]
        for status, n in shown:
            share = 100.0 * n / c.total if c.total else 0.0
            lines.append(f"  {status:<11} {n:>12,}  {share:5.1f}%")
        if c.reasons:
            lines.append("  why:")
            for r in c.reasons:
                lines.append(
                    f"    {r.status:<9} {r.code or '-':<17} {r.recipients:>10,}  "
                    f"{r.meaning}  (e.g. recipient {r.example_id})"
                )
        lag = (
            f"{c.report_lag_p50_s}s p50 / {c.report_lag_p95_s}s p95"
            if c.report_lag_p50_s is not None
            else "-"
        )
        lines.append(f"  {_pace(c)}  oldest pending {c.oldest_pending or '-'}  report lag {lag}")
        guards = _guard_rails(c)
        if guards:
            lines.append("  " + "  ".join(guards))
        if c.replies:
            rate = f" ({c.opt_out_rate:.2%} of accepted)" if c.opt_out_rate is not None else ""
            lines.append(f"  replies {c.replies:,}  opt-outs {c.opt_outs:,}{rate}")
        lines.append("")
    return "\n".join(lines)


async def cmd_status(args: argparse.Namespace, settings: config.Settings) -> int:
    """0, or 2 when the campaign asked for does not exist. --watch ends once every
    campaign shown is completed or cancelled."""
    queries = db.require(db.load_queries(), QUERIES)
    tty = sys.stdout.isatty()
    async with db.database(settings) as dsn:
        conn = await db.connect(dsn, timeout_s=settings.database.connect_timeout_s)
        try:
            await db.check_schema(conn)
            while True:
                campaigns = await collect(conn, queries, args.campaign_id, limit=args.limit)
                if args.campaign_id is not None and not campaigns:
                    print(f"campaign {args.campaign_id}: not found", file=sys.stderr)
                    return 2
                if args.json:
                    out = orjson.dumps([asdict(c) for c in campaigns]).decode() + "\n"
                else:
                    out = render(campaigns)
                if args.watch and not args.json:
                    if tty:
                        sys.stdout.write("\x1b[2J\x1b[H")
                    else:
                        # Piped frames follow each other: each says when it was taken.
                        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                        sys.stdout.write(f"--- {now}\n")
                sys.stdout.write(out)
                sys.stdout.flush()
                if not args.watch or all(c.status in FINISHED for c in campaigns):
                    return 0
                await asyncio.sleep(args.interval)
        finally:
            await conn.close()
