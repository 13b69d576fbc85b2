"""The benchmark harness itself works: tiny stages in-process against the test database.

No assertion on speed (that is the bench's job); only that a stage does its work and
returns a complete record that the table can print.
"""

from __future__ import annotations

from pathlib import Path

from bench import harness
from bench.__main__ import table
from bench.harness import Context, Sizes
from bench.stages import reconcile, submit


def tiny_context(dsn: str, tmp_path: Path) -> Context:
    sizes = Sizes(
        submit=3_000, ingest=500, reconcile=6_000, e2e=500, memory=1_000, latency_trials=1
    )
    return Context(dsn=dsn, sizes=sizes, work_dir=tmp_path)


def check_record(result: harness.Result, *, stage: str, n: int) -> None:
    record = result.to_json()
    assert record["stage"] == stage
    assert record["n"] == n
    assert record["figure"] > 0
    assert record["ceiling"] > 0
    assert record["ratio"] == round(result.figure / result.ceiling, 3)
    assert record["target"]
    assert isinstance(record["met"], bool)


async def test_reconcile_stage_matches_every_report(dsn: str, tmp_path: Path) -> None:
    ctx = tiny_context(dsn, tmp_path)
    # The stage itself raises unless every report was matched and every recipient delivered;
    # 6,000 reports take two passes of the default batch size.
    result = await reconcile(ctx)
    check_record(result, stage="reconcile", n=6_000)
    assert ctx.ceilings["reconcile"] == result.ceiling


async def test_submit_stage_sends_through_the_simulator_process(dsn: str, tmp_path: Path) -> None:
    ctx = tiny_context(dsn, tmp_path)
    result = await submit(ctx)
    check_record(result, stage="submit", n=3_000)
    # The simulator ran in its own process and logged there.
    assert (tmp_path / "simulator-submit.log").exists()
    machine = await harness.machine(dsn)
    printed = table([result], machine, quick=True)
    assert "| submit" in printed
    assert f"PostgreSQL {machine['postgresql']}" in printed
