"""Seeding and settings for tests of the sending pipeline (producer, senders, worker)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from campaign import config
from campaign.worker import Worker

SERVICE_KEY = "test-service-key-1234"
WEBHOOK_TOKEN = "test-webhook-token-5678"


def numbers(count: int, *, start: int = 0) -> list[str]:
    """Valid Indian mobile numbers in the API's form (country code, no '+')."""
    return [f"9198{start + i:08d}" for i in range(count)]


async def create_campaign(conn: asyncpg.Connection, **columns: Any) -> int:
    values: dict[str, Any] = {
        "name": "test",
        "service": "default",
        "body": "Hello",
        "status": "ready",
    } | columns
    if "template_id" in columns and "body" not in columns:
        values["body"] = None
    names = ", ".join(values)
    params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    return int(
        await conn.fetchval(
            f"INSERT INTO campaign.campaigns ({names}) VALUES ({params}) RETURNING id",
            *values.values(),
        )
    )


async def add_recipients(
    conn: asyncpg.Connection,
    campaign_id: int,
    msisdns: Sequence[str],
    variables: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Insert recipients in order; returns their ids in the same order."""
    rows = await conn.fetch(
        """
        INSERT INTO campaign.recipients (campaign_id, msisdn, variables)
        SELECT $1, m, v
          FROM unnest($2::text[], $3::jsonb[]) WITH ORDINALITY AS u(m, v, n)
         ORDER BY n
        RETURNING id
        """,
        campaign_id,
        list(msisdns),
        list(variables) if variables is not None else [{} for _ in msisdns],
    )
    return sorted(r["id"] for r in rows)


async def statuses(conn: asyncpg.Connection, campaign_id: int) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT status, count(*) AS n FROM campaign.recipients WHERE campaign_id = $1 "
        "GROUP BY status",
        campaign_id,
    )
    return {r["status"]: r["n"] for r in rows}


def make_settings(
    base_url: str,
    *,
    service: Mapping[str, Any] | None = None,
    producer: Mapping[str, Any] | None = None,
    api: Mapping[str, Any] | None = None,
    worker: Mapping[str, Any] | None = None,
    services: Mapping[str, Mapping[str, Any]] | None = None,
) -> config.Settings:
    """Settings scaled down for tests: fast polls, short backoff, short grace."""
    service_values: dict[str, Any] = {
        "key": SERVICE_KEY,
        "sender_id": "TESTID",
        "rate_per_s": 10_000.0,
        "batch_size": 100,
        "max_in_flight": 2,
        "in_doubt_grace_s": 0.3,
        "max_attempts": 5,
    } | dict(service or {})
    all_services = {"default": config.ServiceSettings(**service_values)}
    for name, overrides in (services or {}).items():
        all_services[name] = config.ServiceSettings(**(service_values | dict(overrides)))
    return config.Settings(
        api=config.ApiSettings(**({"base_url": base_url, "timeout_s": 2.0} | dict(api or {}))),
        services=all_services,
        producer=dataclasses.replace(
            config.ProducerSettings(
                poll_interval_s=0.05,
                queue_size=4,
                lease_s=30.0,
                backoff_base_s=0.01,
                backoff_max_s=0.05,
                recovery_interval_s=0.1,
            ),
            **dict(producer or {}),
        ),
        # The worker's own receiver binds a free port; reports are not under test here.
        webhooks=config.WebhookSettings(
            listen="127.0.0.1:0", public_url="http://127.0.0.1:1", token=WEBHOOK_TOKEN
        ),
        worker=config.WorkerSettings(
            **({"worker_id": "test-worker", "shutdown_grace_s": 5.0} | dict(worker or {}))
        ),
        database=config.DatabaseSettings(pool_min=1, pool_max=6),
    )


async def drain(settings: config.Settings, dsn: str, *, timeout_s: float = 60.0) -> int:
    """Run a worker in drain mode to the end; the timeout is only a safety limit."""
    worker = Worker(settings=settings, dsn=dsn, drain=True)
    return await asyncio.wait_for(worker.run(), timeout=timeout_s)
