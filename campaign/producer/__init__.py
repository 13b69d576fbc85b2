"""The producer: claims batches of pending recipients and hands them to the senders.

It wakes on NOTIFY `campaign_work` and also polls every `poll_interval_s`, so a lost
notification delays work by one interval at most. Each service has its own bounded
queue (a `Lane`); a batch is claimed only for a service whose queue has room, so a slow
service never holds up another and no claimed batch waits outside a queue.

Idle: a pass that finds nothing (no batch claimed, none held) doubles the wait before the
next, up to `[worker] idle_max_s`. NOTIFY only wakes, polling still runs, and an idle
worker costs the database one transaction per poll (the sweeps, rows made due and a probe
for due work, together). The backoff needs the LISTEN connection (without it polling is
all there is) and never delays a lease renewal: while this worker holds a batch it polls
every poll_interval_s, and only a claim, which ends the backoff, gives it one. Before a
claim, `before_claim` lets the fleet heartbeat if it was quiet, so the batch is sized to
a fresh share.

Per recipient it normalises the number, drops opted-out numbers, holds back rows outside
their local sending window (they wait, pending, for its opening: producer_release_due
makes them claimable then, so waiting rows cost no claim), renders the text and
checks it; rows that must not be sent (their final status) and rows held back (pending
till their window opens) leave the batch in one set-based statement (only when there are
any) and the rest become one request body, encoded once. What the
checks found for the rows sent (number, encoding, parts) travels with the batch and is
written with the results, so a sent row is written at claim and at its result only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from campaign import codes, db, metrics, payload, sms, window
from campaign.aio import IdleBackoff, wait_woken
from campaign.batch import Batch, Lane
from campaign.config import PolicySettings, ProducerSettings, ServiceSettings
from campaign.prepare import (
    WINDOW_CODES,
    Campaign,
    Claimed,
    Guards,
    Prepared,
    normalise_all,
    prepare,
)
from campaign.producer.sweeps import SWEEP_CHUNK, Sweeps, sweep_all, sweep_chunk
from campaign.statuses import MOSTLY_INVALID

log = structlog.get_logger(__name__)

NOTIFY_CHANNEL = "campaign_work"
QUERIES = (
    "producer_next_campaign",
    "producer_claim_batch",
    "producer_suppressed_numbers",
    "producer_prepare_recipients",
    "producer_cancel_pending",
    "producer_expire_pending",
    "producer_unknown_service_campaigns",
    "producer_renew_leases",
    "producer_release_due",
    "producer_judge_canaries",
    "producer_brake_campaigns",
    "producer_lock_campaign_numbers",
    "producer_unregistered_below",
    "producer_campaign_owners",
    "producer_register_numbers",
    "producer_lock_numbers",
    "producer_cap_counts",
    "producer_cap_held",
    "producer_reserve_caps",
    "producer_mark_prepared",
    "producer_prune_reservations",
)
# How often claims start again from each campaign's first due row (see Producer._after).
RESCAN_S = 10.0
# How far below a batch's lowest id the duplicate rule looks for pending rows to decide
# first (claims of other workers not committed yet lie just below; rows given back far
# below are decided when they are claimed again). sql/queries/producer.sql says why.
UNDECIDED_SPAN = 20_000


@dataclass(slots=True)
class _Claim:
    """A batch's rows as claim_batch returned them: claimed, not yet checked."""

    campaign: Campaign
    lane: Lane
    records: list[db.Record]


async def claim_batch(
    pool: db.Pool,
    sql: str,
    *,
    campaign_id: int,
    limit: int,
    service: str,
    worker_id: str,
    lease_s: float,
    after_id: int,
) -> list[db.Record]:
    """producer_claim_batch: up to `limit` due rows of one campaign with ids above
    `after_id`, now `sending` in a new batch leased to this worker."""
    return await pool.fetch(sql, campaign_id, limit, service, worker_id, lease_s, after_id)


def claimed_row(record: db.Record, *, foreign: bool = False) -> Claimed:
    return Claimed(
        id=record["id"],
        msisdn=record["msisdn"],
        variables=record["variables"],
        correlation_id=record["correlation_id"],
        attempts=record["attempts"],
        msisdn_e164=record["msisdn_e164"],
        foreign=foreign,
    )


async def read_guards(
    conn: db.PoolConnection | db.Connection,
    queries: Mapping[str, str],
    campaign: Campaign,
    rows: Sequence[Claimed],
    numbers: Sequence[str | sms.InvalidRecipient],
    guards: Guards,
    *,
    lock: bool,
) -> set[str]:
    """What `prepare` needs for these rows: the opted-out numbers (returned) and, into
    `guards` for numbers it does not know yet, each number's owner in the campaign and
    its count in the cap window. With `lock` the cap counts are read under the numbers'
    locks (the producer); `campaign check` reads without taking any."""
    valid = list({n for n in numbers if isinstance(n, str)})
    suppressed = {
        r["msisdn"] for r in await conn.fetch(queries["producer_suppressed_numbers"], valid)
    }
    if not guards.allow_duplicates:
        unknown = [n for n in valid if n not in guards.owners]
        for r in await conn.fetch(queries["producer_campaign_owners"], campaign.id, unknown):
            guards.owners[r["msisdn_e164"]] = r["recipient_id"]
    if guards.max_per_msisdn:
        own = sorted(
            {n for r, n in zip(rows, numbers, strict=True) if not r.foreign and isinstance(n, str)}
            - guards.in_window.keys()
        )
        if lock:
            await conn.execute(queries["producer_lock_numbers"], own)
        counts = await conn.fetch(queries["producer_cap_counts"], own, guards.window_h)
        guards.in_window.update((r["msisdn_e164"], r["n"]) for r in counts)
        held = await conn.fetch(queries["producer_cap_held"], [r.id for r in rows if not r.foreign])
        guards.held = {*guards.held, *(r["recipient_id"] for r in held)}
    return suppressed


def new_guards(campaign: Campaign, policy: PolicySettings) -> Guards:
    return Guards(
        allow_duplicates=campaign.allow_duplicates,
        max_per_msisdn=0 if campaign.bypass_caps else policy.max_per_msisdn,
        window_h=policy.cap_window_h,
    )


async def prepare_batch(
    conn: db.PoolConnection,
    queries: Mapping[str, str],
    campaign: Campaign,
    batch_id: int,
    rows: Sequence[Claimed],
    numbers: Sequence[str | sms.InvalidRecipient],
    *,
    service: ServiceSettings,
    policy: PolicySettings,
    planner: window.Planner | None = None,
) -> list[Prepared]:
    """Decide a claimed batch's rows and store what was decided (final statuses, numbers
    registered, cap reservations) in the caller's transaction.

    Duplicates: under the campaign's lock, rows of lower ids that no prepared batch has
    decided (another worker's batch not prepared yet) are decided first, in id order,
    without storing their status, so the lowest id of a number owns it whichever batch
    comes first. Cap: under one row lock per number (cap_numbers), counted and reserved
    in this transaction.
    """
    guards = new_guards(campaign, policy)
    mine = len(rows)
    if not guards.allow_duplicates:
        await conn.execute(queries["producer_lock_campaign_numbers"], campaign.id)
        below = await conn.fetch(
            queries["producer_unregistered_below"],
            campaign.id,
            max(r.id for r in rows),
            batch_id,
            min(r.id for r in rows) - UNDECIDED_SPAN,
        )
        if below:
            others = [claimed_row(r, foreign=True) for r in below]
            found = normalise_all(others, default_region=service.default_region)
            pairs = sorted(
                zip([*rows, *others], [*numbers, *found], strict=True), key=lambda p: p[0].id
            )
            rows, numbers = [r for r, _ in pairs], [n for _, n in pairs]
    suppressed = await read_guards(conn, queries, campaign, rows, numbers, guards, lock=True)
    prepared = prepare(
        campaign,
        rows,
        numbers,
        suppressed=suppressed,
        plus_prefix=service.plus_prefix,
        smartlink_length=service.smartlink_length,
        guards=guards,
        planner=planner,
    )
    if len(prepared) > mine:
        foreign = {r.id for r in rows if r.foreign}
        prepared = [p for p in prepared if p.id not in foreign]
    # Rows to send stay as claimed: their checks are written with their results.
    leaving = [p for p in prepared if p.destination is None]
    if leaving:
        await store_leaving(conn, queries["producer_prepare_recipients"], batch_id, leaving)
    if guards.registered:
        await conn.execute(
            queries["producer_register_numbers"],
            campaign.id,
            [n for n, _ in guards.registered],
            [i for _, i in guards.registered],
        )
    if guards.reserved:
        await conn.execute(
            queries["producer_reserve_caps"],
            [i for i, _ in guards.reserved],
            [n for _, n in guards.reserved],
        )
    await conn.execute(queries["producer_mark_prepared"], batch_id)
    return prepared


async def store_leaving(
    conn: db.PoolConnection, sql: str, batch_id: int, leaving: Sequence[Prepared]
) -> None:
    """producer_prepare_recipients: the rows that leave the batch unsent, final with
    their reasons or held by the sending window (pending until `next_attempt_at`)."""
    await conn.fetchval(
        sql,
        batch_id,
        [p.id for p in leaving],
        [p.status for p in leaving],
        [p.msisdn_e164 for p in leaving],
        [p.next_attempt_at for p in leaving],
        [p.error_code for p in leaving],
        [p.error_message for p in leaving],
    )


class Producer:
    def __init__(
        self,
        *,
        pool: db.Pool,
        queries: Mapping[str, str],
        lanes: Mapping[str, Lane],
        settings: ProducerSettings,
        worker_id: str,
        notify_url: str | None,
        policy: PolicySettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        idle_max_s: float = 0.0,
        before_claim: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._pool = pool
        self._backoff = IdleBackoff(base_s=settings.poll_interval_s, max_s=idle_max_s)
        self._before_claim = before_claim
        # The last pass found nothing to claim and this worker holds no batch.
        self.idle = False
        self._policy = policy or PolicySettings()
        self._queries = db.require(queries, QUERIES)
        self._lanes = lanes
        self._settings = settings
        self._worker_id = worker_id
        self._notify_url = notify_url
        self._clock = clock
        self._wake = asyncio.Event()
        self._listen_conn: db.PoolConnection | None = None
        self._last_sweep = -float("inf")
        self._last_renewal = -float("inf")
        self._sweeps = Sweeps(
            pool=pool, queries=self._queries, policy=self._policy, services=list(lanes)
        )
        # Campaigns already warned about as mostly invalid: one warning each.
        self._warned_invalid: set[int] = set()
        # Per campaign, the highest recipient id claimed so far: the next claim starts
        # there instead of walking the index entries of every row already sent. Dropped
        # when a claim comes back short or empty, and all of them every RESCAN_S, so rows
        # due again below it (retries, released batches) are found.
        self._after: dict[int, int] = {}
        self._rescanned = clock()

    def wake(self) -> None:
        """Look for work now (a notification arrived, or a queue has room again)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim until `stop` is set; then return, leaving queued batches to the senders."""
        try:
            while not stop.is_set():
                await self._listen()
                worked = True
                try:
                    await self._renew_if_due()
                    sweep = self._clock() - self._last_sweep >= self._settings.poll_interval_s
                    if sweep:
                        self._last_sweep = self._clock()
                    claimed = await self.fill(stop, sweep=sweep)
                    worked = bool(claimed or self._holding())
                except db.UNAVAILABLE_ERRORS as exc:
                    log.error("producer_failed", error=str(exc), error_type=type(exc).__name__)
                self.idle = not worked
                # Held batches (leases to renew) or no LISTEN (nothing would wake us): no
                # backoff, whatever the pass found.
                wait_s = self._backoff.after(worked=worked or not self._listening())
                await wait_woken(self._wake, stop, wait_s)
        finally:
            await self._unlisten()

    async def _renew_if_due(self) -> None:
        """Renew held leases every lease_s / 3: from the run loop, and between the claims
        of a fill pass, which a lane with room keeps going while another lane's batches
        wait (a fast service beside a slow one)."""
        if self._clock() - self._last_renewal >= self._settings.lease_s / 3:
            self._last_renewal = self._clock()
            await self.renew_leases()

    def _holding(self) -> bool:
        return any(lane.held for lane in self._lanes.values())

    @property
    def listen_pid(self) -> int | None:
        """The server process of the LISTEN connection (None: not listening); the fleet
        counts this worker live while it exists (fleet.py)."""
        if not self._listening():
            return None
        assert self._listen_conn is not None
        return int(self._listen_conn.get_server_pid())

    async def fill(self, stop: asyncio.Event | None = None, *, sweep: bool = False) -> int:
        """Claim batches while a lane has room and work is due; returns batches claimed.

        First, in one transaction: the sweeps (with `sweep`), rows whose wait is over made
        due, and a probe for any due row on a lane with room; an idle pass ends there.
        The claim statement of the next batch runs in the database while this process
        checks the numbers and renders the texts of the one before. Only one claim
        statement runs at a time: two at once on one campaign would split its rows
        between them (SKIP LOCKED), sending small campaigns in several requests.
        """
        self._wake.clear()
        services = [name for name, lane in self._lanes.items() if lane.has_room()]
        async with self._pool.acquire() as conn, conn.transaction():
            swept = await self._sweeps.once(conn) if sweep else None
            released = await sweep_chunk(conn, self._queries["producer_release_due"])
            due = bool(services) and await self._any_due(conn, services)
        # Committed: claims (other statements) see the rows made due.
        if released == SWEEP_CHUNK:
            released += await sweep_all(self._pool, self._queries["producer_release_due"])
        if swept is not None:
            await self._sweeps.finish(swept)
        if released:
            self._after.clear()  # the rows released may lie below a cursor
        if not due:
            return 0
        self.idle = False
        if self._before_claim is not None:
            await self._before_claim()
        if self._clock() - self._rescanned >= RESCAN_S:
            self._rescanned = self._clock()
            self._after.clear()
        # Campaigns found empty in this pass: a concurrent claimer took their last rows.
        skip: list[int] = []
        claimed = 0
        ahead: asyncio.Task[_Claim | None] | None = asyncio.create_task(
            self._claim_next(stop, skip)
        )
        try:
            while ahead is not None:
                current = await ahead
                ahead = None
                if current is None:
                    break
                ahead = asyncio.create_task(self._claim_next(stop, skip))
                try:
                    await self._check_and_queue(current)
                finally:
                    current.lane.claiming -= 1
                claimed += 1
                await self._renew_if_due()
        finally:
            if ahead is not None:
                # This pass failed or was cancelled: rows the next claim took are left
                # to their lease (recovery returns them to pending), as after a crash.
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    leftover = await ahead
                    if leftover is not None:
                        leftover.lane.claiming -= 1
        return claimed

    async def _any_due(self, conn: db.PoolConnection, services: list[str]) -> bool:
        """Whether a row is due on one of `services`: probed from this worker's claim
        cursors first (from each campaign's first row, the probe walks the index entries
        of every row already sent, dead until vacuumed: 0.1-0.5 s a pass, 2 million rows
        into a campaign), and from the start only when nothing is due above them."""
        query = self._queries["producer_next_campaign"]
        if self._after:
            after = {str(cid): rid for cid, rid in self._after.items()}
            if await conn.fetchrow(query, services, [], after) is not None:
                return True
        return await conn.fetchrow(query, services, [], {}) is not None

    async def _claim_next(self, stop: asyncio.Event | None, skip: list[int]) -> _Claim | None:
        """The next due batch's rows, claimed, with a place kept for it in its lane's queue."""
        while stop is None or not stop.is_set():
            services = [name for name, lane in self._lanes.items() if lane.has_room()]
            if not services:
                return None
            after = {str(cid): rid for cid, rid in self._after.items()}
            row = await self._pool.fetchrow(
                self._queries["producer_next_campaign"], services, skip, after
            )
            if row is None:
                if not self._after:
                    return None
                self._after.clear()  # due rows may wait below a cursor: look from the start
                continue
            lane = self._lanes[row["service"]]
            campaign = Campaign.from_record(
                row,
                default_sender_id=lane.settings.sender_id,
                default_window=window.Window.parse(lane.settings.send_window),
            )
            start = self._after.pop(campaign.id, 0)
            limit = lane.limiter.max_batch
            if row["canary_left"] is not None:
                # In its canary: no more than the canary still takes (a concurrent worker
                # may take as many: the canary overshoots by a batch at most).
                limit = min(limit, row["canary_left"])
            lane.claiming += 1
            try:
                records = await claim_batch(
                    self._pool,
                    self._queries["producer_claim_batch"],
                    campaign_id=campaign.id,
                    limit=limit,
                    service=lane.name,
                    worker_id=self._worker_id,
                    lease_s=self._settings.lease_s,
                    after_id=start,
                )
            except BaseException:
                lane.claiming -= 1
                raise
            if records:
                if len(records) >= limit:
                    self._after[campaign.id] = max(r["id"] for r in records)
                return _Claim(campaign, lane, records)
            lane.claiming -= 1
            if not start:
                skip.append(campaign.id)
        return None

    async def _check_and_queue(self, claim: _Claim) -> None:
        """Check and render a claimed batch; queue what is to be sent, store the rest."""
        campaign, lane, records = claim.campaign, claim.lane, claim.records
        batch_id: int = records[0]["batch_id"]
        rows = [claimed_row(r) for r in records]
        # Before any lock: the batch's own numbers are the bulk of the work.
        numbers = normalise_all(rows, default_region=lane.settings.default_region)
        planner = None
        if campaign.send_window is not None:
            planner = window.Planner(
                campaign.send_window,
                default_timezone=lane.settings.default_timezone,
                now=datetime.now(UTC),
            )
        async with self._pool.acquire() as conn, conn.transaction():
            prepared = await prepare_batch(
                conn,
                self._queries,
                campaign,
                batch_id,
                rows,
                numbers,
                service=lane.settings,
                policy=self._policy,
                planner=planner,
            )
        # Held by the sending window: waiting for it to open, or expired before it does.
        held = [p for p in prepared if p.destination is None and p.error_code in WINDOW_CODES]
        if held:
            waiting = sum(p.status == "pending" for p in held)
            deferred = metrics.WINDOW_DEFERRED
            deferred.labels(service=lane.name, outcome="waiting").inc(waiting)
            deferred.labels(service=lane.name, outcome="expired").inc(len(held) - waiting)
        ready = [p for p in prepared if p.destination is not None]
        self._warn_if_mostly_invalid(campaign.id, batch_id, prepared)
        stopped = collections.Counter(
            p.status for p in prepared if p.destination is None and p.error_code not in WINDOW_CODES
        )
        log.info(
            "batch_claimed",
            campaign_id=campaign.id,
            batch_id=batch_id,
            service=lane.name,
            claimed=len(prepared),
            destinations=len(ready),
            invalid=stopped["invalid"],
            suppressed=stopped["suppressed"],
            duplicate=stopped["duplicate"],
            capped=stopped["capped"],
            outside_window=len(held),
        )
        finals: dict[str, int] = {str(k): n for k, n in stopped.items()}
        finals["expired"] = stopped["expired"] + sum(p.status == "expired" for p in held)
        metrics.count_final(finals)
        if ready:
            lane.held.add(batch_id)
            lane.queue.put_nowait(self._batch(batch_id, campaign, ready))

    def _warn_if_mostly_invalid(
        self, campaign_id: int, batch_id: int, prepared: Sequence[Prepared]
    ) -> None:
        """Once per campaign: most of a batch was invalid, with the commonest reason."""
        invalid = [p for p in prepared if p.status == "invalid"]
        if len(invalid) < MOSTLY_INVALID * len(prepared) or campaign_id in self._warned_invalid:
            return
        self._warned_invalid.add(campaign_id)
        reasons = collections.Counter(p.error_code for p in invalid)
        code, count = reasons.most_common(1)[0]
        example = next(p for p in invalid if p.error_code == code)
        log.warning(
            "batch_mostly_invalid",
            campaign_id=campaign_id,
            batch_id=batch_id,
            claimed=len(prepared),
            invalid=len(invalid),
            error_code=code,
            error_code_count=count,
            meaning=codes.meaning(code),
            example=example.error_message,
            hint="see `campaign status ID`; the campaign keeps sending its valid recipients",
        )

    def _batch(self, batch_id: int, campaign: Campaign, ready: Sequence[Prepared]) -> Batch:
        settings = payload.MessageSettings(
            sender_id=campaign.sender_id,
            priority=campaign.priority,
            template_id=campaign.template_id,
            smartlinks=campaign.smartlinks,
            expires_at=campaign.expires_at,
            callback_data=campaign.callback_data,
            notify_url=self._notify_url,
        )
        destinations = [p.destination for p in ready if p.destination is not None]
        return Batch(
            id=batch_id,
            campaign_id=campaign.id,
            service=campaign.service,
            body=payload.build_body(settings, destinations),
            recipient_ids=tuple(p.id for p in ready),
            correlation_ids=tuple(d.correlation_id for d in destinations),
            attempts=tuple(p.attempts for p in ready),
            expires_at=campaign.expires_at,
            msisdn_e164=tuple(p.msisdn_e164 for p in ready),
            encodings=tuple(p.encoding for p in ready),
            parts=tuple(p.parts for p in ready),
            message=settings,
            prepared=tuple(destinations),
        )

    async def renew_leases(self) -> int:
        """Extend the leases of batches still waiting here; returns how many were renewed.

        A slow rate, or one lowered by AIMD, can keep a queued batch waiting longer than
        lease_s; without renewal recovery would hand it to another claim and this worker
        would lose every lease it holds, over and over.
        """
        held = [batch_id for lane in self._lanes.values() for batch_id in lane.held]
        if not held:
            return 0
        renewed = await self._pool.fetch(
            self._queries["producer_renew_leases"], held, self._worker_id, self._settings.lease_s
        )
        return len(renewed)

    async def sweep(self) -> tuple[int, int]:
        """Cancelled and expired campaigns' pending rows get their final status; canaries
        are judged and the failure brake applied. One transaction (fill runs it as part
        of its own); returns the rows cancelled and expired."""
        async with self._pool.acquire() as conn, conn.transaction():
            swept = await self._sweeps.once(conn)
        return await self._sweeps.finish(swept)

    async def apply_brakes(self) -> list[int]:
        """Judge canaries that are done and pause campaigns failing too much; returns the
        campaigns paused."""
        return await self._sweeps.apply_brakes()

    def _listening(self) -> bool:
        conn = self._listen_conn
        if conn is None:
            return False
        try:
            return not conn.is_closed()
        except db.InterfaceError:
            # The pool took the connection back when the server dropped it (a restart):
            # the proxy is detached and must be replaced, not used.
            return False

    async def _listen(self) -> None:
        if self._listening():
            return
        await self._unlisten()
        try:
            conn = await self._pool.acquire()
        except db.UNAVAILABLE_ERRORS as exc:
            log.warning("listen_failed", error=str(exc), error_type=type(exc).__name__)
            return
        try:
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        except db.UNAVAILABLE_ERRORS as exc:
            log.warning("listen_failed", error=str(exc), error_type=type(exc).__name__)
            await self._pool.release(conn)
            return
        self._listen_conn = conn

    async def _unlisten(self) -> None:
        conn, self._listen_conn = self._listen_conn, None
        if conn is None:
            return
        try:
            # Best effort: releasing to the pool resets the connection (UNLISTEN) anyway.
            with contextlib.suppress(*db.UNAVAILABLE_ERRORS):
                if not conn.is_closed():
                    await conn.remove_listener(NOTIFY_CHANNEL, self._on_notify)
        finally:
            await self._pool.release(conn)

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()
