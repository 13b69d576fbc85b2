"""Reading PostgreSQL's `EXPLAIN (ANALYZE, FORMAT JSON)` output in tests that check a
plan's shape or the rows it touched, never its time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


def plan_nodes(explained: str) -> Iterator[dict[str, Any]]:
    """Every node of one statement's plan (CTEs, init plans and subplans included), from
    the JSON text EXPLAIN returns."""
    stack = [json.loads(explained)[0]["Plan"]]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.get("Plans", []))
