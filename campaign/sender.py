"""The senders: the only users of the aiohttp client for the messaging API.

Each service runs `max_in_flight` loops over its lane's queue. For every batch: acquire
the service's limiter for its destinations, mark the batch 'posting' (from then on a
crash leaves it in doubt, never silently pending; a batch whose campaign was paused,
cancelled or expired while it waited is given back instead), POST the body encoded by the
producer, classify the answer, and write every recipient's outcome and close the batch
in one statement. Results are matched to recipients by correlation id, never by position.
"""

from __future__ import annotations

import asyncio
import random
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import structlog

from campaign import db, errors, metrics
from campaign.batch import Batch, Lane
from campaign.config import ApiSettings, OnTimeout, ProducerSettings
from campaign.statuses import FINAL, BatchStatus, RecipientStatus

log = structlog.get_logger(__name__)

QUERIES = ("sender_mark_posting", "sender_write_results", "sender_release_batch")
MESSAGING_PATH = "/resources/v1/messaging"
# Writing results is retried this many times (1 s, 2 s, 4 s apart) before the batch is
# left to crash recovery, which can only call it in doubt.
WRITE_ATTEMPTS = 4


@dataclass(slots=True)
class _Attempt:
    """Per-request trace state, set just before the body is first written to the socket:
    from then on the API may have the request, so a failure leaves it in doubt."""

    body_sent: bool = False


async def _on_chunk_sent(
    session: aiohttp.ClientSession,
    ctx: types.SimpleNamespace,
    params: aiohttp.TraceRequestChunkSentParams,
) -> None:
    attempt = ctx.trace_request_ctx
    if isinstance(attempt, _Attempt):
        attempt.body_sent = True


def create_session(*, connections: int) -> aiohttp.ClientSession:
    """The client session for the API, with the trace that tells 'sent' from 'not sent'."""
    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(_on_chunk_sent)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max(1, connections)),
        trace_configs=[trace],
    )


@dataclass(frozen=True, slots=True)
class Backoff:
    base_s: float
    max_s: float

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Full jitter over base * 2^(attempt-1), capped: retries of many batches spread out."""
        ceiling = min(self.max_s, self.base_s * 2 ** max(0, attempt - 1))
        return rng.uniform(0.0, ceiling)


@dataclass(slots=True)
class Plan:
    """Every recipient's new state, as the columns write_results takes, and the batch's."""

    batch_status: BatchStatus
    ids: list[int] = field(default_factory=list)
    statuses: list[RecipientStatus] = field(default_factory=list)
    transids: list[str | None] = field(default_factory=list)
    error_codes: list[str | None] = field(default_factory=list)
    error_messages: list[str | None] = field(default_factory=list)
    retry_in_s: list[float | None] = field(default_factory=list)
    attempts_added: list[int] = field(default_factory=list)
    # Success items without a correlation id that could not be given to a recipient
    # (the request had several destinations): logged once per request.
    unmatched: list[errors.DestinationResult] = field(default_factory=list)

    def add(
        self,
        recipient_id: int,
        status: RecipientStatus,
        *,
        transid: str | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        retry_in_s: float | None = None,
        attempts_added: int = 1,
    ) -> None:
        self.ids.append(recipient_id)
        self.statuses.append(status)
        self.transids.append(transid)
        self.error_codes.append(error_code)
        self.error_messages.append(error_message)
        self.retry_in_s.append(retry_in_s)
        self.attempts_added.append(attempts_added)

    def count(self, status: RecipientStatus) -> int:
        return self.statuses.count(status)


async def write_results(
    pool: db.Pool,
    sql: str,
    *,
    batch_id: int,
    recipients: Mapping[str, object],
    batch_status: BatchStatus,
    destinations: int,
    accepted: int,
    rejected: int,
    http_status: int | None,
    error_code: str | None,
    error_message: str | None,
    duration_ms: int,
) -> None:
    """sender_write_results: every recipient's outcome (columns of equal length) and the
    batch's, in one statement."""
    await pool.fetchval(
        sql,
        batch_id,
        recipients,
        batch_status,
        destinations,
        accepted,
        rejected,
        http_status,
        error_code,
        error_message,
        duration_ms,
    )


_BATCH_STATUS: dict[errors.Kind, BatchStatus] = {
    "ok": "done",
    "rejected": "done",
    "expired": "done",
    "retry": "retry",
    "in_doubt": "in_doubt",
    "stop_service": "released",
}


def plan_results(
    batch: Batch,
    outcome: errors.Outcome,
    *,
    on_timeout: OnTimeout,
    max_attempts: int,
    retry_in_s: float,
    now: datetime,
) -> Plan:
    """What each recipient of a posted batch becomes, given the classified answer."""
    plan = Plan(batch_status=_BATCH_STATUS[outcome.kind])
    expiring = batch.expires_at is not None and now + timedelta(seconds=retry_in_s) >= (
        batch.expires_at
    )

    def retry(i: int, code: str, message: str) -> None:
        rid = batch.recipient_ids[i]
        if batch.attempts[i] + 1 >= max_attempts:
            plan.add(rid, "failed", error_code=code, error_message=message)
        elif expiring:
            plan.add(rid, "expired", error_code=code, error_message=message)
        else:
            plan.add(rid, "pending", error_code=code, error_message=message, retry_in_s=retry_in_s)

    def in_doubt(i: int, code: str, message: str) -> None:
        rid = batch.recipient_ids[i]
        if on_timeout == "fail":
            plan.add(rid, "failed", error_code=code, error_message=message)
        elif on_timeout == "resend":
            if batch.attempts[i] + 1 >= max_attempts:
                plan.add(rid, "failed", error_code=code, error_message=message)
            else:
                plan.add(rid, "pending", error_code=code, error_message=message, retry_in_s=0.0)
        else:
            # Wait for a delivery report; resolve_unknown sends again after the grace period.
            plan.add(rid, "unknown", error_code=code, error_message=message)

    if outcome.kind == "ok":
        by_correlation: dict[str, errors.DestinationResult] = {}
        uncorrelated = [r for r in outcome.results if r.correlation_id is None]
        for result in outcome.results:
            if result.correlation_id is not None:
                by_correlation.setdefault(result.correlation_id, result)
        if uncorrelated and batch.destinations == 1 and len(outcome.results) == 1:
            # One destination, one item: the item is that destination's, whatever it lacks.
            by_correlation[batch.correlation_ids[0]] = uncorrelated[0]
        else:
            plan.unmatched = uncorrelated
        for i, correlation_id in enumerate(batch.correlation_ids):
            found = by_correlation.get(correlation_id)
            if found is None:
                in_doubt(i, "no_result", "no result for this correlation id in the response")
            elif found.kind == "queued":
                plan.add(batch.recipient_ids[i], "queued", transid=found.transid)
            elif found.kind == "retry":
                retry(i, found.code, found.description)
            elif found.kind == "expired":
                plan.add(
                    batch.recipient_ids[i],
                    "expired",
                    transid=found.transid,
                    error_code=found.code,
                    error_message=found.description,
                )
            else:
                plan.add(
                    batch.recipient_ids[i],
                    "rejected",
                    transid=found.transid,
                    error_code=found.code,
                    error_message=found.description,
                )
        return plan
    for i, rid in enumerate(batch.recipient_ids):
        if outcome.kind == "retry":
            retry(i, outcome.code, outcome.description)
        elif outcome.kind == "in_doubt":
            in_doubt(i, outcome.code, outcome.description)
        elif outcome.kind == "expired":
            # 7005: the platform refused the request because its expiry had passed.
            plan.add(rid, "expired", error_code=outcome.code, error_message=outcome.description)
        elif outcome.kind == "stop_service":
            # Nothing was sent: the recipients wait, attempts untouched, for a fixed key.
            plan.add(
                rid,
                "pending",
                error_code=outcome.code,
                error_message=outcome.description,
                attempts_added=0,
            )
        else:
            plan.add(rid, "rejected", error_code=outcome.code, error_message=outcome.description)
    return plan


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    retry_after: str | None


class Sender:
    """One service's senders: `max_in_flight` loops sharing the lane's queue and limiter."""

    def __init__(
        self,
        *,
        pool: db.Pool,
        queries: Mapping[str, str],
        lane: Lane,
        session: aiohttp.ClientSession,
        api: ApiSettings,
        producer: ProducerSettings,
        worker_id: str,
        on_taken: Callable[[], None] = lambda: None,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self._queries = db.require(queries, QUERIES)
        self._lane = lane
        self._session = session
        # A service's own base_url (another region or tenant) wins over [api] base_url.
        base_url = lane.settings.base_url or api.base_url
        self._url = base_url.rstrip("/") + MESSAGING_PATH
        self._timeout = aiohttp.ClientTimeout(total=api.timeout_s)
        # A request must never outlive its lease, or recovery could resend it mid-flight.
        self._posting_lease_s = producer.lease_s + api.timeout_s
        self._backoff = Backoff(base_s=producer.backoff_base_s, max_s=producer.backoff_max_s)
        self._worker_id = worker_id
        self._on_taken = on_taken
        self._rng = rng or random.Random()
        self.in_flight = 0
        # Running totals for the worker's periodic stats line.
        self.accepted = 0
        self.rejected = 0

    @property
    def service(self) -> str:
        return self._lane.name

    async def run(self, stop: asyncio.Event) -> None:
        """Send until `stop` is set; a batch being sent is finished first."""
        async with asyncio.TaskGroup() as tg:
            for _ in range(self._lane.settings.max_in_flight):
                tg.create_task(self._loop(stop))

    async def _loop(self, stop: asyncio.Event) -> None:
        while True:
            batch = await self._next(stop)
            if batch is None:
                return
            self._on_taken()
            await self.send(batch)

    async def _next(self, stop: asyncio.Event) -> Batch | None:
        """The next batch, or None once stopping (queued batches are released at exit)."""
        if stop.is_set():
            return None
        get = asyncio.ensure_future(self._lane.queue.get())
        halt = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({get, halt}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            halt.cancel()
            get.cancel()
        if get.cancelled() or stop.is_set():
            return None
        return get.result()

    async def send(self, batch: Batch) -> errors.Outcome | None:
        """Send one batch and store its results; None when it was not posted."""
        try:
            return await self._send(batch)
        finally:
            self._lane.held.discard(batch.id)

    async def _send(self, batch: Batch) -> errors.Outcome | None:
        blog = log.bind(campaign_id=batch.campaign_id, batch_id=batch.id, attempt=batch.attempt)
        granted = batch.destinations
        if not self._lane.stopped:
            granted = await self._lane.limiter.acquire(batch.destinations)
        if self._lane.stopped:
            await self._release(batch, "service_stopped", "the service was stopped", blog)
            return None
        claimed = batch
        if granted < batch.destinations:
            # Claimed while the share or factor was higher: sending it whole would put the
            # worker over its rate by the difference. The rest goes back in mark_posting.
            batch = batch.first(granted)
        try:
            posting = await self._pool.fetchrow(
                self._queries["sender_mark_posting"],
                batch.id,
                self._worker_id,
                self._posting_lease_s,
                list(claimed.recipient_ids[batch.destinations :]),
            )
        except db.UNAVAILABLE_ERRORS as exc:
            blog.error("batch_not_posted", error=str(exc), error_type=type(exc).__name__)
            return None
        if posting is None:
            # Recovery took the batch back after its lease ran out; it may be claimed again.
            blog.warning("batch_lease_lost")
            return None
        if posting["held_back"] is not None:
            # Paused, cancelled or expired while the batch waited: given back, not posted.
            blog.info(
                "batch_released",
                reason=posting["held_back"],
                destinations=claimed.destinations,
                released=posting["released"],
            )
            return None
        if batch is not claimed:
            blog.info(
                "batch_trimmed",
                destinations=batch.destinations,
                released=posting["released"],
                max_batch=granted,
            )

        attempt = _Attempt()
        started = time.monotonic()
        http_status: int | None = None
        self.in_flight += 1
        try:
            response = await self._post(batch, attempt)
            http_status = response.status
            outcome = errors.classify(
                response.status,
                response.body,
                body_sent=True,
                retry_after=response.retry_after,
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            outcome = errors.classify(None, exc, body_sent=attempt.body_sent)
        except asyncio.CancelledError:
            # Stopping past the grace period: store what is known before going.
            if attempt.body_sent:
                outcome = errors.Outcome("in_doubt", "worker_stopped", "stopped mid-request")
                await asyncio.shield(self._finish(batch, outcome, None, _ms_since(started), blog))
            else:
                await asyncio.shield(
                    self._release(batch, "worker_stopped", "stopped before sending", blog)
                )
            raise
        finally:
            self.in_flight -= 1
        # Shielded: once the API answered, its answer is stored even if the worker stops.
        await asyncio.shield(self._finish(batch, outcome, http_status, _ms_since(started), blog))
        return outcome

    async def _post(self, batch: Batch, attempt: _Attempt) -> _Response:
        headers = {"key": self._lane.settings.key, "Content-Type": "application/json"}
        async with self._session.post(
            self._url,
            data=batch.body,
            headers=headers,
            timeout=self._timeout,
            allow_redirects=False,
            trace_request_ctx=attempt,
        ) as resp:
            body = await resp.read()
            return _Response(resp.status, body, resp.headers.get("Retry-After"))

    async def _finish(
        self,
        batch: Batch,
        outcome: errors.Outcome,
        http_status: int | None,
        duration_ms: int,
        blog: Any,
    ) -> None:
        settings = self._lane.settings
        retry_in_s = self._backoff.delay_s(batch.attempt, self._rng)
        if outcome.retry_after_s is not None:
            retry_in_s = max(retry_in_s, outcome.retry_after_s)
        plan = plan_results(
            batch,
            outcome,
            on_timeout=settings.on_timeout,
            max_attempts=settings.max_attempts,
            retry_in_s=retry_in_s,
            now=datetime.now(UTC),
        )
        await self._write(batch, plan, outcome, http_status, duration_ms, blog)
        if plan.unmatched:
            # The items hold code, description and transid only: no key can leak here.
            first = plan.unmatched[0]
            blog.warning(
                "response_unmatched",
                reason="success items without a correlation id in a multi-destination request",
                unmatched=len(plan.unmatched),
                destinations=batch.destinations,
                item={
                    "code": first.code,
                    "description": first.description,
                    "transid": first.transid,
                },
            )

        rate_limited = http_status == 429 or outcome.code == errors.RATE_LIMITED
        rate_limited |= any(r.code == errors.RATE_LIMITED for r in outcome.results)
        if rate_limited:
            self._lane.limiter.record_rate_limited()
        elif outcome.kind == "ok":
            self._lane.limiter.record_success()

        accepted, rejected = plan.count("queued"), plan.count("rejected")
        self._count(batch, outcome, plan, duration_ms)
        if outcome.kind in ("ok", "rejected", "expired"):
            blog.info(
                "batch_sent",
                destinations=batch.destinations,
                accepted=accepted,
                rejected=rejected,
                retried=plan.count("pending"),
                in_doubt=plan.count("unknown"),
                http_status=http_status,
                duration_ms=duration_ms,
                error_code=None if outcome.kind == "ok" else outcome.code,
            )
        elif outcome.kind == "retry":
            blog.warning(
                "send_retry_scheduled",
                reason=outcome.description,
                error_code=outcome.code,
                retry_in_s=round(retry_in_s, 3),
                failed=plan.count("failed"),
                http_status=http_status,
                duration_ms=duration_ms,
            )
        elif outcome.kind == "in_doubt":
            blog.warning(
                "batch_in_doubt",
                reason=outcome.description,
                error_code=outcome.code,
                on_timeout=settings.on_timeout,
                destinations=batch.destinations,
                http_status=http_status,
                duration_ms=duration_ms,
            )
        else:
            self._lane.stop(error_code=outcome.code, description=outcome.description)

    def _count(self, batch: Batch, outcome: errors.Outcome, plan: Plan, duration_ms: int) -> None:
        service = self._lane.name
        metrics.REQUESTS.labels(service, outcome.kind).inc()
        metrics.REQUEST_SECONDS.labels(service).observe(duration_ms / 1000)
        for status in set(plan.statuses):
            metrics.DESTINATIONS.labels(service, status).inc(plan.count(status))
        metrics.count_final({s: plan.count(s) for s in set(plan.statuses) if s in FINAL})
        self.accepted += plan.count("queued")
        self.rejected += plan.count("rejected")

    async def _write(
        self,
        batch: Batch,
        plan: Plan,
        outcome: errors.Outcome,
        http_status: int | None,
        duration_ms: int,
        blog: Any,
    ) -> None:
        """Store the plan and close the batch, retrying a failing database a few times."""
        msisdn_e164, encodings, parts = claim_columns(batch, plan.ids)
        recipients = {
            "id": plan.ids,
            "status": plan.statuses,
            "transid": plan.transids,
            "error_code": plan.error_codes,
            "error_message": plan.error_messages,
            "retry_in_s": plan.retry_in_s,
            "attempts_added": plan.attempts_added,
            "msisdn_e164": msisdn_e164,
            "encoding": encodings,
            "parts": parts,
        }
        for attempt in range(WRITE_ATTEMPTS):
            try:
                await write_results(
                    self._pool,
                    self._queries["sender_write_results"],
                    batch_id=batch.id,
                    recipients=recipients,
                    batch_status=plan.batch_status,
                    destinations=batch.destinations,
                    accepted=plan.count("queued"),
                    rejected=plan.count("rejected"),
                    http_status=http_status,
                    error_code=None if outcome.kind == "ok" else outcome.code,
                    error_message=None if outcome.kind == "ok" else outcome.description,
                    duration_ms=duration_ms,
                )
                return
            except db.UNAVAILABLE_ERRORS as exc:
                blog.error(
                    "results_write_failed",
                    error=str(exc),
                    error_type=type(exc).__name__,
                    will_retry=attempt + 1 < WRITE_ATTEMPTS,
                )
                if attempt + 1 < WRITE_ATTEMPTS:
                    await asyncio.sleep(2**attempt)

    async def _release(self, batch: Batch, code: str, message: str, blog: Any) -> None:
        try:
            await self._pool.fetchval(
                self._queries["sender_release_batch"], batch.id, code, message
            )
        except db.UNAVAILABLE_ERRORS as exc:
            # The lease runs out and recovery returns the rows to pending instead.
            blog.error("batch_release_failed", error=str(exc), error_type=type(exc).__name__)


def claim_columns(
    batch: Batch, ids: Sequence[int]
) -> tuple[list[str | None], list[str | None], list[int | None]]:
    """The claim's msisdn_e164, encodings and parts lined up with `ids` (write_results)."""
    if not batch.msisdn_e164:
        return [None] * len(ids), [None] * len(ids), [None] * len(ids)
    if tuple(ids) == batch.recipient_ids:
        return list(batch.msisdn_e164), list(batch.encodings), list(batch.parts)
    index = {rid: i for i, rid in enumerate(batch.recipient_ids)}
    return (
        [batch.msisdn_e164[index[rid]] for rid in ids],
        [batch.encodings[index[rid]] for rid in ids],
        [batch.parts[index[rid]] for rid in ids],
    )


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def sessions_needed(lanes: Sequence[Lane]) -> int:
    """Connections for every request that may be in flight at once."""
    return sum(lane.settings.max_in_flight for lane in lanes)
