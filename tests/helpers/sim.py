"""Helpers for tests that talk to the simulator: a recording callback receiver, a valid
request body, and a POST that returns status, headers and decoded JSON."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from campaign.simulator import MESSAGING_PATH, Simulator, SimulatorConfig, start_simulator

KEY = "sim-key"


@dataclass
class Received:
    path: str
    body: Any
    at: float


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST; `fail_first` answers are given
    to the first requests (an int status, or "close" to drop the connection)."""

    fail_first: list[int | str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    attempts: int = 0
    base_url: str = ""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str = "/dr") -> str:
        return f"{self.base_url}{path}"

    def reports(self) -> list[dict[str, Any]]:
        """Every report received on /dr, arrays flattened, in arrival order."""
        out: list[dict[str, Any]] = []
        for item in self.received:
            if item.path == "/dr":
                out.extend(item.body if isinstance(item.body, list) else [item.body])
        return out

    async def wait_for(self, count: int, *, timeout_s: float = 10.0) -> None:
        """Wait until `count` POSTs were recorded."""
        async with asyncio.timeout(timeout_s):
            while len(self.received) < count:
                self._changed.clear()
                await self._changed.wait()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.attempts += 1
        self._changed.set()
        if self.fail_first:
            answer = self.fail_first.pop(0)
            if answer == "close":
                assert request.transport is not None
                request.transport.abort()
                return web.Response(status=204)
            assert isinstance(answer, int)
            return web.Response(status=answer, text="failing on purpose")
        self.received.append(Received(request.path, orjson.loads(raw), time.monotonic()))
        return web.Response(text="ok")


@contextlib.asynccontextmanager
async def receiver(fail_first: Sequence[int | str] = ()) -> AsyncIterator[Receiver]:
    rec = Receiver(fail_first=list(fail_first))
    app = web.Application()
    app.router.add_post("/{tail:.*}", rec._handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    rec.base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield rec
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def simulator(config: SimulatorConfig | None = None) -> AsyncIterator[Simulator]:
    sim = await start_simulator(config or fast_config())
    try:
        yield sim
    finally:
        await sim.close()


def fast_config(**knobs: Any) -> SimulatorConfig:
    """A config with reports due within a few milliseconds and quick retries."""
    values: dict[str, Any] = {
        "dr_delay_min_s": 0.0,
        "dr_delay_max_s": 0.02,
        "callback_retry_interval_s": 0.05,
        "dr_timeout_s": 2.0,
        "seed": 7,
    }
    values.update(knobs)
    return SimulatorConfig(**values)


def sms(
    msisdns: Sequence[str] = ("447700900001",),
    *,
    text: str = "Hello",
    notifyurl: str | None = None,
    correlation_prefix: str | None = "c",
    **fields: Any,
) -> dict[str, Any]:
    """A valid message object with one destination entry per msisdn."""
    destinations: list[dict[str, Any]] = []
    for n, msisdn in enumerate(msisdns):
        entry: dict[str, Any] = {"msisdn": [msisdn]}
        if correlation_prefix is not None:
            entry["correlationid"] = f"{correlation_prefix}{n}"
        destinations.append(entry)
    body: dict[str, Any] = {
        "deliverychannel": "sms",
        "channels": {"sms": {"text": text, "senderid": "DEMOBK"}},
        "destination": destinations,
    }
    if notifyurl is not None:
        body["notifyurl"] = notifyurl
    body.update(fields)
    return body


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any

    @property
    def code(self) -> str:
        """The code of a single-object (error) answer."""
        response = self.body["response"]
        assert isinstance(response, dict), f"expected an error object, got {self.body!r}"
        code: str = response["code"]
        return code

    @property
    def results(self) -> list[dict[str, str]]:
        response = self.body["response"]
        assert isinstance(response, list), f"expected a list of results, got {self.body!r}"
        return response


async def post(
    session: aiohttp.ClientSession,
    sim: Simulator,
    body: Any,
    *,
    key: str | None = KEY,
    raw: bytes | None = None,
) -> Answer:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["key"] = key
    data = raw if raw is not None else orjson.dumps(body)
    async with session.post(sim.base_url + MESSAGING_PATH, data=data, headers=headers) as resp:
        payload = await resp.read()
        decoded = orjson.loads(payload) if resp.content_type == "application/json" else None
        return Answer(resp.status, dict(resp.headers), decoded)
