"""The counters served at GET /simulate/stats."""

from __future__ import annotations

import time
from typing import Any


class _Counter(dict[str, int]):
    def add(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n


class _KeyStats:
    __slots__ = ("accepted", "accepted_per_window", "rejected_by_code", "requests", "results")

    def __init__(self) -> None:
        self.requests = 0
        self.results = _Counter()
        self.accepted = 0
        self.rejected_by_code = _Counter()
        self.accepted_per_window: dict[int, int] = {}

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "requests_by_result": dict(self.results),
            "accepted": self.accepted,
            "rejected_by_code": dict(self.rejected_by_code),
            "accepted_per_window": {str(k): v for k, v in self.accepted_per_window.items()},
        }


class Stats:
    """Exact counters of everything the simulator received and sent."""

    def __init__(self, *, window_s: float) -> None:
        self.window_s = window_s
        self.reset()

    def reset(self) -> None:
        self.started = time.monotonic()
        self.requests = 0
        self.requests_by_result = _Counter()
        self.accepted = 0
        self.rejected = 0
        self.rejected_by_code = _Counter()
        self.keys: dict[str, _KeyStats] = {}
        self.accepted_per_window: dict[int, int] = {}
        self.msisdns: dict[str, int] = {}
        self.correlation_ids: dict[str, int] = {}
        # Correlation id -> transids issued for it whose reports left the transid out.
        self.transids_omitted: dict[str, list[str]] = {}
        self.duplicate_msisdns = 0
        self.duplicate_correlation_ids = 0
        self.reports_scheduled = 0
        self.reports_sent = 0
        self.reports_failed = 0
        self.reports_retried = 0
        self.reports_by_code = _Counter()
        self.report_posts = 0
        self.mo_sent = 0
        self.mo_failed = 0
        self.mo_retried = 0
        self.faults = _Counter()

    def key(self, label: str) -> _KeyStats:
        stats = self.keys.get(label)
        if stats is None:
            stats = self.keys[label] = _KeyStats()
        return stats

    def window(self, now: float) -> int:
        return int((now - self.started) / self.window_s)

    def request_rejected(self, key: _KeyStats | None, result: str, destinations: int) -> None:
        """A whole request answered with an error `result` (an API code, or http_NNN)."""
        self.requests_by_result.add(result)
        if key is not None:
            key.results.add(result)
        if destinations:
            self.rejected += destinations
            self.rejected_by_code.add(result, destinations)
            if key is not None:
                key.rejected_by_code.add(result, destinations)

    def destination_rejected(self, key: _KeyStats, code: str) -> None:
        self.rejected += 1
        self.rejected_by_code.add(code)
        key.rejected_by_code.add(code)

    def to_json(self, *, pending: int, summary: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "uptime_s": round(time.monotonic() - self.started, 3),
            "window_s": self.window_s,
            "requests": {"total": self.requests, "by_result": dict(self.requests_by_result)},
            "destinations": {
                "accepted": self.accepted,
                "rejected": self.rejected,
                "rejected_by_code": dict(self.rejected_by_code),
                "distinct_msisdns": len(self.msisdns),
                "duplicate_msisdns": self.duplicate_msisdns,
                "distinct_correlation_ids": len(self.correlation_ids),
                "duplicate_correlation_ids": self.duplicate_correlation_ids,
            },
            "accepted_per_window": {str(k): v for k, v in self.accepted_per_window.items()},
            "keys": {label: key.to_json() for label, key in self.keys.items()},
            "reports": {
                "scheduled": self.reports_scheduled,
                "sent": self.reports_sent,
                "failed": self.reports_failed,
                "retried": self.reports_retried,
                "pending": pending,
                "posts": self.report_posts,
                "by_code": dict(self.reports_by_code),
            },
            "mo": {"sent": self.mo_sent, "failed": self.mo_failed, "retried": self.mo_retried},
            "faults": dict(self.faults),
        }
        if not summary:
            body["msisdns"] = dict(self.msisdns)
            body["correlation_ids"] = dict(self.correlation_ids)
            body["transids_omitted"] = {c: list(t) for c, t in self.transids_omitted.items()}
        return body
