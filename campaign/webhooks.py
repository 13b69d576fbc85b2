"""The webhook receiver: delivery reports (DR) and incoming messages (MO) over HTTP.

A 200 means the body is committed. Delivery reports from concurrent requests are
committed together: each request hands its parsed reports to one flusher task and
waits; the flusher takes everything waiting (up to `group_max` reports) and stores it
with one INSERT, so one durable commit serves many requests. It flushes as soon as it is
free, never after a fixed sleep: reports arriving during a commit form the next group.

Status codes (the platform retries a callback it could not deliver, not most 4xx):
200 committed · 400 unparseable, kept in campaign.webhook_rejects · 403 signature refused ·
404 unknown path or wrong token · 413 body over max_body_bytes · 503 database unavailable,
retry later. A peer outside `allow_networks`, or a request slower than `read_timeout_s`,
is closed without an answer (campaign/netguard.py), so it is sent again later.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import zoneinfo
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from campaign import db, logs, metrics, netguard, reports
from campaign.config import OptOutSettings, WebhookSettings
from campaign.netaddr import parse_listen as parse_listen  # re-exported, as before
from campaign.reports import DeliveryReport, IncomingMessage, ParseError

log = structlog.get_logger(__name__)

QUERIES = ("webhook_insert_reports", "webhook_store_incoming", "webhook_insert_reject")

KINDS = ("dr", "mo")
SIGNATURE_HEADER = "X-Hub-Signature"

# Class 22 (data exception) and 23 (integrity): the rows themselves are at fault, not the
# database. The parser should make these impossible; if one slips through, only the request
# that carries it is refused instead of every request sharing its group.
_DATA_SQLSTATE_CLASSES = ("22", "23")
_RETRY_AFTER_S = "5"
# The routes: POST {WEBHOOK_PREFIX}/dr/{token} and {WEBHOOK_PREFIX}/mo/{token}.
WEBHOOK_PREFIX = "/webhooks"


def notify_url(public_url: str, token: str) -> str | None:
    """The `notifyurl` sent with every request: this receiver's DR route; None without a token."""
    if not token:
        return None
    return f"{public_url.rstrip('/')}{WEBHOOK_PREFIX}/dr/{token}"


class DatabaseUnavailable(Exception):
    """The store failed for reasons outside the request: answer 503."""


# Answered 503: the platform sends the body again later.
_UNAVAILABLE: tuple[type[Exception], ...] = (DatabaseUnavailable, *db.UNAVAILABLE_ERRORS)


class StoreRefused(Exception):
    """The database refused this request's rows: keep the body as a reject, answer 400."""


def _is_data_error(exc: BaseException) -> bool:
    sqlstate = str(getattr(exc, "sqlstate", "") or "")
    # asyncpg's own argument-encoding errors are ValueErrors.
    return sqlstate[:2] in _DATA_SQLSTATE_CLASSES or (
        isinstance(exc, ValueError) and isinstance(exc, db.InterfaceError)
    )


@dataclass(slots=True)
class WebhookStats:
    """Counters for tests and, later, metrics."""

    dr_requests: int = 0
    mo_requests: int = 0
    reports_received: int = 0
    reports_stored: int = 0
    groups_committed: int = 0
    rejected: int = 0
    unauthorized: int = 0
    not_found: int = 0
    unavailable: int = 0


@dataclass(slots=True)
class _Waiting:
    reports: Sequence[DeliveryReport]
    future: asyncio.Future[int] = field(repr=False)


class GroupCommitter:
    """Commits the delivery reports of many concurrent requests in one statement."""

    def __init__(
        self,
        *,
        pool: db.Pool,
        sql: str,
        group_max: int,
        timeout_s: float,
        stats: WebhookStats,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self._pool = pool
        self._on_stored = on_stored
        self._sql = sql
        self._group_max = group_max
        self._timeout_s = timeout_s
        self._stats = stats
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._wake = asyncio.Event()
        self._failing = False

    async def submit(self, items: Sequence[DeliveryReport]) -> int:
        """Wait until `items` are committed; returns how many were new (not duplicates).

        Raises DatabaseUnavailable or StoreRefused.
        """
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(items, future))
        self._wake.set()
        return await future

    async def run(self) -> None:
        """The flusher: forever, take what is waiting and commit it."""
        group: list[_Waiting] = []
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._waiting:
                    group = self._take()
                    await self._flush(group)
        finally:
            self._waiting.extendleft(reversed(group))
            self.close()

    def close(self) -> None:
        """Answer everyone still waiting with DatabaseUnavailable (a 503: sent again later)."""
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.future.done():
                waiting.future.set_exception(DatabaseUnavailable("receiver stopping"))

    def _take(self) -> list[_Waiting]:
        """Whole requests, oldest first, up to group_max reports (at least one request)."""
        group: list[_Waiting] = []
        count = 0
        while self._waiting:
            head = self._waiting[0]
            if head.future.done():
                # Its handler is gone (client disconnected): nobody waits for an answer.
                self._waiting.popleft()
                continue
            if group and count + len(head.reports) > self._group_max:
                break
            group.append(self._waiting.popleft())
            count += len(head.reports)
        return group

    async def _flush(self, group: list[_Waiting]) -> None:
        if not group:
            return
        try:
            stored = await self._insert([r for w in group for r in w.reports])
        except Exception as exc:
            # Whatever went wrong, the flusher lives on and every waiter gets an answer:
            # a 503 is always safe, the platform sends the report again.
            if _is_data_error(exc) and len(group) > 1:
                # Find the request at fault: each alone, so the others still commit.
                for waiting in group:
                    await self._flush([waiting])
                return
            error: Exception
            if _is_data_error(exc):
                error = StoreRefused(f"database refused the reports: {exc}")
            else:
                self._note_failure(exc)
                error = DatabaseUnavailable(str(exc))
            for waiting in group:
                if not waiting.future.done():
                    waiting.future.set_exception(error)
            return
        if self._failing:
            self._failing = False
            log.info("webhook_store_recovered")
        self._stats.groups_committed += 1
        self._stats.reports_stored += stored
        if stored and self._on_stored is not None:
            self._on_stored()
        received = sum(len(w.reports) for w in group)
        metrics.REPORTS.labels("stored").inc(stored)
        metrics.REPORTS.labels("duplicate").inc(received - stored)
        # Duplicates are not attributed to one request; each learns the group's new count.
        for waiting in group:
            if not waiting.future.done():
                waiting.future.set_result(stored)

    def _note_failure(self, exc: BaseException) -> None:
        # One line when the database goes away, not one per group while it stays away.
        if not self._failing:
            self._failing = True
            log.warning(
                "webhook_store_failed",
                error=str(exc),
                error_type=type(exc).__name__,
                exc_info=not isinstance(exc, db.UNAVAILABLE_ERRORS),
            )

    async def _insert(self, items: list[DeliveryReport]) -> int:
        async with asyncio.timeout(self._timeout_s):
            async with self._pool.acquire() as conn:
                # One statement is one transaction: execute() returns after its COMMIT.
                status = await conn.execute(self._sql, report_columns(items))
        return int(status.rsplit(" ", 1)[-1])


@functools.lru_cache(maxsize=64)
def _ok_body(reports: int) -> bytes:
    return orjson.dumps({"status": "ok", "reports": reports})


def _ok(reports: int) -> web.Response:
    """The 200 answer; its body is the same for every request of the same size."""
    return web.Response(body=_ok_body(reports), content_type="application/json")


def report_columns(items: Sequence[DeliveryReport]) -> dict[str, list[Any]]:
    """The parameter of webhook_insert_reports, sorted by the dedup key."""
    ordered = sorted(items, key=lambda r: r.dedup_key) if len(items) > 1 else items
    return {
        "transid": [r.transid for r in ordered],
        "correlation_id": [r.correlation_id for r in ordered],
        "code": [r.code for r in ordered],
        "delivery_status": [r.delivery_status for r in ordered],
        "description": [r.description for r in ordered],
        "destination": [r.destination for r in ordered],
        "reported_at": [r.reported_at for r in ordered],
        "callback_data": [r.callback_data for r in ordered],
        "message_count": [r.message_count for r in ordered],
        "carrier": [r.carrier for r in ordered],
        "raw": [r.raw for r in ordered],
    }


class WebhookServer:
    """The aiohttp receiver. `create_app()` for tests; `start()` / `stop()` to serve."""

    def __init__(
        self,
        *,
        pool: db.Pool,
        settings: WebhookSettings,
        optout: OptOutSettings,
        queries: Mapping[str, str],
        regions: reports.OptOutRegions | None = None,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self._pool = pool
        self._settings = settings
        # Told after each group commit that stored a report (the reconciler's wake).
        self._on_stored = on_stored
        self._optout = optout
        # None: no region, so a national-format number cannot opt out.
        self._regions = regions or reports.OptOutRegions()
        self._queries = db.require(queries, QUERIES)
        self._token = settings.token.encode()
        # Validated at config load: the zone of report timestamps sent without an offset.
        self._report_zone = zoneinfo.ZoneInfo(settings.report_timezone)
        self.stats = WebhookStats()
        # It also writes, rate-limited, every line a client can cause (wrong paths, tokens).
        self.guard = netguard.ConnectionGuard(
            networks=[ipaddress.ip_network(n, strict=False) for n in settings.allow_networks],
            read_timeout_s=settings.read_timeout_s,
            throttle=logs.LogThrottle(),
        )
        self._committer: GroupCommitter | None = None
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.port = 0
        self.url = ""

    def create_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self._settings.max_body_bytes, middlewares=[self._handling]
        )
        app.cleanup_ctx.append(self._flusher)
        app.router.add_post(WEBHOOK_PREFIX + "/{kind:dr|mo}", self._missing_token)
        app.router.add_post(WEBHOOK_PREFIX + "/{kind:dr|mo}/", self._missing_token)
        app.router.add_post(WEBHOOK_PREFIX + "/{kind:dr|mo}/{token}", self._webhook)
        # Anything else under the prefix (a token holding '/' gives such a path): a 404 that
        # is logged, since the access log is off and the platform does not retry it.
        app.router.add_route("*", WEBHOOK_PREFIX + "/{rest:.*}", self._not_found)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self) -> None:
        """Serve on `listen` (port 0 picks a free port; see `.port` and `.url`)."""
        host, port = parse_listen(self._settings.listen)
        # No access log: its lines would carry the token in the path.
        runner = web.AppRunner(
            self.create_app(),
            access_log=None,
            shutdown_timeout=self._settings.store_timeout_s + 1.0,
            keepalive_timeout=self._settings.keepalive_s,
        )
        await runner.setup()
        assert runner.server is not None
        try:
            # Listening here rather than through a web.TCPSite puts the guard in front
            # of aiohttp's protocol: it refuses peers and times out requests it never saw.
            listener = await asyncio.get_running_loop().create_server(
                self.guard.wrap(runner.server), host, port
            )
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._listener = listener
        self.port = int(listener.sockets[0].getsockname()[1])
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"
        log.info("webhooks_started", url=self.url)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish and their reports commit."""
        if self._runner is not None:
            log.info("webhooks_stopping")
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            await self._runner.cleanup()
            self._runner = None
            log.info("webhooks_stopped")

    @web.middleware
    async def _handling(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # The headers are in: the guard's clock stops, the handler bounds the body.
        transport = request.transport
        self.guard.request_started(transport)
        try:
            return await handler(request)
        finally:
            self.guard.request_finished(transport)

    async def _flusher(self, app: web.Application) -> AsyncIterator[None]:
        committer = GroupCommitter(
            pool=self._pool,
            sql=self._queries["webhook_insert_reports"],
            group_max=self._settings.group_max,
            timeout_s=self._settings.store_timeout_s,
            stats=self.stats,
            on_stored=self._on_stored,
        )
        task = asyncio.create_task(committer.run(), name="webhook-flusher")
        self._committer = committer
        try:
            yield
        finally:
            # Handlers have finished by now (aiohttp waits for them before cleanup).
            self._committer = None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # A task cancelled before its first step never ran its own clean-up.
            committer.close()

    async def _missing_token(self, request: web.Request) -> web.Response:
        return self._unauthorized(request, "token_missing")

    def _unauthorized(self, request: web.Request, reason: str) -> web.Response:
        self.stats.unauthorized += 1
        # Never the path: it holds the token that was tried.
        self.guard.warn(
            "webhook_unauthorized",
            kind=request.match_info.get("kind"),
            reason=reason,
            remote=request.remote,
        )
        return web.Response(status=404, text="not found")

    async def _not_found(self, request: web.Request) -> web.Response:
        self.stats.not_found += 1
        first = request.match_info["rest"].split("/", 1)[0]
        # Never the path: it may hold a token, whole or in pieces.
        self.guard.warn(
            "webhook_not_found",
            kind=first if first in KINDS else None,
            method=request.method,
            remote=request.remote,
        )
        return web.Response(status=404, text="not found")

    def _signed(self, request: web.Request, body: bytes) -> bool:
        if not self._settings.hmac_secret:
            return True
        try:
            # aiohttp hands over undecodable header bytes as surrogates; a signature is ASCII.
            given = request.headers.get(SIGNATURE_HEADER, "").encode("ascii")
        except UnicodeEncodeError:
            return False
        expected = hmac.new(self._settings.hmac_secret.encode(), body, hashlib.sha256)
        return hmac.compare_digest(given, f"sha256={expected.hexdigest()}".encode())

    async def _webhook(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        if not hmac.compare_digest(request.match_info["token"].encode(), self._token):
            return self._unauthorized(request, "token_mismatch")
        try:
            if request.content.is_eof():
                # The whole body arrived with the headers (a report is a few hundred
                # bytes): nothing to wait for, and no timer to arm and cancel.
                body = await request.read()
            else:
                async with asyncio.timeout(self._settings.read_timeout_s):
                    body = await request.read()
        except TimeoutError:
            self.guard.warn(
                "webhook_read_timed_out", phase="body", kind=kind, remote=request.remote
            )
            # Closed without an answer, like a slow header: the platform sends it again
            # later, which it would not after a 408.
            request.protocol.force_close()
            return web.Response(status=408, text="request timeout")
        except web.HTTPRequestEntityTooLarge:
            log.warning(
                "webhook_too_large",
                kind=kind,
                content_length=request.content_length,
                max_body_bytes=self._settings.max_body_bytes,
                remote=request.remote,
            )
            return web.Response(status=413, text="body too large")
        if not self._signed(request, body):
            self.stats.unauthorized += 1
            self.guard.warn(
                "webhook_forbidden", kind=kind, reason="signature", remote=request.remote
            )
            return web.Response(status=403, text="forbidden")
        try:
            if kind == "dr":
                return await self._delivery_reports(request, body)
            return await self._incoming_messages(request, body)
        except ParseError as exc:
            return await self._reject(request, kind, body, exc.reason)
        except StoreRefused as exc:
            return await self._reject(request, kind, body, str(exc))
        except _UNAVAILABLE as exc:
            return self._unavailable(kind, exc)

    async def _delivery_reports(self, request: web.Request, body: bytes) -> web.Response:
        self.stats.dr_requests += 1
        parsed = reports.parse_delivery_reports(body, zone=self._report_zone)
        self.stats.reports_received += len(parsed)
        committer = self._committer
        if committer is None:
            raise DatabaseUnavailable("receiver stopping")
        if parsed:
            await committer.submit(parsed)
        if logs.debug_enabled():
            # Checked first: a structlog call costs a logger bind even when it is dropped,
            # a tenth of this handler's time.
            log.debug("dr_received", reports=len(parsed))
        return _ok(len(parsed))

    async def _incoming_messages(self, request: web.Request, body: bytes) -> web.Response:
        self.stats.mo_requests += 1
        messages = reports.parse_incoming_messages(body)
        sql = self._queries["webhook_store_incoming"]
        outcomes: list[tuple[IncomingMessage, str | None, Any]] = []
        async with asyncio.timeout(self._settings.store_timeout_s):
            async with self._pool.acquire() as conn, conn.transaction():
                # In order, in one transaction: STOP then START from one number ends opted in.
                for message in messages:
                    action, msisdn = self._optout_of(message)
                    row = await conn.fetchrow(
                        sql,
                        message.tid,
                        message.oa,
                        message.da,
                        message.message,
                        message.user_id,
                        message.channel,
                        message.sent_at,
                        action,
                        dict(message.raw),
                        msisdn,
                        self._optout.reply_window_h,
                    )
                    outcomes.append((message, action, row))
        stored = sum(1 for _, _, row in outcomes if row is not None)
        metrics.INCOMING.labels("stored").inc(stored)
        metrics.INCOMING.labels("duplicate").inc(len(outcomes) - stored)
        for message, action, row in outcomes:
            # No number and no text in logs: both are the customer's.
            log.info(
                "mo_received",
                incoming_id=row["id"] if row else None,
                tid=message.tid,
                action=action,
                duplicate=row is None,
                campaign_id=row["campaign_id"] if row else None,
                recipient_id=row["recipient_id"] if row else None,
                suppressions_added=row["suppressions_added"] if row else 0,
                suppressions_removed=row["suppressions_removed"] if row else 0,
            )
        return web.json_response({"status": "ok", "messages": len(messages)})

    def _optout_of(self, message: IncomingMessage) -> tuple[str | None, str | None]:
        """The opt-out action of `message` (or None) and its sender in E.164 (or None);
        the number links any message to the recipient it answers."""
        action = reports.optout_action(
            message.message,
            stop_keywords=self._optout.stop_keywords,
            start_keywords=self._optout.start_keywords,
        )
        msisdn = reports.normalise_oa(
            message.oa, default_region=self._regions.region_for(message.da)
        )
        if action is not None and msisdn is None:
            log.warning("optout_ignored", tid=message.tid, action=action, reason="oa_not_a_number")
            return None, None
        return action, msisdn

    async def _reject(
        self, request: web.Request, kind: str, body: bytes, reason: str
    ) -> web.Response:
        try:
            async with asyncio.timeout(self._settings.store_timeout_s):
                async with self._pool.acquire() as conn:
                    reject_id = await conn.fetchval(
                        self._queries["webhook_insert_reject"],
                        kind,
                        reason,
                        request.content_type,
                        request.remote,
                        body,
                    )
        except db.UNAVAILABLE_ERRORS as exc:
            # Not kept, so not refused: a 503 makes the platform send it again.
            return self._unavailable(kind, exc)
        self.stats.rejected += 1
        (metrics.REPORTS if kind == "dr" else metrics.INCOMING).labels("rejected").inc()
        log.warning("webhook_rejected", kind=kind, reject_id=reject_id, reason=reason)
        return web.json_response({"status": "rejected", "reason": reason}, status=400)

    def _unavailable(self, kind: str, exc: BaseException) -> web.Response:
        self.stats.unavailable += 1
        log.debug("webhook_unavailable", kind=kind, error_type=type(exc).__name__)
        return web.json_response(
            {"status": "unavailable"}, status=503, headers={"Retry-After": _RETRY_AFTER_S}
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        want = db.expected_version()
        try:
            async with asyncio.timeout(self._settings.store_timeout_s):
                async with self._pool.acquire() as conn:
                    # A pool connection proxies every Connection method db uses.
                    have = await db.schema_version(cast(db.Connection, conn))
        except db.UNAVAILABLE_ERRORS:
            return web.json_response({"status": "database_unavailable"}, status=503)
        body = {"status": "ok", "schema_version": have, "expected_schema_version": want}
        if have != want:
            body["status"] = "schema_mismatch"
            return web.json_response(body, status=503)
        return web.json_response(body)

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})
