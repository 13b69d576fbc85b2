"""The ops address of every process: /metrics, /healthz, /readyz and the dashboard.

Every `campaign worker` (whatever its roles) and `campaign webhooks` serve it on
`[ops] listen` (default 127.0.0.1:9100; `--ops-listen` overrides it per process). It is
bound before anything else starts, so a taken port stops the process at once with one
line (exit 2), and it answers while the database is still being reached.

- GET /healthz: liveness. 200 while the process's loops turn (the worker's probe says
  so), 503 otherwise: a supervisor restarts the process.
- GET /readyz: readiness. 200 when the database answers, its schema version is this
  code's and every role of the process has started; 503 with the reason otherwise.
- GET /metrics: Prometheus text (campaign/metrics.py). Open, like the probes.
- GET /, /api/campaigns, /api/campaigns/{id}: the dashboard (docs/dashboard.md); with
  `[ops] token` set they need it, as `Authorization: Bearer TOKEN` or the cookie the
  login form (GET/POST /login) sets. Compared in constant time.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from campaign import config, dashboard, db, logs, metrics
from campaign.config import OpsSettings
from campaign.netaddr import parse_listen

log = structlog.get_logger(__name__)

QUERIES = dashboard.QUERIES
COOKIE = "campaign_ops"
# Paths anyone who reaches the address may read: the probes and the metrics.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/login"})
# Answered 503: the database is down or too slow for now.
_UNAVAILABLE: tuple[type[Exception], ...] = (TimeoutError, *db.UNAVAILABLE_ERRORS)
# The page loads nothing from anywhere: its own inline script and style, its own API.
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
# A campaign's figures take a few scans of its recipients (seconds for millions of them).
# An answer is reused for CACHE_FACTOR times as long as it took to compute, and reads run
# one at a time: however many people watch, the dashboard keeps at most one connection
# busy about 1 / (1 + CACHE_FACTOR) of the time. Small campaigns stay fresh to the second.
CACHE_FACTOR = 4.0
READ_TIMEOUT_S = 30.0
# A probe that has not answered by now counts as failed.
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class _Answer:
    body: dict[str, Any] | None
    fresh_until: float


@dataclass(frozen=True, slots=True)
class Check:
    """One probe's answer: ok, and what a person reading the JSON needs to know."""

    ok: bool
    detail: Mapping[str, Any] = field(default_factory=dict)


Probe = Callable[[], Awaitable[Check]]


async def _always_ok() -> Check:
    return Check(True)


class OpsServer:
    """The ops HTTP server of one process; the database pool is attached once it exists."""

    def __init__(
        self,
        *,
        settings: OpsSettings,
        liveness: Probe = _always_ok,
        roles_started: Probe = _always_ok,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._answers: dict[str, _Answer] = {}
        self._reading = asyncio.Lock()
        self._liveness = liveness
        self._roles_started = roles_started
        self._pool: db.Pool | None = None
        self._queries: Mapping[str, str] = db.require(db.load_queries(), QUERIES)
        self._runner: web.AppRunner | None = None
        self._throttle = logs.LogThrottle()
        self.port = 0
        self.url = ""

    def attach(self, pool: db.Pool | None) -> None:
        """The pool the readiness probe and the dashboard read (None: not connected)."""
        self._pool = pool

    def create_app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._page)
        app.router.add_get("/login", self._login_form)
        app.router.add_post("/login", self._login)
        app.router.add_get("/api/campaigns", self._api_campaigns)
        app.router.add_get("/api/campaigns/{campaign_id}", self._api_campaign)
        return app

    async def start(self) -> None:
        """Bind `[ops] listen`; a taken or unusable address is a ConfigError (exit 2)."""
        listen = self._settings.listen
        host, port = parse_listen(listen)
        runner = web.AppRunner(self.create_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            reason = (
                "address already in use (another process on this host? give each one its "
                "own --ops-listen HOST:PORT)"
                if exc.errno == errno.EADDRINUSE
                else exc.strerror or str(exc)
            )
            raise config.ConfigError(f"[ops] listen {listen}: {reason}") from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"
        log.info("ops_started", url=self.url, dashboard_token=bool(self._settings.token))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- access ---------------------------------------------------------------------

    def _session_value(self) -> str:
        """The login cookie's value: derived from the token, never the token itself."""
        key = self._settings.token.encode()
        return hmac.new(key, b"campaign-ops-session", hashlib.sha256).hexdigest()

    def _allowed(self, request: web.Request) -> bool:
        token = self._settings.token
        if not token:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            return True
        cookie = request.cookies.get(COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self._session_value().encode())

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or self._allowed(request):
            response = await handler(request)
        elif request.path.startswith("/api/"):
            response = web.json_response(
                {"error": "unauthorized"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="campaign"'},
            )
        else:
            raise web.HTTPSeeOther("/login")
        # The page and its numbers are not for caches or frames of other sites.
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    async def _login_form(self, request: web.Request) -> web.Response:
        failed = request.query.get("failed") == "1"
        return web.Response(
            text=_login_html(failed),
            content_type="text/html",
            headers={"Content-Security-Policy": PAGE_POLICY},
        )

    async def _login(self, request: web.Request) -> web.Response:
        form = await request.post()
        given = str(form.get("token", ""))
        token = self._settings.token
        if not token or not hmac.compare_digest(given.encode(), token.encode()):
            # A line a client can cause: rate-limited, like the receiver's.
            dropped = self._throttle.allow("ops_login_refused")
            if dropped is not None:
                log.warning("ops_login_refused", remote=request.remote, suppressed=dropped)
            raise web.HTTPSeeOther("/login?failed=1")
        response = web.HTTPSeeOther("/")
        response.set_cookie(
            COOKIE, self._session_value(), httponly=True, samesite="Strict", path="/"
        )
        raise response

    # --- probes and metrics ---------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        check = await self._probe(self._liveness)
        body = {"status": "ok" if check.ok else "unhealthy", **check.detail}
        return web.json_response(body, status=200 if check.ok else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {"expected_schema_version": db.expected_version()}
        pool = self._pool
        if pool is None:
            return web.json_response({"status": "database_not_connected", **body}, status=503)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                async with pool.acquire() as conn:
                    have = await db.schema_version(cast(db.Connection, conn))
        except _UNAVAILABLE:
            return web.json_response({"status": "database_unavailable", **body}, status=503)
        body["schema_version"] = have
        if have != body["expected_schema_version"]:
            return web.json_response({"status": "schema_mismatch", **body}, status=503)
        roles = await self._probe(self._roles_started)
        body |= roles.detail
        if not roles.ok:
            return web.json_response({"status": "roles_starting", **body}, status=503)
        return web.json_response({"status": "ok", **body})

    async def _probe(self, probe: Probe) -> Check:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                return await probe()
        except TimeoutError:
            return Check(False, {"reason": "probe timed out"})

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    # --- dashboard ------------------------------------------------------------------

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(
            text=dashboard.page(),
            content_type="text/html",
            headers={"Content-Security-Policy": PAGE_POLICY},
        )

    async def _api_campaigns(self, request: web.Request) -> web.Response:
        return await self._read("campaigns", lambda c: dashboard.campaigns(c, self._queries))

    async def _api_campaign(self, request: web.Request) -> web.Response:
        raw = request.match_info["campaign_id"]
        if not raw.isdecimal() or len(raw) > 18:
            return web.json_response({"error": "not_found"}, status=404)
        campaign_id = int(raw)
        return await self._read(
            f"campaign/{campaign_id}",
            lambda conn: dashboard.campaign(conn, self._queries, campaign_id),
        )

    async def _read(
        self, key: str, fetch: Callable[[db.Connection], Awaitable[dict[str, Any] | None]]
    ) -> web.Response:
        pool = self._pool
        if pool is None:
            return web.json_response({"error": "database_not_connected"}, status=503)
        try:
            async with self._reading:
                body = await self._fresh(pool, key, fetch)
        except _UNAVAILABLE as exc:
            log.warning("ops_read_failed", error_type=type(exc).__name__)
            return web.json_response(
                {"error": "database_unavailable"}, status=503, headers={"Retry-After": "5"}
            )
        if body is None:
            return web.json_response({"error": "not_found"}, status=404)
        return web.json_response(body | {"refresh_s": self._settings.refresh_s})

    async def _fresh(
        self,
        pool: db.Pool,
        key: str,
        fetch: Callable[[db.Connection], Awaitable[dict[str, Any] | None]],
    ) -> dict[str, Any] | None:
        """The answer for `key`: the last one while it is fresh, else read now (locked)."""
        started = self._clock()
        answer = self._answers.get(key)
        if answer is not None and started < answer.fresh_until:
            return answer.body
        async with asyncio.timeout(READ_TIMEOUT_S):
            async with pool.acquire() as conn:
                body = await fetch(cast(db.Connection, conn))
        done = self._clock()
        # Forget stale answers, so ids asked for once do not pile up.
        self._answers = {k: a for k, a in self._answers.items() if done < a.fresh_until}
        self._answers[key] = _Answer(body, done + CACHE_FACTOR * (done - started))
        return body


def _login_html(failed: bool) -> str:
    message = '<p class="err">That token is not right.</p>' if failed else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>campaign: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font:15px system-ui,sans-serif;margin:4em auto;max-width:22em;color:#222}}
input{{font:inherit;width:100%;padding:.4em;margin:.5em 0;box-sizing:border-box}}
.err{{color:#b00020}}</style></head>
<body><h1>campaign</h1>{message}
<form method="post" action="/login"><label>Dashboard token
<input type="password" name="token" autocomplete="current-password" autofocus></label>
<button type="submit">Sign in</button></form></body></html>"""
