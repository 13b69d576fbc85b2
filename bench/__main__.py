"""`python -m bench [--quick] [--stages a,b] [--out DIR]` (or `make bench`).

Runs each stage against a fresh database, measures its ceiling in the same run, prints
a table and writes DIR/<timestamp>.json. Exits 0 whether or not targets are met: CI runs
the quick bench as a smoke test and asserts nothing on times.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench import harness
from bench.guards import STAGES
from bench.harness import Context, Result, Sizes
from bench.stages import INFORMATIONAL
from campaign import logs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (< 2 minutes)")
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated subset of {','.join(STAGES)} (default: all)",
    )
    parser.add_argument("--out", default="bench/results", help="folder for the JSON result")
    for name in ("submit", "ingest", "reconcile", "e2e", "memory", "check"):
        parser.add_argument(f"--{name}-n", type=int, help=f"override the {name} stage's size")
    parser.add_argument("--latency-trials", type=int, help="override the number of trials")
    parser.add_argument("--idle-s", type=float, help="override the idle stage's window")
    args = parser.parse_args(argv)
    unknown = [s for s in args.stages.split(",") if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages: {', '.join(unknown)}")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = Sizes.quick() if args.quick else Sizes()
    overrides = {
        name: getattr(args, f"{name}_n")
        for name in ("submit", "ingest", "reconcile", "e2e", "memory", "check")
        if getattr(args, f"{name}_n")
    }
    if args.latency_trials:
        overrides["latency_trials"] = args.latency_trials
    if args.idle_s:
        overrides["idle_s"] = args.idle_s
    return dataclasses.replace(sizes, **overrides)


def _number(value: float, unit: str) -> str:
    if unit.startswith("s after"):
        return f"{value:,.1f} s"
    if unit.startswith("s "):
        return f"{value * 1000:,.0f} ms"
    if unit.startswith("%"):
        return f"{value:.2f} %"
    if unit.startswith("commits"):
        return f"{value:.2f}/s"
    if unit.startswith("MB"):
        return f"{value:,.1f} MB"
    return f"{value:,.0f}/s"


def table(results: list[Result], machine: dict[str, Any], *, quick: bool) -> str:
    rows = [("stage", "n", "figure", "ceiling", "ratio", "target", "met", "notes")]
    for r in results:
        rows.append(
            (
                r.stage,
                f"{r.n:,}",
                _number(r.figure, r.unit),
                _number(r.ceiling, r.unit),
                f"{r.ratio:.2f}",
                r.target,
                "-" if r.target == INFORMATIONAL else "yes" if r.met else "NO",
                r.notes,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |"
        for row in rows
    ]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    head = (
        f"campaign bench ({'quick' if quick else 'full'}) on {machine['cores']} cores "
        f"({machine['cpu'] or 'unknown CPU'}), Python {machine['python']}, "
        f"PostgreSQL {machine['postgresql']}"
    )
    return head + "\n" + "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    sizes = sizes_from(args)
    names = args.stages.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="campaign-bench-"))
    with (work_dir / "bench.log").open("w") as log_file:
        # The product's own log lines (one per batch) go to a file, as a service's would.
        logs.configure(fmt="json", level="info", stream=log_file)
        results: list[Result] = []
        failures: dict[str, str] = {}
        started = time.monotonic()
        async with harness.server_dsn() as server, harness.fresh_database(server) as dsn:
            machine = await harness.machine(dsn)
            ctx = Context(dsn=dsn, sizes=sizes, work_dir=work_dir)
            for name in names:
                print(f"bench: {name} ...", file=sys.stderr, flush=True)
                try:
                    outcome = await STAGES[name](ctx)
                except Exception as exc:
                    failures[name] = f"{type(exc).__name__}: {exc}"
                    print(f"bench: {name} failed: {failures[name]}", file=sys.stderr, flush=True)
                    continue
                for result in outcome if isinstance(outcome, list) else [outcome]:
                    results.append(result)
                    print(
                        f"bench: {result.stage} {_number(result.figure, result.unit)} "
                        f"(ceiling {_number(result.ceiling, result.unit)})",
                        file=sys.stderr,
                        flush=True,
                    )
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    record = {
        "timestamp": stamp,
        "quick": args.quick,
        "machine": machine,
        "sizes": dataclasses.asdict(sizes),
        "duration_s": round(time.monotonic() - started, 1),
        "results": [r.to_json() for r in results],
        "failures": failures,
        "logs": str(work_dir),
    }
    path = out / f"{stamp}.json"
    path.write_bytes(orjson.dumps(record, option=orjson.OPT_INDENT_2))
    print(table(results, machine, quick=args.quick))
    for name, error in failures.items():
        print(f"FAILED {name}: {error}")
    print(f"results: {path}; logs: {work_dir}; {record['duration_s']} s")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
