"""One rate limit per service for a fleet of workers, coordinated through PostgreSQL.

Every sending worker registers in `campaign.workers` and heartbeats once a second. With
each heartbeat it learns, per service, how many live workers send for it (a worker is live
while its heartbeat is younger than `dead_after_s`) and takes `1 / N` of the rate in its
own limiter: the database is touched once per worker per second, never per batch. A clean
stop deletes the row, so the others take its share at their next heartbeat; a dead
worker's share comes back once its heartbeat is `dead_after_s` old.

The AIMD factor is the fleet's too (`campaign.service_rates`): a worker that sees repeated
7020 lowers the shared factor, every worker adopts it with its next heartbeat, and only
one step up per increase interval is taken, by whichever worker proposes it first.

A quiet worker (its producer found nothing to claim and it holds no batch) heartbeats
every QUIET_HEARTBEAT_S instead, and stays live for the others through its LISTEN
connection rather than its heartbeat's age (campaign.worker_live, migration 0008): while
that server process exists and `quiet_until` has not passed, the worker counts. Idle
workers thus keep their share exactly as before, so the others' shares do not move when
one wakes; a killed worker's connection closes at once, so its share still comes back at
the others' next heartbeat; one that hangs with its connection open is dropped at
`quiet_until`. Before its first claim after a quiet spell the producer calls
`ready_to_send`, which heartbeats at once as a sending worker: its own share is then fresh,
and it is back to a heartbeat a second (a worker that joined meanwhile waits 1.5 s for
that). Leases are not the fleet's business: they are renewed by the producer and taken
back by recovery on `lease_until` alone, whatever the heartbeat.

A worker joining a fleet that already sends for one of its services waits 1.5 heartbeat
intervals before it sends, so the others have lowered their share before it adds its own.
Workers started together (none registered more than an interval earlier) do not wait for
each other: the first may send at the full rate until its next heartbeat.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from campaign import db
from campaign.aio import sleep_or_stop, wait_woken
from campaign.ratelimit import ServiceLimiter

log = structlog.get_logger(__name__)

QUERIES = ("fleet_register", "fleet_heartbeat", "fleet_deregister")
HEARTBEAT_INTERVAL_S = 1.0
# Three missed heartbeats: a worker busy for a moment (a GC pause, a slow query) is not
# taken for dead, and a dead one's share still comes back within a few seconds.
DEAD_AFTER_S = 3.0
# A quiet worker's heartbeat: what it costs the database (a commit each), and how late a
# quiet worker learns that another died (the bench's takeover stays under 5 s).
QUIET_HEARTBEAT_S = 3.0


class WorkerIdInUse(Exception):
    """Another live worker registered with this worker id."""


@dataclass(frozen=True, slots=True)
class ServiceState:
    """What one heartbeat said about one service."""

    service: str
    factor: float
    live_workers: int
    min_rate_per_s: float
    # Other live workers registered more than a heartbeat interval ago.
    established_others: int = 0


def proposal(*, local: float, adopted: float | None) -> float | None:
    """The factor to offer the fleet: the local one when this worker's limiter moved it
    (a 7020 lowered it, successes raised it) since it last adopted the fleet's; None
    otherwise. Offering an unchanged, older value would undo another worker's step."""
    if adopted is None or not math.isclose(local, adopted):
        return local
    return None


def share_of(*, rate_per_s: float, min_rate_per_s: float, live_workers: int) -> float:
    """This worker's part of its configured rate: the fleet shares the smallest configured
    rate equally among the live workers, so a worker with a stale, higher rate in its
    config still does not push the fleet over."""
    if live_workers < 1 or rate_per_s <= 0 or min_rate_per_s <= 0:
        raise ValueError("live_workers and the rates must be positive")
    return min(1.0, min_rate_per_s / (live_workers * rate_per_s))


class Fleet:
    """This worker's membership of the fleet and its limiters' share and factor."""

    def __init__(
        self,
        *,
        pool: db.Pool,
        queries: Mapping[str, str],
        worker_id: str,
        limiters: Mapping[str, ServiceLimiter],
        heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S,
        dead_after_s: float = DEAD_AFTER_S,
        quiet: Callable[[], bool] = lambda: False,
        listen_pid: Callable[[], int | None] = lambda: None,
        quiet_heartbeat_s: float = QUIET_HEARTBEAT_S,
    ) -> None:
        self._pool = pool
        self._queries = db.require(queries, QUERIES)
        self._worker_id = worker_id
        self._limiters = limiters
        self._interval_s = heartbeat_interval_s
        self._dead_after_s = dead_after_s
        # Services by name, in the order the arrays of every statement use.
        self._services = sorted(limiters)
        self.states: dict[str, ServiceState] = {}
        # The fleet factor each limiter last adopted, to tell its own moves from the fleet's.
        self._adopted: dict[str, float] = {}
        # Whether this worker holds and claims nothing (the producer's view), and the
        # server pid of its LISTEN connection: a quiet heartbeat needs both.
        self._quiet = quiet
        self._listen_pid = listen_pid
        self._quiet_interval_s = quiet_heartbeat_s
        # A quiet worker with its LISTEN connection open counts as live this long without
        # another heartbeat: three missed quiet heartbeats, as DEAD_AFTER_S for a sending one.
        self._quiet_live_s = 3 * quiet_heartbeat_s
        # The last heartbeat was a quiet one. Heartbeats take turns (the loop's and
        # ready_to_send's), so a quiet one never lands after the sending one that ends it.
        self.quiet = False
        self._turn = asyncio.Lock()
        self._woken = asyncio.Event()

    async def join(self, stop: asyncio.Event) -> None:
        """Register, then take this worker's shares. Waits for a dead predecessor with the
        same id to expire (at most about `dead_after_s`); raises WorkerIdInUse if a live
        worker keeps the id."""
        deadline = asyncio.get_running_loop().time() + self._dead_after_s + 2 * self._interval_s
        while not await self._register():
            if asyncio.get_running_loop().time() >= deadline:
                raise WorkerIdInUse(
                    f"worker id {self._worker_id!r} is used by a live worker: "
                    "give each worker its own [worker] worker_id or --worker-id"
                )
            log.warning("worker_id_in_use", worker_id=self._worker_id, retry_in_s=self._interval_s)
            if await sleep_or_stop(stop, self._interval_s):
                return
        states = await self.heartbeat()
        if any(s.established_others for s in states):
            # Workers already sending lower their share at their next heartbeat; sending
            # before that would put the fleet over the rate for up to one interval. Workers
            # started together (none established yet) do not wait for each other.
            log.info(
                "fleet_joining",
                worker_id=self._worker_id,
                live_workers={s.service: s.live_workers for s in states},
                wait_s=self._interval_s,
            )
            if await sleep_or_stop(stop, self._interval_s * 1.5):
                return
            await self.heartbeat()

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat every interval (quiet: every quiet interval) until `stop` is set; a
        failing database is retried."""
        while not stop.is_set():
            self._woken.clear()
            await wait_woken(
                self._woken, stop, self._quiet_interval_s if self.quiet else self._interval_s
            )
            if stop.is_set():
                return
            if self._woken.is_set():
                # ready_to_send just heartbeated: the next one is an interval after it.
                continue
            try:
                await self.heartbeat()
            except db.UNAVAILABLE_ERRORS as exc:
                # Shares stay as they were; without the database nothing is claimed or
                # marked posting either, so a stale share cannot send much.
                log.warning("fleet_heartbeat_failed", error=str(exc), error_type=type(exc).__name__)

    async def ready_to_send(self) -> None:
        """Before the first claim after a quiet spell: heartbeat now, as a sending worker,
        so the claim is sized to a fresh share and the next heartbeat comes in a second."""
        async with self._turn:
            if not self.quiet:
                return
            await self._heartbeat(quiet=False)
        self._woken.set()

    async def leave(self) -> None:
        """Deregister (on a clean stop), so the others take the share at once."""
        try:
            await self._pool.execute(self._queries["fleet_deregister"], self._worker_id)
        except db.UNAVAILABLE_ERRORS as exc:
            # The row stops counting once its heartbeat is dead_after_s old.
            log.warning("fleet_leave_failed", error=str(exc), error_type=type(exc).__name__)
        else:
            log.info("fleet_left", worker_id=self._worker_id)

    async def heartbeat(self) -> list[ServiceState]:
        """One round trip: stay alive, offer the local AIMD factors, apply shares and
        factors. Quiet when this worker claims nothing and its LISTEN connection is open."""
        async with self._turn:
            return await self._heartbeat(quiet=None)

    async def _heartbeat(self, *, quiet: bool | None) -> list[ServiceState]:
        listen_pid = self._listen_pid()
        if quiet is None:
            quiet = listen_pid is not None and self._quiet()
        limiters = [self._limiters[name] for name in self._services]
        rows = await self._pool.fetch(
            self._queries["fleet_heartbeat"],
            self._worker_id,
            self._services,
            [lim.rate_per_s for lim in limiters],
            [
                proposal(local=lim.factor, adopted=self._adopted.get(name))
                for name, lim in zip(self._services, limiters, strict=True)
            ],
            [lim.increase_interval_s for lim in limiters],
            [lim.increase_fraction for lim in limiters],
            self._dead_after_s,
            self._interval_s,
            listen_pid,
            self._quiet_live_s if quiet else None,
        )
        self.quiet = quiet
        if rows and not rows[0]["registered"]:
            # Our row was deleted (pruned while this worker hung): count again from now on.
            log.warning("fleet_reregistered", worker_id=self._worker_id)
            if not await self._register():
                raise WorkerIdInUse(f"worker id {self._worker_id!r} was taken by another worker")
        states = [
            ServiceState(
                service=row["service"],
                factor=row["factor"],
                live_workers=row["live_workers"],
                min_rate_per_s=row["min_rate_per_s"],
                established_others=row["established_others"],
            )
            for row in rows
        ]
        for state in states:
            self._apply(state)
        return states

    def _apply(self, state: ServiceState) -> None:
        limiter = self._limiters[state.service]
        limiter.set_share(
            share_of(
                rate_per_s=limiter.rate_per_s,
                min_rate_per_s=state.min_rate_per_s,
                live_workers=state.live_workers,
            )
        )
        limiter.adopt_factor(state.factor)
        self._adopted[state.service] = limiter.factor
        previous = self.states.get(state.service)
        self.states[state.service] = state
        if state != previous:
            log.info(
                "fleet_rate_changed",
                worker_id=self._worker_id,
                service=state.service,
                live_workers=state.live_workers,
                share=round(limiter.share, 4),
                factor=round(limiter.factor, 4),
                rate_per_s=round(limiter.effective_rate_per_s, 3),
                batch=limiter.max_batch,
            )

    async def _register(self) -> bool:
        limiters = [self._limiters[name] for name in self._services]
        started = await self._pool.fetchval(
            self._queries["fleet_register"],
            self._worker_id,
            self._services,
            [lim.rate_per_s for lim in limiters],
            self._dead_after_s,
        )
        if started is None:
            return False
        log.info("fleet_joined", worker_id=self._worker_id, services=self._services)
        return True
