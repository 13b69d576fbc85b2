"""A small stand-in for `POST /resources/v1/messaging` on 127.0.0.1, over real sockets.

Kept beside the simulator (campaign/simulator.py, tests/helpers/sim.py) for two things the
simulator does not do, used by tests/acceptance/test_sending.py and test_bad_input.py:

- It records every request: the parsed body and, per destination, (msisdn, correlation
  id, text) in arrival order, with its arrival time. Tests assert on the exact payload the
  sender built (personalised texts, channels, smartlinks, template, sms type, priority,
  callbackData, notifyurl, expiry), on each request's size and order, and on arrival times
  at the server. The simulator keeps counters only on its hot path.
- It answers request number N with anything: an API error code (7003, 7004, 7009, 7020,
  7108), an HTTP status with any body and headers (429 with Retry-After: 0, 503 with a text
  body, 400), a per-msisdn rejection, a dropped connection or a hang on exactly that
  request. The simulator injects only 500 / 7006 / slow / drop faults, and answers 7003,
  7004, 7009, 7020 or 7108 only to requests that really are invalid or over its rate.

Otherwise it answers like the API in the reference sheet (HTTP 200 in both shapes, one
result per destination with its correlation id; 7001 / 7002 / 7009 / 7004 checks).
Anything that needs reports, rates or faults end to end uses the simulator instead.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass(frozen=True)
class Reply:
    """An HTTP answer; `body=None` means the normal per-destination results."""

    status: int = 200
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def api_error(code: str, description: str = "error") -> Reply:
    return Reply(body=orjson.dumps({"response": {"code": code, "description": description}}))


@dataclass(frozen=True)
class Drop:
    """Read the request, accept it, and close the connection without answering."""


@dataclass(frozen=True)
class Hang:
    """Accept the request and answer only after `seconds` (past the client's timeout)."""

    seconds: float = 30.0


Action = Reply | Drop | Hang


@dataclass
class Received:
    index: int
    at: float
    key: str | None
    body: Any
    # (msisdn, correlationid, text) per destination, in request order.
    destinations: list[tuple[str, str | None, str | None]]
    action: Action
    accepted: bool = False

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.body if isinstance(self.body, list) else [self.body]


class FakeApi:
    def __init__(
        self,
        *,
        key: str,
        script: Mapping[int, Action] | None = None,
        default: Action | None = None,
        reject_msisdns: Mapping[str, str] | None = None,
        responder: Callable[[Received], Action | None] | None = None,
    ) -> None:
        self.key = key
        # Request number (0-based, in arrival order) -> what to answer.
        self.script = dict(script or {})
        self.default: Action = default or Reply()
        self.reject_msisdns = dict(reject_msisdns or {})
        self.responder = responder
        self.requests: list[Received] = []
        # How many times each correlation id was accepted (queued) by this "API".
        self.accepted: Counter[str] = Counter()
        self.received_event = asyncio.Event()
        self._transids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeApi:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/resources/v1/messaging", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeApi:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- what was received ------------------------------------------------------------

    def destinations(self) -> int:
        return sum(len(r.destinations) for r in self.requests)

    def sizes(self) -> list[int]:
        return [len(r.destinations) for r in self.requests]

    def arrivals(self) -> list[tuple[float, int]]:
        """(monotonic time, destinations) per accepted request, for rate checks."""
        return [(r.at, len(r.destinations)) for r in self.requests if r.accepted]

    # --- the API ------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._error("7000", "Invalid JSON")
        messages = body if isinstance(body, list) else [body]
        destinations = [
            (msisdn, d.get("correlationid"), m.get("channels", {}).get("sms", {}).get("text"))
            for m in messages
            for d in m.get("destination", [])
            for msisdn in d.get("msisdn", [])
        ]
        index = len(self.requests)
        action = self.script.get(index)
        received = Received(
            index=index,
            at=time.monotonic(),
            key=request.headers.get("key"),
            body=body,
            destinations=destinations,
            action=Reply(),
        )
        if action is None and self.responder is not None:
            action = self.responder(received)
        received.action = action = action or self.default
        self.requests.append(received)
        self.received_event.set()

        invalid = self._validate(received, messages)
        if invalid is not None:
            return invalid
        if isinstance(action, Reply) and action.body is not None:
            return web.Response(status=action.status, body=action.body, headers=action.headers)
        if isinstance(action, Reply) and action.status != 200:
            return web.Response(status=action.status, headers=action.headers)

        results = self._accept(received)
        if isinstance(action, Drop):
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if isinstance(action, Hang):
            await asyncio.sleep(action.seconds)
        return web.Response(
            body=orjson.dumps({"response": results}), content_type="application/json"
        )

    def _validate(self, received: Received, messages: list[Any]) -> web.Response | None:
        if not received.key:
            return self._error("7002", "Service key missing")
        if received.key != self.key:
            return self._error("7001", "Authentication failed.")
        if len(received.destinations) > 1000:
            return self._error("7009", "More than 1000 destinations")
        for m in messages:
            if m.get("priority", "2") not in ("1", "2", "3"):
                return self._error("7004", "Invalid priority")
            text = m.get("channels", {}).get("sms", {}).get("text") or ""
            links = {str(s.get("linkid")) for s in m.get("channels", {}).get("smartlinks", [])}
            for part in text.split("{{link_")[1:]:
                if part.split("}}")[0] not in links:
                    return self._error("7004", "Smartlink missing")
        return None

    def _accept(self, received: Received) -> list[dict[str, Any]]:
        results = []
        for msisdn, correlation_id, _ in received.destinations:
            code = self.reject_msisdns.get(msisdn)
            item: dict[str, Any] = {
                "code": code or "1001",
                "description": "Invalid parameters" if code else "Queued",
                "transid": f"tx-{next(self._transids)}",
            }
            if correlation_id is not None:
                item["correlationid"] = correlation_id
                if code is None:
                    self.accepted[correlation_id] += 1
            results.append(item)
        received.accepted = True
        # The API does not promise any order: the sender must match by correlation id.
        results.reverse()
        return results

    @staticmethod
    def _error(code: str, description: str) -> web.Response:
        return web.Response(
            body=orjson.dumps(
                {"response": {"code": code, "description": description, "transid": "tx-err"}}
            ),
            content_type="application/json",
        )
