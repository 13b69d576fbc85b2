"""The CLI as a user runs it: a subprocess against a real database."""

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import orjson


def run_cli(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"CAMPAIGN_DATABASE_DSN": dsn}
    env.pop("CAMPAIGN_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "campaign", "--log-format", "json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


async def test_import_then_status_then_control(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    cid = await conn.fetchval(
        "INSERT INTO campaign.campaigns (name, service, body) "
        "VALUES ('spring sale', 'default', 'Hi $(name)') RETURNING id"
    )
    csv_path = tmp_path / "r.csv"
    csv_path.write_text("msisdn,name\n919812345678,Ann\n919812345679,Bob\n919812345670,Cy\n")

    imported = run_cli(dsn, "import", str(cid), str(csv_path))
    assert imported.returncode == 0, imported.stderr
    finished = [orjson.loads(x) for x in imported.stderr.splitlines()][-1]
    assert finished["event"] == "import_finished" and finished["rows"] == 3

    await conn.execute(
        "UPDATE campaign.recipients SET status = 'delivered', sent_at = now(), "
        "dr_at = now() + interval '2 seconds' WHERE id = (SELECT min(id) FROM "
        "campaign.recipients WHERE campaign_id = $1)",
        cid,
    )
    # The rate of the last minute is a running campaign's; back to draft afterwards.
    await conn.execute("UPDATE campaign.campaigns SET status = 'running' WHERE id = $1", cid)
    status = run_cli(dsn, "status", str(cid), "--json")
    assert status.returncode == 0, status.stderr
    (report,) = orjson.loads(status.stdout)
    assert report["id"] == cid and report["name"] == "spring sale"
    assert report["total"] == 3
    assert report["counts"]["pending"] == 2 and report["counts"]["delivered"] == 1
    assert report["rate_per_s"] > 0
    assert report["oldest_pending"] is not None
    assert 1.5 < report["report_lag_p50_s"] < 2.5

    await conn.execute("UPDATE campaign.campaigns SET status = 'draft' WHERE id = $1", cid)
    table = run_cli(dsn, "status", str(cid))
    assert table.returncode == 0
    assert "spring sale" in table.stdout and "pending" in table.stdout

    assert run_cli(dsn, "resume", str(cid)).returncode == 0
    assert await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id=$1", cid) == "ready"
    assert run_cli(dsn, "pause", str(cid)).returncode == 0
    assert await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id=$1", cid) == "paused"
    assert run_cli(dsn, "cancel", str(cid)).returncode == 0
    assert (
        await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id=$1", cid) == "cancelled"
    )
    refused = run_cli(dsn, "resume", str(cid))
    assert refused.returncode == 1
    assert (
        refused.stderr
        == f"campaign {cid} is cancelled: resume needs a campaign that is draft or paused\n"
    )


async def test_status_of_unknown_campaign_and_bad_import(dsn: str, tmp_path: Path) -> None:
    missing = run_cli(dsn, "status", "999999")
    assert missing.returncode == 2
    assert "not found" in missing.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("phone\n1\n")
    result = run_cli(dsn, "import", "999999", str(bad))
    assert result.returncode == 2
    assert "campaign 999999 does not exist" in result.stderr


async def test_commands_refuse_an_unmigrated_database(empty_dsn: str) -> None:
    result = run_cli(empty_dsn, "status")
    assert result.returncode == 2
    assert "run `campaign migrate`" in result.stderr
