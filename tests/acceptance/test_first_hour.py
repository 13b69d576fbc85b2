"""What a new user meets in the first hour: help, versions, and errors that explain
themselves (exact line and exit code), through the real CLI against a real PostgreSQL."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import orjson
import pytest
from structlog.testing import capture_logs

from campaign import __version__, cli, db
from campaign.commands.control import CONTROLS
from campaign.config import ReconcilerSettings
from campaign.reconciler import Reconciler
from tests.acceptance.test_cli import run_cli
from tests.helpers.sending import add_recipients, create_campaign, numbers
from tests.integration.test_producer_fill import make_producer


def run_raw(
    *args: str, dsn: str | None = None, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAMPAIGN_")}
    if dsn is not None:
        env["CAMPAIGN_DATABASE_DSN"] = dsn
    return subprocess.run(
        [sys.executable, "-m", "campaign", "--log-format", "json", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    (line,) = result.stderr.splitlines()
    event = orjson.loads(line)
    assert event["event"] == "command_failed" and event["level"] == "error"
    return str(event["error"])


def test_version() -> None:
    result = run_raw("--version")
    assert result.returncode == 0
    assert result.stdout == f"campaign {__version__}\n"


def test_every_command_and_option_says_what_it_is_for() -> None:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) >= {"migrate", "worker", "webhooks", "simulate", "demo", "prune"}
    for name, command in sub.choices.items():
        assert command.description, f"{name} has no description"
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"
    simulate = sub.choices["simulate"].format_help()
    assert "--sim-config" in simulate and "(default: 127.0.0.1:9090)" in simulate


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (
            "postgresql://app:S3cretPw@127.0.0.1:notaport/prod",
            "database DSN 'postgresql://app:***@127.0.0.1:notaport/prod': the port is not a number",
        ),
        (
            "mysql://app:S3cretPw@db/prod",
            "database DSN 'mysql://app:***@db/prod': expected postgresql://USER@HOST:PORT/DATABASE",
        ),
    ],
)
def test_a_malformed_dsn_is_one_line_exit_2_without_the_password(dsn: str, expected: str) -> None:
    result = run_raw("status", dsn=dsn)
    assert result.returncode == 2
    assert error_line(result) == expected
    assert "S3cretPw" not in result.stderr + result.stdout


def test_a_refused_connection_names_host_and_port() -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port once the socket is closed.
    result = run_raw("migrate", dsn=f"postgresql://app:S3cretPw@127.0.0.1:{port}/prod")
    assert result.returncode == 2
    assert (
        error_line(result)
        == f"cannot connect to PostgreSQL at 127.0.0.1:{port}: connection refused"
    )
    assert "S3cretPw" not in result.stderr


async def test_controls_say_which_refusal_and_accept_a_state_already_reached(
    dsn: str, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn, status="paused")
    again = run_cli(dsn, "pause", str(cid))
    assert again.returncode == 0, again.stderr
    assert orjson.loads(again.stderr.splitlines()[-1])["event"] == "campaign_status_unchanged"
    assert await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id=$1", cid) == "paused"

    await conn.execute("UPDATE campaign.campaigns SET status = 'completed' WHERE id = $1", cid)
    refused = run_cli(dsn, "resume", str(cid))
    assert refused.returncode == 1
    assert (
        refused.stderr
        == f"campaign {cid} is completed: resume needs a campaign that is draft or paused\n"
    )

    missing = run_cli(dsn, "cancel", "999999")
    assert missing.returncode == 2
    assert missing.stderr == "campaign 999999: not found\n"


def test_control_sources_are_the_sql_conditions() -> None:
    queries = db.load_queries()
    for control in CONTROLS.values():
        (listed,) = re.findall(r"prev\.status IN \(([^)]*)\)", queries[control.query])
        assert set(re.findall(r"'(\w+)'", listed)) == set(control.sources)


async def test_status_of_a_missing_campaign_says_so_once_exit_2(dsn: str) -> None:
    for args in (("status", "999999"), ("status", "999999", "--watch", "--interval", "0.1")):
        result = run_cli(dsn, *args)
        assert result.returncode == 2
        assert result.stderr == "campaign 999999: not found\n"
        assert result.stdout == ""


async def test_status_explains_invalid_and_flags_a_service_nobody_sends(
    dsn: str, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn, service="nobody", status="running")
    ids = await add_recipients(conn, cid, numbers(10))
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'invalid', error_code = 'invalid_msisdn', "
        "error_message = 'not a number' WHERE id = ANY($1::bigint[])",
        ids[:6],
    )
    result = run_cli(dsn, "status", str(cid))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "! no live worker sends for service 'nobody'" in out
    assert "! 60% of the recipients are invalid" in out
    assert re.search(
        rf"invalid\s+invalid_msisdn\s+6  not a valid phone number \(phonenumbers\)  "
        rf"\(e\.g\. recipient {ids[0]}\)",
        out,
    ), out
    (report,) = orjson.loads(run_cli(dsn, "status", str(cid), "--json").stdout)
    assert report["reasons"] == [
        {
            "status": "invalid",
            "code": "invalid_msisdn",
            "meaning": "not a valid phone number (phonenumbers)",
            "recipients": 6,
            "example_id": ids[0],
        }
    ]
    assert len(report["warnings"]) == 2


async def test_status_rate_and_eta_follow_the_campaign_and_watch_ends_when_final(
    dsn: str, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn, status="running")
    ids = await add_recipients(conn, cid, numbers(4))
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'delivered', "
        "sent_at = now() - (id - $2) * interval '1 second' WHERE campaign_id = $1",
        cid,
        ids[0],
    )
    await conn.execute("UPDATE campaign.campaigns SET status = 'completed' WHERE id = $1", cid)
    # Piped, --watch prints one timestamped frame and ends: the campaign is final.
    watched = run_cli(dsn, "status", str(cid), "--watch", "--interval", "0.1")
    assert watched.returncode == 0, watched.stderr
    assert re.match(r"--- \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n", watched.stdout)
    assert watched.stdout.count("--- ") == 1
    assert "average rate 1.3/s" in watched.stdout and "eta" not in watched.stdout

    await conn.execute("UPDATE campaign.campaigns SET status = 'paused' WHERE id = $1", cid)
    (paused,) = orjson.loads(run_cli(dsn, "status", str(cid), "--json").stdout)
    assert paused["rate_per_s"] is None and paused["eta_s"] is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b'msisdn,name\n919812345678,"Ann\n919812345679,Bob\n',
            "line 3: unexpected end of data (a quote opened and never closed?)",
        ),
        (
            b"phone|name\n919812345678|Ann\n",
            "line 1: no 'msisdn' column in the header 'phone|name' "
            "(columns separated by , ; tab or |, one named msisdn)",
        ),
        (
            b"msisdn,name\n919812345678,Ann\n919812345679,Bj\xf6rn\n",
            "line 3: not UTF-8 text (byte 0xf6 at column 16); save the file as UTF-8",
        ),
    ],
)
async def test_import_errors_name_the_line(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path, content: bytes, expected: str
) -> None:
    cid = await create_campaign(conn, status="draft")
    path = tmp_path / "r.csv"
    path.write_bytes(content)
    result = run_cli(dsn, "import", str(cid), str(path))
    assert result.returncode == 2
    assert result.stderr == f"campaign import: {path}: {expected}\n"
    assert await conn.fetchval("SELECT count(*) FROM campaign.recipients") == 0


async def test_import_reads_a_semicolon_file(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    cid = await create_campaign(conn, status="draft")
    path = tmp_path / "r.csv"
    path.write_text("msisdn;name\n919812345678;Ann\n919812345679;Bob\n", encoding="utf-8")
    result = run_cli(dsn, "import", str(cid), str(path))
    assert result.returncode == 0, result.stderr
    events = [orjson.loads(x)["event"] for x in result.stderr.splitlines()]
    assert events[-2:] == ["import_committing", "import_finished"]
    rows = await conn.fetch("SELECT msisdn, variables FROM campaign.recipients ORDER BY id")
    assert [(r["msisdn"], r["variables"]) for r in rows] == [
        ("919812345678", {"name": "Ann"}),
        ("919812345679", {"name": "Bob"}),
    ]


async def test_a_mostly_invalid_batch_and_campaign_are_warnings(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    cid = await create_campaign(conn)
    await add_recipients(conn, cid, ["+44 7700 900001", "+44 7700 900002", "12", *numbers(1)])
    producer, _ = make_producer(pool, queue_size=4)
    with capture_logs() as logs:
        await producer.fill()
    (warning,) = [e for e in logs if e["event"] == "batch_mostly_invalid"]
    assert warning["log_level"] == "warning"
    assert warning["invalid"] == 3 and warning["error_code"] == "invalid_msisdn"

    # The valid one was delivered; the campaign completes with most never sent.
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'delivered' WHERE status = 'sending'"
    )
    reconciler = Reconciler(pool=pool, settings=ReconcilerSettings(), queries=db.load_queries())
    with capture_logs() as logs:
        await reconciler.run_once()
    (completed,) = [e for e in logs if e["event"] == "campaign_completed"]
    assert completed["log_level"] == "warning" and completed["invalid"] == 3
