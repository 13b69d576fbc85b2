"""Helpers for webhook and reconciler tests: report bodies, seeded campaigns, a server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson

from campaign import db, reports
from campaign.config import OptOutSettings, WebhookSettings
from campaign.webhooks import WebhookServer, report_columns
from tests.helpers.seed import create_campaign

TOKEN = "tok-3f9c2a7e51d84b06"
BASE_TIME = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)

DESCRIPTIONS = {
    "7500": ("Delivered", "Delivered"),
    "7501": ("Submitted", "Submitted"),
    "7208": ("Message expired", "Un-Delivered"),
}


def dr(
    transid: str | None,
    code: str = "7500",
    *,
    correlation_id: str | None = None,
    at: datetime | str | None = BASE_TIME,
    **info: Any,
) -> dict[str, Any]:
    """One DR notification in the documented shape; `at` None leaves timeStamp out."""
    description, status = DESCRIPTIONS.get(code, ("Failed at operator", "Failed"))
    delivery_info: dict[str, Any] = {
        "deliveryChannel": "SMS",
        "Description": description,
        "destinationType": "msisdn",
        "code": code,
        "deliveryStatus": status,
        "destination": "911111111111",
    }
    if at is not None:
        # The documented form: no offset, milliseconds.
        delivery_info["timeStamp"] = (
            at if isinstance(at, str) else at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        )
    delivery_info.update(info)
    notification: dict[str, Any] = {"deliveryInfo": delivery_info, "callbackData": "cb"}
    if transid is not None:
        notification["transid"] = transid
    if correlation_id is not None:
        notification["correlationid"] = correlation_id
    return {"deliveryInfoNotification": notification}


def mo(oa: str, message: str, *, tid: str | None = None, da: str = "56767") -> dict[str, Any]:
    body = {
        "userId": "u1",
        "channel": "SMS",
        "da": da,
        "oa": oa,
        "message": message,
        "datetime": "2026-01-02 03:04:05",
        "ts": "1767323045000",
    }
    if tid is not None:
        body["tid"] = tid
    return body


def body(value: Any) -> bytes:
    return orjson.dumps(value)


async def store_reports(conn: asyncpg.Connection, items: Sequence[dict[str, Any]]) -> int:
    """Store DR bodies through the receiver's own parser and INSERT; returns rows inserted."""
    parsed = [r for item in items for r in reports.parse_delivery_reports(body(item))]
    sql = db.load_queries()["webhook_insert_reports"]
    status = await conn.execute(sql, report_columns(parsed))
    return int(status.rsplit(" ", 1)[-1])


async def seed_campaign(
    conn: asyncpg.Connection,
    statuses: Sequence[str],
    *,
    campaign_status: str = "running",
    transids: bool = True,
) -> tuple[int, list[asyncpg.Record]]:
    """A campaign with one recipient per status; recipients past `sending` get a transid."""
    campaign_id = await create_campaign(conn, name="c", body="hello", status=campaign_status)
    rows = []
    for index, status in enumerate(statuses):
        with_transid = transids and status not in ("pending", "sending", "unknown")
        row = await conn.fetchrow(
            "INSERT INTO campaign.recipients "
            "(campaign_id, msisdn, status, transid, sent_at) "
            "VALUES ($1, $2, $3, $4, CASE WHEN $5 THEN now() END) RETURNING *",
            campaign_id,
            f"9198100{index:05d}",
            status,
            f"T-{campaign_id}-{index}" if with_transid else None,
            status not in ("pending", "sending"),
        )
        rows.append(row)
    return campaign_id, rows


def minutes(n: float) -> datetime:
    return BASE_TIME + timedelta(minutes=n)


@contextlib.asynccontextmanager
async def running_server(pool: db.Pool, **overrides: Any) -> AsyncIterator[WebhookServer]:
    """A WebhookServer on 127.0.0.1, a free port, stopped on exit."""
    settings = WebhookSettings(**({"listen": "127.0.0.1:0", "token": TOKEN} | overrides))
    server = WebhookServer(
        pool=pool, settings=settings, optout=OptOutSettings(), queries=db.load_queries()
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def raw_exchange(
    url: str, data: bytes | list[bytes], *, pause_s: float = 0.0, timeout_s: float = 30.0
) -> bytes:
    """Send `data` as is (a list: piece by piece, `pause_s` apart, until the server closes)
    on a new connection to `url`'s host and port; everything read back until the server
    closes or resets it. `timeout_s` is a safety net: TimeoutError if it never does."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    received = bytearray()

    async def read_to_end() -> None:
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                received.extend(chunk)

    try:
        async with asyncio.timeout(timeout_s):
            reading = asyncio.create_task(read_to_end())
            for piece in data if isinstance(data, list) else [data]:
                if reading.done():
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(piece)
                    await writer.drain()
                await asyncio.wait([reading], timeout=pause_s)
            await reading
    finally:
        writer.close()
    return bytes(received)
