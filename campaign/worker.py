"""The worker: composition and lifecycle of every role.

Producer, senders (one group per service), crash recovery, the webhook receiver, the
reconciler, the event forwarder (when [events] forward_url is set; one per fleet, by a
lease) and the stats line run in one TaskGroup, so a task dying stops the worker
loudly with a non-zero exit. Each role can be switched off (`Roles`) to run them apart.
Stopping (SIGTERM / SIGINT, or drain mode running out of work) stops claiming at once,
lets requests in flight finish within `shutdown_grace_s`, writes their results, gives the
unsent batches back, and only then stops the receiver, so reports keep landing meanwhile.
The `worker` and `webhooks` commands also serve the ops address (campaign/ops.py): bound
first, so a taken port stops the process before it starts anything, and stopped last; the
worker answers its probes (its stats loop turning, its roles started).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import socket
import time
from collections.abc import Mapping

import structlog

from campaign import config, db, metrics, ops
from campaign.aio import sleep_or_stop
from campaign.batch import Lane
from campaign.fleet import Fleet
from campaign.forwarder import Forwarder, write_event_settings
from campaign.producer import Producer
from campaign.reconciler import Reconciler
from campaign.recovery import Recovery
from campaign.reports import OptOutRegions
from campaign.sender import Sender, create_session, sessions_needed
from campaign.webhooks import WebhookServer, notify_url

log = structlog.get_logger(__name__)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclasses.dataclass(frozen=True, slots=True)
class Roles:
    """Which roles this process runs; all by default."""

    sender: bool = True
    webhooks: bool = True
    reconciler: bool = True


class Worker:
    def __init__(
        self,
        *,
        settings: config.Settings,
        dsn: str,
        drain: bool = False,
        roles: Roles = Roles(),
        serve_ops: bool = False,
    ) -> None:
        self._settings = settings
        self._dsn = dsn
        self._drain = drain
        self._roles = roles
        self._stop = asyncio.Event()
        # The ops address (/metrics, /healthz, /readyz, dashboard): the commands serve it,
        # workers run inside tests and the demo leave it off.
        self.ops = (
            ops.OpsServer(
                settings=settings.ops, liveness=self.liveness, roles_started=self.roles_started
            )
            if serve_ops
            else None
        )
        # Roles up and running; the stats loop's last turn (monotonic), for /healthz.
        self.started: set[str] = set()
        self._last_turn: float | None = None
        self.worker_id = settings.worker.worker_id or default_worker_id()
        # Filled by run(); each lane exposes its limiter's effective rate and queue depth.
        self.lanes: dict[str, Lane] = {}
        self.senders: list[Sender] = []
        self.webhooks: WebhookServer | None = None
        self.forwarder: Forwarder | None = None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Stop claiming, finish what is in flight, then let run() return."""
        if not self._stop.is_set():
            log.info("worker_stopping", worker_id=self.worker_id)
            self._stop.set()

    async def run(self) -> int:
        """Run until stopped; 0 on a clean stop, 1 when drain mode ended with a service stopped."""
        settings = self._settings
        roles = self._roles
        if not (roles.sender or roles.webhooks or roles.reconciler):
            log.error("worker_not_started", reason="every role is switched off")
            return 2
        if roles.sender and not settings.services:
            log.error("worker_not_started", reason="no [services.NAME] table in the config")
            return 2
        if (roles.webhooks or roles.sender) and not settings.webhooks.token:
            # Without a token the DR URL would be guessable, or the receiver would refuse all.
            log.error("worker_not_started", reason="[webhooks] token is not set")
            return 2
        if self._drain and not roles.sender:
            log.error("worker_not_started", reason="--drain needs the sender role")
            return 2
        if settings.database.pool_max < 2:
            # The producer holds one connection for LISTEN; with one in all it would wait forever.
            log.error("worker_not_started", reason="[database] pool_max must be at least 2")
            return 2
        if self.ops is not None:
            # First: a taken port stops the process before it touches the database.
            await self.ops.start()
        try:
            return await self._connect_and_run()
        finally:
            if self.ops is not None:
                await self.ops.stop()

    async def _connect_and_run(self) -> int:
        settings = self._settings
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
        if self.ops is not None:
            self.ops.attach(pool)
        try:
            return await self._run(pool)
        finally:
            if self.ops is not None:
                self.ops.attach(None)
            await pool.close()

    async def liveness(self) -> ops.Check:
        """/healthz: the stats loop (a turn every stats_interval_s) is still turning."""
        if self._last_turn is None or self.stopping:
            return ops.Check(True, {"phase": "stopping" if self.stopping else "starting"})
        silent_s = time.monotonic() - self._last_turn
        limit_s = 3 * self._settings.worker.stats_interval_s + 30.0
        detail = {"phase": "running", "loop_silent_s": round(silent_s, 1)}
        return ops.Check(silent_s < limit_s, detail)

    async def roles_started(self) -> ops.Check:
        """/readyz: every role this process runs has started."""
        wanted = {name for name, on in dataclasses.asdict(self._roles).items() if on}
        waiting = sorted(wanted - self.started)
        return ops.Check(not waiting, {"roles": sorted(wanted), "roles_starting": waiting})

    def _role_started(self, role: str) -> None:
        self.started.add(role)
        metrics.ROLE_UP.labels(role).set(1)

    async def _run(self, pool: db.Pool) -> int:
        settings = self._settings
        queries = db.load_queries()
        log.info(
            "worker_started",
            worker_id=self.worker_id,
            services=sorted(settings.services) if self._roles.sender else [],
            roles=[name for name, on in dataclasses.asdict(self._roles).items() if on],
            drain=self._drain,
        )
        # The triggers that write campaign.events read this; written before any role runs.
        await write_event_settings(pool, queries, settings.events, self.worker_id)
        reconciler = None
        if self._roles.reconciler:
            reconciler = Reconciler(
                pool=pool,
                settings=settings.reconciler,
                queries=queries,
                policy=settings.policy,
                max_attempts={n: s.max_attempts for n, s in settings.services.items()},
                idle_max_s=settings.worker.idle_max_s,
            )
        if self._roles.webhooks:
            self.webhooks = WebhookServer(
                pool=pool,
                settings=settings.webhooks,
                optout=settings.optout,
                queries=queries,
                regions=OptOutRegions.from_services(settings.services.values()),
                on_stored=reconciler.wake if reconciler is not None else None,
            )
            await self.webhooks.start()
            self._role_started("webhooks")
        try:
            async with asyncio.TaskGroup() as tg:
                if reconciler is not None:
                    tg.create_task(reconciler.run(self._stop), name="reconciler")
                    self._role_started("reconciler")
                if settings.events.forward_url:
                    self.forwarder = Forwarder(
                        pool=pool,
                        queries=queries,
                        settings=settings.events,
                        worker_id=self.worker_id,
                    )
                    tg.create_task(self.forwarder.run(self._stop), name="forwarder")
                tg.create_task(self._report_stats(pool, queries), name="stats")
                if self._roles.sender:
                    await self._send(pool, queries, reconciler)
                else:
                    await self._stop.wait()
        except Exception:
            log.exception("worker_failed", worker_id=self.worker_id)
            raise
        finally:
            for role in self.started:
                metrics.ROLE_UP.labels(role).set(0)
            self.started.clear()
            if self.webhooks is not None:
                await asyncio.shield(self.webhooks.stop())
        stopped = sorted(name for name, lane in self.lanes.items() if lane.stopped)
        log.info("worker_stopped", worker_id=self.worker_id, services_stopped=stopped)
        return 1 if self._drain and stopped else 0

    async def _send(
        self, pool: db.Pool, queries: Mapping[str, str], reconciler: Reconciler | None
    ) -> None:
        """Producer, senders and recovery until stopped; unsent batches released at the end."""
        settings = self._settings
        lanes = {
            name: Lane(name=name, settings=service, queue_size=settings.producer.queue_size)
            for name, service in settings.services.items()
        }
        # The fleet heartbeats quietly while the producer is idle; the producer has it
        # heartbeat as a sending worker before its first claim after that.
        fleet: Fleet | None = None

        async def before_claim() -> None:
            assert fleet is not None
            await fleet.ready_to_send()

        producer = Producer(
            pool=pool,
            queries=queries,
            lanes=lanes,
            settings=settings.producer,
            worker_id=self.worker_id,
            notify_url=notify_url(settings.webhooks.public_url, settings.webhooks.token),
            policy=settings.policy,
            idle_max_s=settings.worker.idle_max_s,
            before_claim=before_claim,
        )
        # Registered before the first claim, so every batch is sized to this worker's share.
        fleet = Fleet(
            pool=pool,
            queries=queries,
            worker_id=self.worker_id,
            limiters={name: lane.limiter for name, lane in lanes.items()},
            quiet=lambda: producer.idle,
            listen_pid=lambda: producer.listen_pid,
        )
        await fleet.join(self._stop)
        self.lanes = lanes
        recovery = Recovery(
            pool=pool,
            queries=queries,
            services=settings.services,
            worker_id=self.worker_id,
            interval_s=settings.producer.recovery_interval_s,
            idle_max_s=settings.worker.idle_max_s,
        )
        await recovery.run_once()

        def on_taken() -> None:
            # A batch is on its way: its results, then its reports, follow.
            producer.wake()
            if reconciler is not None:
                reconciler.wake()

        async with create_session(
            connections=sessions_needed(list(self.lanes.values()))
        ) as session:
            self.senders = [
                Sender(
                    pool=pool,
                    queries=queries,
                    lane=lane,
                    session=session,
                    api=settings.api,
                    producer=settings.producer,
                    worker_id=self.worker_id,
                    on_taken=on_taken,
                )
                for lane in self.lanes.values()
            ]
            # /metrics shows each lane's gauges from the start, not after a stats turn.
            self._lane_gauges()
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(producer.run(self._stop), name="producer")
                    sending = [
                        tg.create_task(s.run(self._stop), name=f"sender-{lane}")
                        for s, lane in zip(self.senders, self.lanes, strict=True)
                    ]
                    tg.create_task(recovery.run(self._stop), name="recovery")
                    tg.create_task(self._enforce_grace(sending), name="grace")
                    tg.create_task(fleet.run(self._stop), name="fleet")
                    self._role_started("sender")
                    if self._drain:
                        tg.create_task(self._watch_drain(recovery), name="drain")
            finally:
                await asyncio.shield(self._release(recovery))
                await asyncio.shield(fleet.leave())

    async def _report_stats(self, pool: db.Pool, queries: Mapping[str, str]) -> None:
        """A worker_stats line every stats_interval_s, and the gauges behind /metrics."""
        interval_s = self._settings.worker.stats_interval_s
        last = time.monotonic()
        last_accepted = last_rejected = last_reports = 0
        while not self._stop.is_set():
            self._last_turn = time.monotonic()
            await sleep_or_stop(self._stop, interval_s)
            now = time.monotonic()
            elapsed_s = max(now - last, 1e-9)
            accepted = sum(s.accepted for s in self.senders)
            rejected = sum(s.rejected for s in self.senders)
            reports = self.webhooks.stats.reports_stored if self.webhooks else 0
            lag_s: float | None = None
            waiting: int | None = None
            try:
                row = await pool.fetchrow(queries["worker_report_lag"])
            except db.UNAVAILABLE_ERRORS as exc:
                log.warning("stats_query_failed", error=str(exc), error_type=type(exc).__name__)
            else:
                assert row is not None
                lag_s, waiting = round(row["lag_s"], 3), row["waiting"]
                metrics.REPORT_LAG_SECONDS.set(lag_s)
            if self.forwarder is not None and self.forwarder.holding:
                try:
                    metrics.EVENTS_BACKLOG.set(await self.forwarder.backlog())
                except db.UNAVAILABLE_ERRORS as exc:
                    log.warning("stats_query_failed", error=str(exc), error_type=type(exc).__name__)
            self._lane_gauges()
            log.info(
                "worker_stats",
                worker_id=self.worker_id,
                interval_s=round(elapsed_s, 1),
                sent_per_s=round(
                    (accepted + rejected - last_accepted - last_rejected) / elapsed_s, 1
                ),
                accepted=accepted - last_accepted,
                rejected=rejected - last_rejected,
                reports_per_s=round((reports - last_reports) / elapsed_s, 1),
                queue_depth={n: lane.queue.qsize() for n, lane in self.lanes.items()},
                in_flight=sum(s.in_flight for s in self.senders),
                effective_rate_per_s={
                    n: round(lane.limiter.effective_rate_per_s, 1) for n, lane in self.lanes.items()
                },
                report_lag_s=lag_s,
                reports_waiting=waiting,
            )
            last, last_accepted, last_rejected, last_reports = now, accepted, rejected, reports

    def _lane_gauges(self) -> None:
        # Lanes exist from fleet.join on, their senders a little later: each list alone.
        for name, lane in self.lanes.items():
            metrics.QUEUE_DEPTH.labels(name).set(lane.queue.qsize())
            metrics.EFFECTIVE_RATE.labels(name).set(lane.limiter.effective_rate_per_s)
        for sender in self.senders:
            metrics.IN_FLIGHT.labels(sender.service).set(sender.in_flight)

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
        while not await sleep_or_stop(self._stop, interval_s):
            active = [name for name, lane in self.lanes.items() if not lane.stopped]
            try:
                remaining = bool(active) and await recovery.work_remaining(active)
            except db.UNAVAILABLE_ERRORS as exc:
                log.error("drain_check_failed", error=str(exc), error_type=type(exc).__name__)
                continue
            if not remaining:
                log.info("worker_drained", worker_id=self.worker_id)
                self.request_stop()
                return

    async def _release(self, recovery: Recovery) -> None:
        try:
            await recovery.release_worker()
        except db.UNAVAILABLE_ERRORS as exc:
            # The leases run out and another worker's recovery does the same.
            log.error("batches_not_released", error=str(exc), error_type=type(exc).__name__)


async def cmd_worker(args: argparse.Namespace, settings: config.Settings) -> int:
    """`campaign worker [--drain] [--worker-id ID] [--no-sender|--no-webhooks|--no-reconciler]`."""
    if args.worker_id:
        settings = dataclasses.replace(
            settings, worker=dataclasses.replace(settings.worker, worker_id=args.worker_id)
        )
    roles = Roles(
        sender=not args.no_sender, webhooks=not args.no_webhooks, reconciler=not args.no_reconciler
    )
    return await _serve(_ops_listen(settings, args.ops_listen), roles=roles, drain=args.drain)


async def cmd_webhooks(args: argparse.Namespace, settings: config.Settings) -> int:
    """`campaign webhooks [--listen HOST:PORT]`: the receiver and the reconciler only."""
    if args.listen:
        settings = dataclasses.replace(
            settings, webhooks=dataclasses.replace(settings.webhooks, listen=args.listen)
        )
    settings = _ops_listen(settings, args.ops_listen)
    return await _serve(settings, roles=Roles(sender=False), drain=False)


def _ops_listen(settings: config.Settings, listen: str | None) -> config.Settings:
    """`--ops-listen HOST:PORT` over `[ops] listen`: several workers share one config file."""
    if not listen:
        return settings
    config.check_listen(listen, "--ops-listen", "")
    return dataclasses.replace(settings, ops=dataclasses.replace(settings.ops, listen=listen))


async def _serve(settings: config.Settings, *, roles: Roles, drain: bool) -> int:
    """Run a worker until it stops; SIGTERM / SIGINT stop it, a second one exits at once."""

    async with db.database(settings) as dsn:
        worker = Worker(settings=settings, dsn=dsn, drain=drain, roles=roles, serve_ops=True)
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if worker.stopping:
                # A second signal: the operator does not want to wait for the grace period.
                log.warning("worker_killed", signal=signal.Signals(signum).name)
                os._exit(128 + signum)
            worker.request_stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await worker.run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
