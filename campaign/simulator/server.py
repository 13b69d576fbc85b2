"""The simulator's HTTP server: the messaging endpoint, the /simulate endpoints, accept path."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from aiohttp import web

from campaign.simulator.api import MESSAGING_PATH, MO_PATH, RESET_PATH, STATS_PATH
from campaign.simulator.callbacks import _Callbacks, _Post
from campaign.simulator.config import FaultSpec, SimulatorConfig
from campaign.simulator.ratelimit import TokenBucket
from campaign.simulator.reports import _Report, _ReportPlanner
from campaign.simulator.stats import Stats, _KeyStats
from campaign.simulator.timestamps import format_timestamp
from campaign.simulator.validation import (
    RequestError,
    _MessagePlan,
    count_destinations,
    parse_messages,
)

# The logger of the whole simulator, whichever module logs.
log = structlog.get_logger("campaign.simulator")


class Simulator:
    """The simulator: an aiohttp server plus its callback sender. Start with `start()`."""

    def __init__(self, *, config: SimulatorConfig) -> None:
        self.config = config
        self._stats = Stats(window_s=config.stats_window_s)
        self._random = random.Random(config.seed)
        self._callbacks: _Callbacks | None = None
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._buckets: dict[str, TokenBucket] = {}
        self._templates = frozenset(config.templates)
        self._keys = frozenset(config.keys)
        self._inactive = frozenset(config.inactive_keys)
        self._transid_prefix = str(uuid.uuid4())[:24]
        self._transids = itertools.count(1)
        self.host = ""
        self.port = 0

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._closing = asyncio.Event()
        self._callbacks = _Callbacks(config=self.config, stats=self._stats)
        await self._callbacks.start()
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post(MESSAGING_PATH, self._handle_messaging)
        app.router.add_get(STATS_PATH, self._handle_stats)
        app.router.add_post(MO_PATH, self._handle_mo)
        app.router.add_post(RESET_PATH, self._handle_reset)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        bound = server.sockets[0].getsockname()
        self.host, self.port = bound[0], bound[1]
        self._stats.reset()
        log.info("simulator_started", url=self.base_url)

    async def close(self) -> None:
        """Stop serving, then stop the callback sender; unsent reports are dropped."""
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._callbacks is not None:
            dropped = self._callbacks.pending
            await self._callbacks.close()
            self._callbacks = None
            log.info(
                "simulator_stopped",
                requests=self._stats.requests,
                accepted=self._stats.accepted,
                reports_sent=self._stats.reports_sent,
                reports_dropped=dropped,
            )

    async def __aenter__(self) -> Simulator:
        """Start on 127.0.0.1 and any free port unless already started."""
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stats(self, *, summary: bool = False) -> dict[str, Any]:
        """The counters, as served at GET /simulate/stats (`summary` drops per-number maps)."""
        pending = self._callbacks.pending if self._callbacks is not None else 0
        return self._stats.to_json(pending=pending, summary=summary)

    def reset_stats(self) -> None:
        self._stats.reset()

    async def wait_reports_sent(self, *, timeout_s: float = 30.0) -> None:
        """Wait until every scheduled callback (reports, MO) is sent or given up."""
        assert self._callbacks is not None, "simulator not started"
        await self._callbacks.wait_idle(timeout_s)

    async def send_mo(
        self, *, oa: str, message: str, da: str | None = None, url: str | None = None
    ) -> dict[str, Any]:
        """POST an incoming message to `url` (default: mo_url); a failure is retried later."""
        assert self._callbacks is not None, "simulator not started"
        target = url or self.config.mo_url
        if not target:
            raise ValueError("no MO URL: set mo_url or pass url")
        if not target.startswith(("http://", "https://")):
            raise ValueError("the MO URL must be an http:// or https:// URL")
        now = time.time()
        tid = str(uuid.uuid4())
        body = {
            "userId": oa,
            "channel": "SMS",
            "da": da or self.config.mo_da,
            "oa": oa,
            "message": message,
            "tid": tid,
            "datetime": format_timestamp(now),
            "ts": str(int(now * 1000)),
        }
        self._callbacks.add_pending(1)
        outcome = await self._callbacks.deliver(_Post(target, orjson.dumps(body), ("mo",), "mo"))
        return {"tid": tid, "status": outcome.status, "error": outcome.error}

    # -- handlers

    async def _handle_stats(self, request: web.Request) -> web.Response:
        summary = request.query.get("summary", "") not in ("", "0", "false")
        return _json(self.stats(summary=summary))

    async def _handle_reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return _json({"reset": True})

    async def _handle_mo(self, request: web.Request) -> web.Response:
        try:
            data = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json({"error": "invalid JSON"}, status=400)
        fields = ("oa", "message", "da", "url")
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), str) for k in ("oa", "message")
        ):
            return _json({"error": "oa and message (strings) are required"}, status=400)
        if any(data.get(k) is not None and not isinstance(data[k], str) for k in fields):
            return _json({"error": "da and url must be strings"}, status=400)
        try:
            result = await self.send_mo(
                oa=data["oa"], message=data["message"], da=data.get("da"), url=data.get("url")
            )
        except ValueError as exc:
            return _json({"error": str(exc)}, status=400)
        return _json(result)

    async def _handle_messaging(self, request: web.Request) -> web.StreamResponse:
        stats = self._stats
        callbacks = self._callbacks
        assert callbacks is not None
        body = await request.read()
        now = time.monotonic()
        stats.requests += 1
        request_no = stats.requests
        elapsed = now - stats.started
        faults = self.config.faults

        key = request.headers.get("key", "")
        if not key:
            return self._reject(None, "7002", "Service Key Missing", body)
        if key in self._inactive:
            return self._reject(self._key_stats(key), "7007", "Service inactive", body)
        if self._keys and key not in self._keys:
            # Unknown keys are pooled under one label: a stranger's key is never shown.
            key_stats = self._key_stats("unknown")
            return self._reject(key_stats, "7001", "Authentication failed.", body)
        key_stats = self._key_stats(key if self._keys else "*")

        if self._fires(faults.http_500, request_no, elapsed):
            stats.faults.add("http_500")
            stats.request_rejected(key_stats, "http_500", 0)
            return web.Response(status=500, text="Internal Server Error")
        if self._fires(faults.error_7006, request_no, elapsed):
            stats.faults.add("error_7006")
            return self._reject(key_stats, "7006", "Internal error", body)
        if self._fires(faults.error_7005, request_no, elapsed):
            stats.faults.add("error_7005")
            return self._reject(key_stats, "7005", "Request expired", body)

        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._reject(key_stats, "7000", "Invalid JSON", b"")
        try:
            plans, total, valid = parse_messages(
                data,
                templates=self._templates,
                max_destinations=self.config.max_destinations,
                require_plus=self.config.require_plus,
                default_notify_url=self.config.default_notify_url,
                now=datetime.now(UTC),
                count_parts=self.config.dr_extra_fields,
            )
        except RequestError as exc:
            return self._reject(key_stats, exc.code, exc.description, body, data=data)

        wait_s = self._take_tokens(key, valid, now)
        if wait_s > 0:
            if self.config.rate_limit_mode == "429":
                stats.request_rejected(key_stats, "http_429", total)
                return _json(
                    _error("7020", "Maximum transaction limit reached", self._next_transid()),
                    status=429,
                    headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
                )
            return self._reject(key_stats, "7020", "Maximum transaction limit reached", b"", total)

        before_response = self._fires(faults.report_before_response, request_no, elapsed)
        planner = _ReportPlanner(
            config=self.config,
            rnd=self._random,
            request_no=request_no,
            elapsed=elapsed,
            immediate=before_response,
        )
        correlate = not self._fires(faults.no_correlation_id, request_no, elapsed)
        if not correlate:
            stats.faults.add("no_correlation_id")
        results = self._accept(key_stats, plans, valid, now, planner, correlate=correlate)
        immediate = self._schedule_reports(planner, now)
        payload = orjson.dumps({"response": results})
        stats.requests_by_result.add("1001")
        key_stats.results.add("1001")

        if before_response:
            stats.faults.add("report_before_response")
            await asyncio.gather(*(callbacks.deliver(p) for p in callbacks.encode(immediate)))
        if self._fires(faults.drop_connection, request_no, elapsed):
            stats.faults.add("drop_connection")
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=204)
        if self._fires(faults.gateway_502, request_no, elapsed):
            # A gateway in front of the platform lost the answer: accepted, reported, 502.
            stats.faults.add("gateway_502")
            return web.Response(status=502, text="Bad Gateway", content_type="text/html")
        if self._fires(faults.slow_response, request_no, elapsed):
            stats.faults.add("slow_response")
            assert self._closing is not None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(faults.slow_response.delay_s):
                    await self._closing.wait()
        return web.Response(body=payload, content_type="application/json")

    # -- the accept path

    def _accept(
        self,
        key_stats: _KeyStats,
        plans: list[_MessagePlan],
        valid: int,
        now: float,
        planner: _ReportPlanner,
        *,
        correlate: bool = True,
    ) -> list[dict[str, str]]:
        """Issue transids, count, and plan reports; returns the per-destination results
        (success items without their correlationid when not `correlate`)."""
        stats = self._stats
        config = self.config
        description = config.queued_description
        prefix = self._transid_prefix
        transids = self._transids
        msisdn_counts = stats.msisdns
        correlation_counts = stats.correlation_ids
        results: list[dict[str, str]] = []
        append = results.append
        duplicate_msisdns = 0
        duplicate_correlations = 0
        for context, destinations in plans:
            plan_reports = planner.plan if context.url else None
            for msisdn, correlation, ok in destinations:
                transid = f"{prefix}{next(transids):012x}"
                if not ok:
                    item = {
                        "code": "7004",
                        "description": "Invalid parameters: msisdn",
                        "transid": transid,
                    }
                    if correlation is not None:
                        item["correlationid"] = correlation
                    append(item)
                    stats.destination_rejected(key_stats, "7004")
                    continue
                if correlation is None or not correlate:
                    append({"code": "1001", "description": description, "transid": transid})
                else:
                    append(
                        {
                            "code": "1001",
                            "description": description,
                            "transid": transid,
                            "correlationid": correlation,
                        }
                    )
                if correlation is not None:
                    seen = correlation_counts.get(correlation, 0)
                    correlation_counts[correlation] = seen + 1
                    duplicate_correlations += seen == 1
                seen = msisdn_counts.get(msisdn, 0)
                msisdn_counts[msisdn] = seen + 1
                duplicate_msisdns += seen == 1
                if plan_reports is not None:
                    plan_reports(context, transid, msisdn, correlation)
        stats.duplicate_msisdns += duplicate_msisdns
        stats.duplicate_correlation_ids += duplicate_correlations
        stats.accepted += valid
        key_stats.accepted += valid
        window = stats.window(now)
        stats.accepted_per_window[window] = stats.accepted_per_window.get(window, 0) + valid
        per_key = key_stats.accepted_per_window
        per_key[window] = per_key.get(window, 0) + valid
        return results

    def _schedule_reports(self, planner: _ReportPlanner, now: float) -> list[_Report]:
        """Hand planned reports to the sender; returns those due now (report_before_response)."""
        callbacks = self._callbacks
        assert callbacks is not None
        for name, count in planner.faults.items():
            self._stats.faults.add(name, count)
        omitted = self._stats.transids_omitted
        for correlation, transid in planner.transids_omitted:
            omitted.setdefault(correlation, []).append(transid)
        planned = planner.planned
        if not planned:
            return []
        callbacks.add_pending(len(planned))
        self._stats.reports_scheduled += len(planned)
        schedule = callbacks.schedule
        due_now = []
        for delay, report in planned:
            if delay == 0.0 and planner.immediate:
                due_now.append(report)
            else:
                schedule(now + delay, report)
        return due_now

    def _key_stats(self, label: str) -> _KeyStats:
        key_stats = self._stats.key(label)
        key_stats.requests += 1
        return key_stats

    def _fires(self, spec: FaultSpec, request_no: int, elapsed: float) -> bool:
        probability = spec.applies(request_no, elapsed)
        return probability > 0.0 and (probability >= 1.0 or self._random.random() < probability)

    def _take_tokens(self, key: str, count: int, now: float) -> float:
        rate = self.config.rate_per_s
        if rate <= 0 or count == 0:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            capacity = rate * self.config.burst_s
            bucket = self._buckets[key] = TokenBucket(rate_per_s=rate, capacity=capacity, now=now)
        return bucket.take(count, now)

    def _next_transid(self) -> str:
        return f"{self._transid_prefix}{next(self._transids):012x}"

    def _reject(
        self,
        key_stats: _KeyStats | None,
        code: str,
        description: str,
        body: bytes,
        destinations: int | None = None,
        *,
        data: Any = None,
    ) -> web.Response:
        if destinations is None:
            if data is None and body:
                with contextlib.suppress(orjson.JSONDecodeError):
                    data = orjson.loads(body)
            destinations = count_destinations(data) if data is not None else 0
        self._stats.request_rejected(key_stats, code, destinations)
        return _json(_error(code, description, self._next_transid()))


def _error(code: str, description: str, transid: str) -> dict[str, Any]:
    return {"response": {"code": code, "description": description, "transid": transid}}


def _json(
    body: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


async def start_simulator(
    config: SimulatorConfig, *, host: str = "127.0.0.1", port: int = 0
) -> Simulator:
    """Start a simulator listening on host:port (0: any free port) and return it."""
    simulator = Simulator(config=config)
    try:
        await simulator.start(host=host, port=port)
    except BaseException:
        await simulator.close()
        raise
    return simulator
