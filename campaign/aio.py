"""Small asyncio helpers shared by the roles' loops."""

from __future__ import annotations

import asyncio
import contextlib


async def sleep_or_stop(stop: asyncio.Event, timeout_s: float) -> bool:
    """Sleep up to `timeout_s`, waking early when `stop` is set; True when it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=timeout_s)
    return stop.is_set()


async def wait_woken(wake: asyncio.Event, stop: asyncio.Event, timeout_s: float) -> None:
    """Sleep up to `timeout_s`, waking early when `wake` or `stop` is set."""
    woken = asyncio.ensure_future(wake.wait())
    halt = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({woken, halt}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        woken.cancel()
        halt.cancel()


class IdleBackoff:
    """The wait before a role's next pass: `base_s` after a pass that found work, then
    doubled after each pass that found none, up to `max_s` (never below `base_s`)."""

    def __init__(self, *, base_s: float, max_s: float) -> None:
        self.base_s = base_s
        self.max_s = max(base_s, max_s)
        self._next_s = base_s

    def reset(self) -> None:
        """Work is coming (a report stored, a batch taken): the next wait is `base_s`."""
        self._next_s = self.base_s

    def after(self, *, worked: bool) -> float:
        """The wait after a pass that did (or did not) find work."""
        if worked:
            self.reset()
            return self.base_s
        wait_s = self._next_s
        self._next_s = min(self.max_s, 2 * wait_s)
        return wait_s
