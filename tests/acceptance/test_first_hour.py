"""What a new user meets in the first hour: help, versions, and errors that explain
themselves (exact line and exit code), through the real CLI against a real PostgreSQL."""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import asyncpg
import orjson
import pytest
from structlog.testing import capture_logs

from campaign import __version__, cli, db
from campaign.commands.control import CONTROLS
from campaign.config import ReconcilerSettings
from campaign.reconciler import Reconciler
from tests.helpers.proc import CampaignProcess, Processes
from tests.helpers.seed import add_recipients, create_campaign, numbers
from tests.integration.test_producer_fill import make_producer


def error_line(result: CampaignProcess) -> str:
    (line,) = result.log().splitlines()
    event = orjson.loads(line)
    assert event["event"] == "command_failed" and event["level"] == "error"
    return str(event["error"])


async def test_version(campaign_process: Processes) -> None:
    result = await campaign_process.run("--version")
    assert result.returncode == 0
    assert result.stdout() == f"campaign {__version__}\n"


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
async def test_a_malformed_dsn_is_one_line_exit_2_without_the_password(
    dsn: str, expected: str, campaign_process: Processes
) -> None:
    result = await campaign_process.run("status", dsn=dsn)
    assert result.returncode == 2
    assert error_line(result) == expected
    assert "S3cretPw" not in result.output()


async def test_a_refused_connection_names_host_and_port(campaign_process: Processes) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port once the socket is closed.
    result = await campaign_process.run(
        "migrate", dsn=f"postgresql://app:S3cretPw@127.0.0.1:{port}/prod"
    )
    assert result.returncode == 2
    assert (
        error_line(result)
        == f"cannot connect to PostgreSQL at 127.0.0.1:{port}: connection refused"
    )
    assert "S3cretPw" not in result.output()


async def test_controls_say_which_refusal_and_accept_a_state_already_reached(
    dsn: str, conn: asyncpg.Connection, campaign_process: Processes
) -> None:
    cid = await create_campaign(conn, status="paused")
    again = await campaign_process.run("pause", str(cid), dsn=dsn)
    assert again.returncode == 0, again.log()
    assert orjson.loads(again.log().splitlines()[-1])["event"] == "campaign_status_unchanged"
    assert await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id=$1", cid) == "paused"

    await conn.execute("UPDATE campaign.campaigns SET status = 'completed' WHERE id = $1", cid)
    refused = await campaign_process.run("resume", str(cid), dsn=dsn)
    assert refused.returncode == 1
    assert (
        refused.log()
        == f"campaign {cid} is completed: resume needs a campaign that is draft or paused\n"
    )

    missing = await campaign_process.run("cancel", "999999", dsn=dsn)
    assert missing.returncode == 2
    assert missing.log() == "campaign 999999: not found\n"


def test_control_sources_are_the_sql_conditions() -> None:
    queries = db.load_queries()
    for control in CONTROLS.values():
        (listed,) = re.findall(r"prev\.status IN \(([^)]*)\)", queries[control.query])
        assert set(re.findall(r"'(\w+)'", listed)) == set(control.sources)


async def test_status_of_a_missing_campaign_says_so_once_exit_2(
    dsn: str, campaign_process: Processes
) -> None:
    for args in (("status", "999999"), ("status", "999999", "--watch", "--interval", "0.1")):
        result = await campaign_process.run(*args, dsn=dsn)
        assert result.returncode == 2
        assert result.log() == "campaign 999999: not found\n"
        assert result.stdout() == ""


async def test_status_explains_invalid_and_flags_a_service_nobody_sends(
    dsn: str, conn: asyncpg.Connection, campaign_process: Processes
) -> None:
    cid = await create_campaign(conn, service="nobody", status="running")
    ids = await add_recipients(conn, cid, numbers(10))
    await conn.execute(
        "UPDATE campaign.recipients SET status = 'invalid', error_code = 'invalid_msisdn', "
        "error_message = 'not a number' WHERE id = ANY($1::bigint[])",
        ids[:6],
    )
    result = await campaign_process.run("status", str(cid), dsn=dsn)
    assert result.returncode == 0, result.log()
    out = result.stdout()
    assert "! no live worker sends for service 'nobody'" in out
    assert "! 60% of the recipients are invalid" in out
    assert re.search(
        rf"invalid\s+invalid_msisdn\s+6  not a valid phone number \(phonenumbers\)  "
        rf"\(e\.g\. recipient {ids[0]}\)",
        out,
    ), out
    (report,) = orjson.loads(
        (await campaign_process.run("status", str(cid), "--json", dsn=dsn)).stdout()
    )
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
    dsn: str, conn: asyncpg.Connection, campaign_process: Processes
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
    watched = await campaign_process.run(
        "status", str(cid), "--watch", "--interval", "0.1", dsn=dsn
    )
    assert watched.returncode == 0, watched.log()
    assert re.match(r"--- \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n", watched.stdout())
    assert watched.stdout().count("--- ") == 1
    assert "average rate 1.3/s" in watched.stdout() and "eta" not in watched.stdout()

    await conn.execute("UPDATE campaign.campaigns SET status = 'paused' WHERE id = $1", cid)
    (paused,) = orjson.loads(
        (await campaign_process.run("status", str(cid), "--json", dsn=dsn)).stdout()
    )
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
    dsn: str,
    conn: asyncpg.Connection,
    tmp_path: Path,
    content: bytes,
    expected: str,
    campaign_process: Processes,
) -> None:
    cid = await create_campaign(conn, status="draft")
    path = tmp_path / "r.csv"
    path.write_bytes(content)
    result = await campaign_process.run("import", str(cid), str(path), dsn=dsn)
    assert result.returncode == 2
    assert result.log() == f"campaign import: {path}: {expected}\n"
    assert await conn.fetchval("SELECT count(*) FROM campaign.recipients") == 0


async def test_import_reads_a_semicolon_file(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path, campaign_process: Processes
) -> None:
    cid = await create_campaign(conn, status="draft")
    path = tmp_path / "r.csv"
    path.write_text("msisdn;name\n919812345678;Ann\n919812345679;Bob\n", encoding="utf-8")
    result = await campaign_process.run("import", str(cid), str(path), dsn=dsn)
    assert result.returncode == 0, result.log()
    events = [orjson.loads(x)["event"] for x in result.log().splitlines()]
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


def test_the_wheel_builds_without_warnings_and_ships_sql_and_page(tmp_path: Path) -> None:
    """`make demo` installs the package: a setuptools warning there is the first thing a new
    user reads (issue 21), and a file missing from the wheel breaks an installed worker."""
    root = Path(__file__).resolve().parents[2]
    # A copy: pip builds in the source tree and would leave build/ in the checkout.
    source = tmp_path / "source"
    shutil.copytree(
        root,
        source,
        ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "results"),
    )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    output = built.stdout + built.stderr
    # pip's own notes about this machine's package index are not the build's.
    warnings = [
        line for line in output.splitlines() if "warn" in line.lower() and "Location '" not in line
    ]
    assert warnings == []
    (wheel,) = tmp_path.glob("campaign-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"campaign/sql/{sql.parent.name}/{sql.name}" for sql in (root / "sql").glob("*/*.sql")
    } | {f"campaign/static/{page.name}" for page in (root / "campaign" / "static").iterdir()}
    assert expected - shipped == set()
