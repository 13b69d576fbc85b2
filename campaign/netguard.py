"""The receiver's connection guard: who may connect, and how long a request may take to arrive.

It wraps the HTTP server's protocol (aiohttp's, or any asyncio protocol factory), below
the routes and the handlers:

- A peer outside `allow_networks` is closed when its connection is made, before a byte of
  it is read (an HTTP server answers only once a request's headers are in; a client that
  never finishes them was held open for an hour).
- A request's line and headers must be complete within `read_timeout_s` of the
  connection opening (its first request) or of the request's first byte (a later one on
  a kept-alive connection). Its body is the handler's to bound: `request_started()`
  stops this clock and `request_finished()` lets the next request's first byte start it.
- A connection closed for either reason gets no answer: the platform sends a callback
  that failed again later, but not one answered with a 4xx.

Idle connections between requests are closed by the HTTP server's keep-alive timeout.
Behind a reverse proxy the peer is the proxy: the allow-list then sees its address.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Iterable

import structlog

from campaign.logs import LogThrottle

log = structlog.get_logger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
ProtocolFactory = Callable[[], asyncio.Protocol]


class ConnectionGuard:
    """One per listener; `wrap(factory)` is the protocol factory to listen with."""

    def __init__(
        self,
        *,
        networks: Iterable[Network],
        read_timeout_s: float,
        throttle: LogThrottle,
    ) -> None:
        self._networks = tuple(networks)
        self.read_timeout_s = read_timeout_s
        self._throttle = throttle
        # The connections let in, by transport (what a request handler knows).
        self.open: dict[asyncio.BaseTransport, _Guarded] = {}
        self.refused = 0
        self.timed_out = 0

    def wrap(self, factory: ProtocolFactory) -> ProtocolFactory:
        return lambda: _Guarded(self, factory)

    def allows(self, host: str | None) -> bool:
        if not self._networks:
            return True
        try:
            address = ipaddress.ip_address(host or "")
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        """The request's headers are in and its handler runs: the handler bounds the rest."""
        guarded = self.open.get(transport) if transport is not None else None
        if guarded is not None:
            guarded.handling(True)

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        guarded = self.open.get(transport) if transport is not None else None
        if guarded is not None:
            guarded.handling(False)

    def warn(self, event: str, **fields: object) -> None:
        """A line a client can cause: rate-limited."""
        dropped = self._throttle.allow(event)
        if dropped is not None:
            log.warning(event, suppressed=dropped, **fields)


class _Guarded(asyncio.Protocol):
    """One connection: the guard's checks in front of the HTTP protocol it wraps."""

    def __init__(self, guard: ConnectionGuard, factory: ProtocolFactory) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._remote: str | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._handling = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's protocol is handed a stream transport.
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self._remote = str(peer[0]) if peer else None
        if not self._guard.allows(self._remote):
            self._guard.refused += 1
            self._guard.warn("webhook_connection_refused", remote=self._remote)
            # Nothing was read and nothing is answered.
            transport.abort()
            return
        self._transport = transport
        self._guard.open[transport] = self
        self._start_clock()
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if not self._handling and self._deadline is None:
            # The first byte of a request on a kept-alive connection.
            self._start_clock()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        if self._transport is not None:
            self._guard.open.pop(self._transport, None)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def handling(self, on: bool) -> None:
        self._handling = on
        if on:
            self._stop_clock()

    def _start_clock(self) -> None:
        self._stop_clock()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._guard.read_timeout_s, self._expired)

    def _stop_clock(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self._transport is None or self._handling:
            return
        self._guard.timed_out += 1
        self._guard.warn("webhook_read_timed_out", phase="headers", remote=self._remote)
        self._transport.abort()
