"""`campaign check ID`: what sending would do, before sending, without writing anything.

It runs the producer's own steps over the campaign's pending recipients, in id order,
a page at a time: `prepare.normalise_all`, `producer.read_guards` (opted-out numbers,
numbers the campaign already sends to, counts in the cap window; read without locks)
and `prepare.prepare` with one `Guards` carried across pages, so a number's second row
is a duplicate and the cap counts grow as they would when sending. Rows already claimed
or sent are counted as in flight, not decided again; rows outside their local-time sending
window now count as `waiting` (or `expired`, when it opens after the campaign expires),
and rows already waiting for a time are counted apart. Figures: recipients by outcome,
encodings and parts, the characters that forced UCS-2, the cost from `[pricing]`, and
sample texts.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from campaign import config, db, sms, window
from campaign.prepare import Campaign, Claimed, normalise_all, prepare
from campaign.producer import QUERIES as PRODUCER_QUERIES
from campaign.producer import claimed_row, new_guards, read_guards

QUERIES = ("check_campaign", "check_pending", "check_waiting", "check_in_flight", *PRODUCER_QUERIES)
PAGE = 10_000
_GSM7 = sms.GSM7_BASIC | sms.GSM7_EXTENDED


class CheckError(Exception):
    """A campaign that cannot be checked (no such id, unknown service): one line."""


@dataclass(slots=True)
class Invalid:
    code: str
    recipients: int
    example_id: int
    example: str


@dataclass(slots=True)
class Sample:
    id: int
    msisdn: str
    text: str | None
    encoding: str | None
    parts: int | None


@dataclass(slots=True)
class Report:
    campaign_id: int
    name: str
    status: str
    service: str
    checked: int = 0
    in_flight: int = 0
    outcomes: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("send", "invalid", "suppressed", "duplicate", "capped", "waiting", "expired"), 0
        )
    )
    # Pending rows already waiting for a time (window or retry), not decided now, and
    # the earliest of those times.
    already_waiting: int = 0
    next_at: str | None = None
    invalid: list[Invalid] = field(default_factory=list)
    encodings: dict[str, int] = field(default_factory=dict)
    parts_histogram: dict[int, int] = field(default_factory=dict)
    total_parts: int = 0
    # Characters outside GSM-7 in the texts that went UCS-2: recipients whose text holds each.
    ucs2_characters: dict[str, int] = field(default_factory=dict)
    currency: str = ""
    # None: no [pricing]; else parts x price per destination's country calling code.
    cost: float | None = None
    parts_by_country: dict[str, int] = field(default_factory=dict)
    unpriced_parts: int = 0
    samples: list[Sample] = field(default_factory=list)


def _calling_code(e164: str, priced: Mapping[str, float]) -> str | None:
    """The priced country calling code `e164` starts with (calling codes are prefix-free)."""
    for size in (1, 2, 3):
        code = e164[1 : 1 + size]
        if code in priced:
            return code
    return None


def _culprits(text: str) -> list[str]:
    return sorted(set(text) - _GSM7)


async def check(
    conn: db.Connection,
    queries: Mapping[str, str],
    campaign_id: int,
    settings: config.Settings,
    *,
    sample: int = 0,
) -> Report:
    row = await conn.fetchrow(queries["check_campaign"], campaign_id)
    if row is None:
        raise CheckError(f"campaign {campaign_id}: not found")
    service = settings.services.get(row["service"])
    if service is None:
        known = ", ".join(sorted(settings.services)) or "none"
        raise CheckError(
            f"campaign {campaign_id}: service {row['service']!r} is not in the config"
            f" (services: {known})"
        )
    campaign = Campaign.from_record(
        row,
        default_sender_id=service.sender_id,
        default_window=window.Window.parse(service.send_window),
    )
    report = Report(campaign_id, row["name"], row["status"], row["service"])
    report.in_flight = int(await conn.fetchval(queries["check_in_flight"], campaign_id))
    waiting = await conn.fetchrow(queries["check_waiting"], campaign_id)
    assert waiting is not None  # an aggregate: always one row
    report.already_waiting = int(waiting["waiting"])
    report.next_at = waiting["next_at"].isoformat() if waiting["next_at"] else None
    # The sending window as the producer would apply it now: rows outside it would wait
    # for its opening ("waiting") or expire before it opens ("expired").
    planner = None
    if campaign.send_window is not None:
        planner = window.Planner(
            campaign.send_window,
            default_timezone=service.default_timezone,
            now=dt.datetime.now(dt.UTC),
        )
    guards = new_guards(campaign, settings.policy)
    pricing = settings.pricing
    priced = pricing.default > 0 or bool(pricing.countries)
    invalid: dict[str, Invalid] = {}
    culprits: collections.Counter[str] = collections.Counter()
    parts_by_code: collections.Counter[str] = collections.Counter()
    culprit_cache: dict[str, list[str]] = {}
    after = 0
    while True:
        records = await conn.fetch(queries["check_pending"], campaign_id, after, PAGE)
        if not records:
            break
        after = records[-1]["id"]
        rows: list[Claimed] = [claimed_row(r) for r in records]
        numbers = normalise_all(rows, default_region=service.default_region)
        suppressed = await read_guards(conn, queries, campaign, rows, numbers, guards, lock=False)
        # Each page's decisions are final for the check; its registrations stay in
        # `guards` (owners, counts), nothing is stored.
        guards.registered.clear()
        guards.reserved.clear()
        decided = prepare(
            campaign,
            rows,
            numbers,
            suppressed=suppressed,
            plus_prefix=service.plus_prefix,
            smartlink_length=service.smartlink_length,
            guards=guards,
            planner=planner,
        )
        report.checked += len(decided)
        for p in decided:
            if p.destination is None:
                report.outcomes["waiting" if p.status == "pending" else p.status] += 1
                if p.status == "invalid":
                    code = p.error_code or ""
                    if code in invalid:
                        invalid[code].recipients += 1
                    else:
                        invalid[code] = Invalid(code, 1, p.id, p.error_message or "")
                continue
            report.outcomes["send"] += 1
            parts = p.parts or 1
            if p.encoding is not None:
                report.encodings[p.encoding] = report.encodings.get(p.encoding, 0) + 1
                report.parts_histogram[parts] = report.parts_histogram.get(parts, 0) + 1
            report.total_parts += parts
            if p.encoding == "ucs2" and p.destination.text is not None:
                text = p.destination.text
                found = culprit_cache.get(text)
                if found is None:
                    found = culprit_cache[text] = _culprits(text)
                culprits.update(found)
            if priced and p.msisdn_e164 is not None:
                priced_code = _calling_code(p.msisdn_e164, pricing.countries)
                parts_by_code[priced_code or "default"] += parts
            if len(report.samples) < sample:
                report.samples.append(
                    Sample(p.id, p.msisdn_e164 or "", p.destination.text, p.encoding, p.parts)
                )
        if len(records) < PAGE:
            break
    report.invalid = sorted(invalid.values(), key=lambda i: -i.recipients)
    report.ucs2_characters = dict(culprits.most_common())
    report.parts_histogram = dict(sorted(report.parts_histogram.items()))
    if priced:
        report.currency = pricing.currency
        report.parts_by_country = dict(sorted(parts_by_code.items()))
        report.cost = round(
            sum(
                n * (pricing.default if code == "default" else pricing.price(code))
                for code, n in parts_by_code.items()
            ),
            6,
        )
        if pricing.default <= 0:
            report.unpriced_parts = parts_by_code.get("default", 0)
    return report


def _char(ch: str) -> str:
    return f"{ch!r} U+{ord(ch):04X}"


def render(r: Report) -> str:
    lines = [
        f"campaign {r.campaign_id} {r.name!r}  service={r.service}  status={r.status}",
        f"  checked {r.checked:,} pending recipients ({r.in_flight:,} more already in flight)",
    ]
    if r.already_waiting:
        lines.append(
            f"  {r.already_waiting:,} more wait for their sending window or a retry"
            f" (the first at {r.next_at})"
        )
    for outcome, n in r.outcomes.items():
        share = 100.0 * n / r.checked if r.checked else 0.0
        lines.append(f"  {outcome:<11} {n:>12,}  {share:5.1f}%")
    for i in r.invalid:
        lines.append(
            f"    invalid {i.code:<17} {i.recipients:>10,}  {i.example}"
            f"  (e.g. recipient {i.example_id})"
        )
    if r.encodings:
        enc = "  ".join(f"{k} {v:,}" for k, v in sorted(r.encodings.items()))
        hist = "  ".join(
            f"{k} part{'s' if k > 1 else ''}: {v:,}" for k, v in r.parts_histogram.items()
        )
        lines.append(f"  encoding    {enc}")
        lines.append(f"  parts       {hist}  (total {r.total_parts:,})")
    elif r.outcomes["send"]:
        lines.append(f"  parts       template campaign: counted as 1 each ({r.total_parts:,})")
    if r.ucs2_characters:
        shown = ", ".join(f"{_char(c)} x{n:,}" for c, n in r.ucs2_characters.items())
        lines.append(f"  UCS-2 because of: {shown}")
    if r.cost is not None:
        by = "  ".join(
            f"+{k}: {v:,}" if k != "default" else f"other: {v:,}"
            for k, v in r.parts_by_country.items()
        )
        lines.append(f"  cost        {r.cost:,.4f} {r.currency}  (parts {by})".rstrip())
        if r.unpriced_parts:
            lines.append(f"  ! {r.unpriced_parts:,} parts to countries without a price")
    else:
        lines.append(f"  cost        no [pricing] configured: {r.total_parts:,} parts")
    for s in r.samples:
        lines.append(
            f"  sample {s.id} {s.msisdn} ({s.encoding or '-'}, {s.parts or '-'} parts): {s.text}"
        )
    return "\n".join(lines) + "\n"


def as_json(r: Report) -> str:
    data: dict[str, Any] = asdict(r)
    data["parts_histogram"] = {str(k): v for k, v in r.parts_histogram.items()}
    return orjson.dumps(data).decode() + "\n"


async def cmd_check(args: argparse.Namespace, settings: config.Settings) -> int:
    """0 whatever the check finds; 2 for a campaign that does not exist or is on a
    service the config does not have."""
    queries = db.require(db.load_queries(), QUERIES)
    async with db.database(settings) as dsn:
        conn = await db.connect(dsn, timeout_s=settings.database.connect_timeout_s)
        try:
            await db.check_schema(conn)
            async with conn.transaction(readonly=True, isolation="repeatable_read"):
                try:
                    report = await check(
                        conn, queries, args.campaign_id, settings, sample=args.sample
                    )
                except CheckError as exc:
                    print(str(exc), file=sys.stderr)
                    return 2
        finally:
            await conn.close()
    sys.stdout.write(as_json(report) if args.json else render(report))
    return 0
