"""The benchmark harness itself works: tiny stages in-process against the test database.

No assertion on speed (that is the bench's job); only that a stage does its work and
returns a complete record that the table can print.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bench import harness
from bench.__main__ import table
from bench.harness import Context, Sizes
from bench.stages import derived_ceiling, e2e, ingest, reconcile, submit


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


async def test_e2e_stage_alone_measures_the_ceilings_it_derives_from(
    dsn: str, tmp_path: Path
) -> None:
    # Run on its own (no submit, ingest or reconcile stage before it), end to end used to
    # print "ceiling 0/s, ratio 0.00".
    ctx = tiny_context(dsn, tmp_path)
    ctx = dataclasses.replace(ctx, sizes=dataclasses.replace(ctx.sizes, rounds=1, e2e=300))
    result = await e2e(ctx)
    check_record(result, stage="e2e", n=300)
    derived_from = ["submit", "ingest", "reconcile"]
    assert result.details["ceilings_measured_here"] == derived_from
    assert all(ctx.ceilings[name] > 0 for name in derived_from)
    # Only what one report per POST derives from: not the batched receiver's ceiling.
    assert "ingest100" not in ctx.ceilings
    # The platform's shape: one delivery report per callback POST, every one delivered.
    assert result.details["reports_per_post"] == 1
    assert "ceilings measured here: submit, ingest, reconcile" in result.notes


async def test_derived_ceiling_takes_the_runs_ceilings_in_series(dsn: str, tmp_path: Path) -> None:
    ctx = tiny_context(dsn, tmp_path)
    ctx.ceilings.update(submit=40_000.0, ingest=10_000.0, reconcile=40_000.0)
    ceiling, measured = await derived_ceiling(ctx)
    assert measured == []
    assert ceiling == pytest.approx(1 / (1 / 40_000 + 1 / 10_000 + 1 / 40_000))
    # 100 reports per POST: the durable receiver's ceiling at that shape.
    ctx.ceilings["ingest100"] = 80_000.0
    ceiling, measured = await derived_ceiling(ctx, per_post=100)
    assert measured == []
    assert ceiling == pytest.approx(1 / (1 / 40_000 + 1 / 80_000 + 1 / 40_000))


async def test_ingest_stage_reports_the_durable_and_the_bare_ceiling(
    dsn: str, tmp_path: Path
) -> None:
    ctx = tiny_context(dsn, tmp_path)
    ctx = dataclasses.replace(ctx, sizes=dataclasses.replace(ctx.sizes, rounds=1))
    # The stage raises unless the product and the durable handler each stored every report.
    result = await ingest(ctx)
    check_record(result, stage="ingest", n=500)
    assert ctx.ceilings["ingest"] == result.ceiling
    assert ctx.ceilings["ingest_bare"] == result.details["bare_ceiling"] > 0
    assert result.details["durable_runs"][0]["statuses"] == {"200": 500}
    assert "bare handler (stores nothing)" in result.notes
    # The batched shape against the durable receiver at 100 per POST, every report stored.
    assert ctx.ceilings["ingest100"] > 0
    assert result.details["batched_durable"]["statuses"] == {"200": 5}
