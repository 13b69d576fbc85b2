"""Campaigns and recipients for tests, inserted as a user's application would, and two reads.

Tests of the schema's own CHECKs and triggers write their rows with raw SQL on purpose;
everything else seeds through here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg


def numbers(count: int, *, start: int = 0) -> list[str]:
    """Valid Indian mobile numbers in the API's form (country code, no '+')."""
    return [f"9198{start + i:08d}" for i in range(count)]


async def create_campaign(conn: asyncpg.Connection, **columns: Any) -> int:
    """A campaign row: name "test", service "default", body "Hello", status "ready", unless
    `columns` say otherwise (a `template_id` without a `body` leaves the body NULL)."""
    values: dict[str, Any] = {
        "name": "test",
        "service": "default",
        "body": "Hello",
        "status": "ready",
    } | columns
    if "template_id" in columns and "body" not in columns:
        values["body"] = None
    # Column names come from the test's keywords, never values: those are parameters.
    names = ", ".join(values)
    params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    return int(
        await conn.fetchval(
            f"INSERT INTO campaign.campaigns ({names}) VALUES ({params}) RETURNING id",
            *values.values(),
        )
    )


_INSERT_RECIPIENTS = """
    INSERT INTO campaign.recipients (campaign_id, msisdn, variables)
    SELECT $1, m, v
      FROM unnest($2::text[], $3::jsonb[]) WITH ORDINALITY AS u(m, v, n)
     ORDER BY n
    RETURNING id
"""

_INSERT_RECIPIENTS_WITH_STATUS = """
    INSERT INTO campaign.recipients (campaign_id, msisdn, variables, status)
    SELECT $1, m, v, $4
      FROM unnest($2::text[], $3::jsonb[]) WITH ORDINALITY AS u(m, v, n)
     ORDER BY n
    RETURNING id
"""


async def add_recipients(
    conn: asyncpg.Connection,
    campaign_id: int,
    msisdns: Sequence[str],
    variables: Sequence[Mapping[str, Any]] | None = None,
    *,
    status: str | None = None,
) -> list[int]:
    """Insert recipients in order (status `pending` unless given); their ids, in order."""
    args: list[Any] = [
        campaign_id,
        list(msisdns),
        list(variables) if variables is not None else [{} for _ in msisdns],
    ]
    if status is None:
        rows = await conn.fetch(_INSERT_RECIPIENTS, *args)
    else:
        rows = await conn.fetch(_INSERT_RECIPIENTS_WITH_STATUS, *args, status)
    return sorted(r["id"] for r in rows)


async def campaign_with_recipients(
    conn: asyncpg.Connection,
    count: int,
    *,
    variables: Callable[[int], Mapping[str, Any]] | None = None,
    **columns: Any,
) -> int:
    """A campaign (see `create_campaign`) of `count` distinct valid numbers, `variables(i)`
    for the i-th, in one transaction: a worker never sees the campaign half-filled."""
    async with conn.transaction():
        campaign_id = await create_campaign(conn, **columns)
        await add_recipients(
            conn,
            campaign_id,
            numbers(count),
            [variables(i) for i in range(count)] if variables is not None else None,
        )
    return campaign_id


async def statuses(conn: asyncpg.Connection, campaign_id: int) -> dict[str, int]:
    """Recipients per status of one campaign."""
    rows = await conn.fetch(
        "SELECT status, count(*) AS n FROM campaign.recipients WHERE campaign_id = $1 "
        "GROUP BY status",
        campaign_id,
    )
    return {r["status"]: r["n"] for r in rows}


async def campaign_status(conn: asyncpg.Connection, campaign_id: int) -> str:
    return str(
        await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id = $1", campaign_id)
    )


async def queued_campaign(
    conn: asyncpg.Connection, count: int, *, name: str = "queued", prefix: str = "T"
) -> int:
    """A running campaign of `count` recipients accepted by the API and awaiting their
    reports: transids `<prefix>0` .. `<prefix>{count - 1}`, inserted in one statement."""
    campaign_id = await create_campaign(conn, name=name, body="hi", status="running")
    await conn.execute(
        "INSERT INTO campaign.recipients (campaign_id, msisdn, status, transid, sent_at) "
        "SELECT $1, '9197' || lpad(n::text, 8, '0'), 'queued', $3 || n, now() "
        "FROM generate_series(0, $2 - 1) AS n",
        campaign_id,
        count,
        prefix,
    )
    return campaign_id
