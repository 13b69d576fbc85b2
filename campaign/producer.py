"""The producer: claims batches of pending recipients and hands them to the senders.

It wakes on NOTIFY `campaign_work` and also polls every `poll_interval_s`, so a lost
notification delays work by one interval at most. Each service has its own bounded
queue (a `Lane`); a batch is claimed only for a service whose queue has room, so a slow
service never holds up another and no claimed batch waits outside a queue.

Per recipient it normalises the number, drops opted-out numbers, renders the text and
checks it; rows that must not be sent get their final status in one set-based statement
(only when there are any) and the rest become one request body, encoded once. What the
checks found for the rows sent (number, encoding, parts) travels with the batch and is
written with the results, so a sent row is written at claim and at its result only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from campaign import db, payload, sms
from campaign.config import ProducerSettings, ServiceSettings
from campaign.ratelimit import ServiceLimiter

log = structlog.get_logger(__name__)

NOTIFY_CHANNEL = "campaign_work"
QUERIES = (
    "next_campaign",
    "claim_batch",
    "suppressed_numbers",
    "prepare_recipients",
    "cancel_pending",
    "expire_pending",
    "unknown_service_campaigns",
    "renew_leases",
)
SWEEP_CHUNK = 10_000
# Errors worth waiting out (the database restarting, a dropped connection); anything
# else is a bug and stops the worker.
DB_ERRORS = db.UNAVAILABLE_ERRORS
# How often claims start again from each campaign's first due row (see Producer._after).
RESCAN_S = 10.0


@dataclass(frozen=True, slots=True)
class Batch:
    """One claimed request's worth of recipients: the item on a lane's queue."""

    id: int
    campaign_id: int
    service: str
    body: bytes
    recipient_ids: tuple[int, ...]
    correlation_ids: tuple[str, ...]
    # Attempts already made per recipient (same order as recipient_ids).
    attempts: tuple[int, ...]
    expires_at: datetime | None = None
    # What the claim found per recipient (same order), stored with the results.
    msisdn_e164: tuple[str | None, ...] = ()
    encodings: tuple[str | None, ...] = ()
    parts: tuple[int | None, ...] = ()

    @property
    def destinations(self) -> int:
        return len(self.recipient_ids)

    @property
    def attempt(self) -> int:
        """The number of this send: 1 for a first send."""
        return max(self.attempts, default=0) + 1


@dataclass(slots=True)
class _Claim:
    """A batch's rows as claim_batch returned them: claimed, not yet checked."""

    campaign: Campaign
    lane: Lane
    records: list[db.Record]


class Lane:
    """One service's state shared by the producer and that service's senders."""

    def __init__(self, *, name: str, settings: ServiceSettings, queue_size: int) -> None:
        self.name = name
        self.settings = settings
        self.limiter = ServiceLimiter(
            service=name, rate_per_s=settings.rate_per_s, batch_size=settings.batch_size
        )
        self.queue: asyncio.Queue[Batch] = asyncio.Queue(maxsize=queue_size)
        self.stopped = False
        # Batches claimed by this worker and not yet posted (queued, or waiting for the
        # limiter): their leases are renewed while they wait.
        self.held: set[int] = set()
        # Claims under way whose batch will need a place in the queue (Producer.fill).
        self.claiming = 0

    def has_room(self) -> bool:
        return not self.stopped and self.queue.qsize() + self.claiming < self.queue.maxsize

    def stop(self, *, error_code: str, description: str) -> None:
        """Stop claiming and sending for this service (bad or inactive key): logged once."""
        if self.stopped:
            return
        self.stopped = True
        log.error(
            "service_stopped",
            service=self.name,
            error_code=error_code,
            description=description,
            hint="fix the service key or activate the service, then restart the worker",
        )


@dataclass(frozen=True, slots=True)
class Campaign:
    id: int
    service: str
    sender_id: str
    body: str | None
    template_id: str | None
    smartlinks: Mapping[str, Mapping[str, Any]]
    priority: int
    expires_at: datetime | None
    callback_data: str | None

    @classmethod
    def from_record(cls, row: db.Record, *, default_sender_id: str) -> Campaign:
        return cls(
            id=row["id"],
            service=row["service"],
            sender_id=row["sender_id"] or default_sender_id,
            body=row["body"],
            template_id=row["template_id"],
            smartlinks=payload.parse_smartlinks(row["smartlinks"]),
            priority=row["priority"],
            expires_at=row["expires_at"],
            callback_data=row["callback_data"],
        )


# Per recipient, a thousand per batch: not frozen, whose __init__ costs three times as much.
@dataclass(slots=True)
class Claimed:
    id: int
    msisdn: str
    variables: Mapping[str, Any]
    correlation_id: str
    attempts: int
    # Set by an earlier attempt's results: the number was already normalised.
    msisdn_e164: str | None = None


# Per recipient, a thousand per batch: not frozen, whose __init__ costs three times as much.
@dataclass(slots=True)
class Prepared:
    """A claimed row after the checks: still 'sending' with a destination, or final."""

    id: int
    status: str
    msisdn_e164: str | None = None
    encoding: str | None = None
    parts: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    destination: payload.Destination | None = None
    attempts: int = 0


def normalise_all(
    rows: Sequence[Claimed], *, default_region: str
) -> list[str | sms.InvalidRecipient]:
    """Each row's E.164 number, or why it has none."""
    numbers: list[str | sms.InvalidRecipient] = []
    for row in rows:
        if row.msisdn_e164 is not None:
            # A retry: phonenumbers already accepted this number (17 ms per 1000 rows).
            numbers.append(row.msisdn_e164)
            continue
        try:
            numbers.append(sms.normalise_msisdn(row.msisdn, default_region=default_region))
        except sms.InvalidRecipient as exc:
            numbers.append(exc)
    return numbers


def prepare(
    campaign: Campaign,
    rows: Sequence[Claimed],
    numbers: Sequence[str | sms.InvalidRecipient],
    *,
    suppressed: Collection[str],
    plus_prefix: bool,
) -> list[Prepared]:
    """Decide every claimed row: invalid, suppressed, or a destination with its text."""
    prepared: list[Prepared] = []
    for row, number in zip(rows, numbers, strict=True):
        if isinstance(number, sms.InvalidRecipient):
            prepared.append(
                Prepared(row.id, "invalid", None, None, None, number.code, number.message)
            )
            continue
        if number in suppressed:
            prepared.append(
                Prepared(row.id, "suppressed", number, None, None, "suppressed", "number opted out")
            )
            continue
        msisdn = sms.api_msisdn(number, plus_prefix=plus_prefix)
        if campaign.body is None:
            # A template campaign: the platform holds the text, so there is nothing to count.
            destination = payload.Destination(correlation_id=row.correlation_id, msisdn=msisdn)
            prepared.append(
                Prepared(row.id, "sending", number, destination=destination, attempts=row.attempts)
            )
            continue
        try:
            rendered = sms.render(campaign.body, row.variables)
            payload.check_links(rendered.link_ids, campaign.smartlinks)
        except sms.InvalidRecipient as exc:
            prepared.append(Prepared(row.id, "invalid", number, None, None, exc.code, exc.message))
            continue
        destination = payload.Destination(
            correlation_id=row.correlation_id,
            msisdn=msisdn,
            text=rendered.text,
            ucs2=rendered.encoding == "ucs2",
            link_ids=rendered.link_ids,
        )
        prepared.append(
            Prepared(
                row.id,
                "sending",
                number,
                rendered.encoding,
                rendered.parts,
                destination=destination,
                attempts=row.attempts,
            )
        )
    return prepared


def notify_url(public_url: str, token: str) -> str | None:
    """Where the API posts delivery reports for this worker; None without a token."""
    if not token:
        return None
    return f"{public_url.rstrip('/')}/webhooks/dr/{token}"


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
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
        # Campaigns already reported as on an unknown service: one error line each.
        self._reported_unknown: set[int] = set()
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
                try:
                    if self._clock() - self._last_sweep >= self._settings.poll_interval_s:
                        self._last_sweep = self._clock()
                        await self.sweep()
                    if self._clock() - self._last_renewal >= self._settings.lease_s / 3:
                        self._last_renewal = self._clock()
                        await self.renew_leases()
                    await self.fill(stop)
                except DB_ERRORS as exc:
                    log.error("producer_failed", error=str(exc), error_type=type(exc).__name__)
                await self._wait(stop)
        finally:
            await self._unlisten()

    async def fill(self, stop: asyncio.Event | None = None) -> int:
        """Claim batches while a lane has room and work is due; returns batches claimed.

        The claim statement of the next batch runs in the database while this process
        checks the numbers and renders the texts of the one before. Only one claim
        statement runs at a time: two at once on one campaign would split its rows
        between them (SKIP LOCKED), sending small campaigns in several requests.
        """
        self._wake.clear()
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

    async def _claim_next(self, stop: asyncio.Event | None, skip: list[int]) -> _Claim | None:
        """The next due batch's rows, claimed, with a place kept for it in its lane's queue."""
        while stop is None or not stop.is_set():
            services = [name for name, lane in self._lanes.items() if lane.has_room()]
            if not services:
                return None
            after = {str(cid): rid for cid, rid in self._after.items()}
            row = await self._pool.fetchrow(self._queries["next_campaign"], services, skip, after)
            if row is None:
                if not self._after:
                    return None
                self._after.clear()  # due rows may wait below a cursor: look from the start
                continue
            lane = self._lanes[row["service"]]
            campaign = Campaign.from_record(row, default_sender_id=lane.settings.sender_id)
            start = self._after.pop(campaign.id, 0)
            lane.claiming += 1
            try:
                records = await self._pool.fetch(
                    self._queries["claim_batch"],
                    campaign.id,
                    lane.limiter.max_batch,
                    lane.name,
                    self._worker_id,
                    self._settings.lease_s,
                    start,
                )
            except BaseException:
                lane.claiming -= 1
                raise
            if records:
                if len(records) >= lane.limiter.max_batch:
                    self._after[campaign.id] = max(r["id"] for r in records)
                return _Claim(campaign, lane, records)
            lane.claiming -= 1
            if not start:
                skip.append(campaign.id)
        return None

    async def _check_and_queue(self, claim: _Claim) -> None:
        """Check and render a claimed batch; queue what is to be sent, store the rest."""
        campaign, lane, records = claim.campaign, claim.lane, claim.records
        async with self._pool.acquire() as conn:
            batch_id: int = records[0]["batch_id"]
            rows = [
                Claimed(
                    id=r["id"],
                    msisdn=r["msisdn"],
                    variables=r["variables"],
                    correlation_id=r["correlation_id"],
                    attempts=r["attempts"],
                    msisdn_e164=r["msisdn_e164"],
                )
                for r in records
            ]
            numbers = normalise_all(rows, default_region=lane.settings.default_region)
            valid = [n for n in numbers if isinstance(n, str)]
            suppressed = {
                r["msisdn"] for r in await conn.fetch(self._queries["suppressed_numbers"], valid)
            }
            prepared = prepare(
                campaign,
                rows,
                numbers,
                suppressed=suppressed,
                plus_prefix=lane.settings.plus_prefix,
            )
            # Rows to send stay as claimed: their checks are written with their results.
            final = [p for p in prepared if p.destination is None]
            if final:
                await conn.fetchval(
                    self._queries["prepare_recipients"],
                    batch_id,
                    [p.id for p in final],
                    [p.status for p in final],
                    [p.msisdn_e164 for p in final],
                    [p.error_code for p in final],
                    [p.error_message for p in final],
                )
        ready = [p for p in prepared if p.destination is not None]
        log.info(
            "batch_claimed",
            campaign_id=campaign.id,
            batch_id=batch_id,
            service=lane.name,
            claimed=len(prepared),
            destinations=len(ready),
            invalid=sum(p.status == "invalid" for p in prepared),
            suppressed=sum(p.status == "suppressed" for p in prepared),
        )
        if ready:
            lane.held.add(batch_id)
            lane.queue.put_nowait(self._batch(batch_id, campaign, ready))

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
            self._queries["renew_leases"], held, self._worker_id, self._settings.lease_s
        )
        return len(renewed)

    async def sweep(self) -> tuple[int, int]:
        """Cancelled and expired campaigns' pending rows get their final status."""
        cancelled = await self._sweep("cancel_pending")
        expired = await self._sweep("expire_pending")
        if cancelled or expired:
            log.info("pending_swept", cancelled=cancelled, expired=expired)
        await self._report_unknown_services()
        return cancelled, expired

    async def _report_unknown_services(self) -> None:
        rows = await self._pool.fetch(self._queries["unknown_service_campaigns"], list(self._lanes))
        for row in rows:
            if row["id"] in self._reported_unknown:
                continue
            self._reported_unknown.add(row["id"])
            log.error(
                "campaign_service_unknown",
                campaign_id=row["id"],
                service=row["service"],
                services=sorted(self._lanes),
                hint="add [services.NAME] to the config or fix the campaign's service",
            )

    async def _sweep(self, name: str) -> int:
        total = 0
        while True:
            status = await self._pool.execute(self._queries[name], SWEEP_CHUNK)
            count = int(status.split()[-1])
            total += count
            if count < SWEEP_CHUNK:
                return total

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
        except DB_ERRORS as exc:
            log.warning("listen_failed", error=str(exc), error_type=type(exc).__name__)
            return
        try:
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        except DB_ERRORS as exc:
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
            with contextlib.suppress(*DB_ERRORS):
                if not conn.is_closed():
                    await conn.remove_listener(NOTIFY_CHANNEL, self._on_notify)
        finally:
            await self._pool.release(conn)

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()

    async def _wait(self, stop: asyncio.Event) -> None:
        """Until woken, stopped, or the poll interval passed."""
        wake = asyncio.ensure_future(self._wake.wait())
        halt = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                {wake, halt},
                timeout=self._settings.poll_interval_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            wake.cancel()
            halt.cancel()
