"""Settings for in-process tests of the sending pipeline (producer, senders, worker), and
a drain run; rows come from tests/helpers/seed.py."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any

from campaign import config
from campaign.worker import Worker
from tests.helpers.proc import SERVICE_KEY, WEBHOOK_TOKEN


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
