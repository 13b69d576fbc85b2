"""The worker: composition and lifecycle of the sending pipeline.

Producer, senders (one group per service) and crash recovery run in one TaskGroup, so a
task dying stops the worker loudly. Stopping (SIGTERM / SIGINT, or drain mode running out
of work) stops claiming at once, lets requests in flight finish within
`shutdown_grace_s`, writes their results, and gives the unsent batches back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import socket

import structlog

from campaign import config, db
from campaign.producer import DB_ERRORS, Lane, Producer, notify_url
from campaign.recovery import Recovery
from campaign.sender import Sender, create_session, sessions_needed

log = structlog.get_logger(__name__)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    def __init__(self, *, settings: config.Settings, dsn: str, drain: bool = False) -> None:
        self._settings = settings
        self._dsn = dsn
        self._drain = drain
        self._stop = asyncio.Event()
        self.worker_id = settings.worker.worker_id or default_worker_id()
        # Filled by run(); each lane exposes its limiter's effective rate and queue depth.
        self.lanes: dict[str, Lane] = {}

    def request_stop(self) -> None:
        """Stop claiming, finish what is in flight, then let run() return."""
        if not self._stop.is_set():
            log.info("worker_stopping", worker_id=self.worker_id)
            self._stop.set()

    async def run(self) -> int:
        """Run until stopped; 0 on a clean stop, 1 when drain mode ended with a service stopped."""
        settings = self._settings
        if not settings.services:
            log.error("worker_not_started", reason="no [services.NAME] table in the config")
            return 2
        if settings.database.pool_max < 2:
            # The producer holds one connection for LISTEN; with one in all it would wait forever.
            log.error("worker_not_started", reason="[database] pool_max must be at least 2")
            return 2
        conn = await db.connect(self._dsn, timeout_s=settings.database.connect_timeout_s)
        try:
            await db.check_schema(conn)
        finally:
            await conn.close()
        pool = await db.create_pool(
            self._dsn,
            min_size=settings.database.pool_min,
            max_size=settings.database.pool_max,
            timeout_s=settings.database.connect_timeout_s,
        )
        try:
            return await self._run(pool)
        finally:
            await pool.close()

    async def _run(self, pool: db.Pool) -> int:
        settings = self._settings
        queries = db.load_queries()
        self.lanes = {
            name: Lane(name=name, settings=service, queue_size=settings.producer.queue_size)
            for name, service in settings.services.items()
        }
        recovery = Recovery(
            pool=pool,
            queries=queries,
            services=settings.services,
            worker_id=self.worker_id,
            interval_s=settings.producer.recovery_interval_s,
        )
        await recovery.run_once()
        producer = Producer(
            pool=pool,
            queries=queries,
            lanes=self.lanes,
            settings=settings.producer,
            worker_id=self.worker_id,
            notify_url=notify_url(settings.webhooks.public_url, settings.webhooks.token),
        )
        log.info(
            "worker_started",
            worker_id=self.worker_id,
            services=sorted(self.lanes),
            drain=self._drain,
        )
        async with create_session(
            connections=sessions_needed(list(self.lanes.values()))
        ) as session:
            senders = [
                Sender(
                    pool=pool,
                    queries=queries,
                    lane=lane,
                    session=session,
                    api=settings.api,
                    producer=settings.producer,
                    worker_id=self.worker_id,
                    on_taken=producer.wake,
                )
                for lane in self.lanes.values()
            ]
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(producer.run(self._stop), name="producer")
                    sending = [
                        tg.create_task(s.run(self._stop), name=f"sender-{lane}")
                        for s, lane in zip(senders, self.lanes, strict=True)
                    ]
                    tg.create_task(recovery.run(self._stop), name="recovery")
                    tg.create_task(self._enforce_grace(sending), name="grace")
                    if self._drain:
                        tg.create_task(self._watch_drain(recovery), name="drain")
            except Exception:
                log.exception("worker_failed", worker_id=self.worker_id)
                raise
            finally:
                await asyncio.shield(self._release(recovery))
        stopped = sorted(name for name, lane in self.lanes.items() if lane.stopped)
        log.info("worker_stopped", worker_id=self.worker_id, services_stopped=stopped)
        return 1 if self._drain and stopped else 0

    async def _enforce_grace(self, sending: list[asyncio.Task[None]]) -> None:
        """After a stop, give requests in flight `shutdown_grace_s`, then cancel them."""
        await self._stop.wait()
        _, late = await asyncio.wait(sending, timeout=self._settings.worker.shutdown_grace_s)
        if late:
            log.warning("shutdown_grace_expired", senders=len(late))
            for task in late:
                task.cancel()

    async def _watch_drain(self, recovery: Recovery) -> None:
        """Drain mode: stop once nothing is due, in flight or in doubt on a live service."""
        interval_s = self._settings.producer.poll_interval_s
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=interval_s)
            if self._stop.is_set():
                return
            active = [name for name, lane in self.lanes.items() if not lane.stopped]
            try:
                remaining = bool(active) and await recovery.work_remaining(active)
            except DB_ERRORS as exc:
                log.error("drain_check_failed", error=str(exc), error_type=type(exc).__name__)
                continue
            if not remaining:
                log.info("worker_drained", worker_id=self.worker_id)
                self.request_stop()
                return

    async def _release(self, recovery: Recovery) -> None:
        try:
            await recovery.release_worker()
        except DB_ERRORS as exc:
            # The leases run out and another worker's recovery does the same.
            log.error("batches_not_released", error=str(exc), error_type=type(exc).__name__)


async def cmd_worker(args: argparse.Namespace, settings: config.Settings) -> int:
    """`campaign worker [--drain] [--worker-id ID]`."""
    from campaign.cli import database

    if args.worker_id:
        settings = dataclasses.replace(
            settings, worker=dataclasses.replace(settings.worker, worker_id=args.worker_id)
        )
    async with database(settings) as dsn:
        worker = Worker(settings=settings, dsn=dsn, drain=args.drain)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.request_stop)
        try:
            return await worker.run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
