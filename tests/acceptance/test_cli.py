"""The CLI as a user runs it: a subprocess against a real database, no config file (the
built-in defaults), the DSN from the environment."""

from pathlib import Path

import asyncpg
import orjson

from tests.helpers.proc import Processes
from tests.helpers.seed import create_campaign


async def test_import_then_status_then_control(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path, campaign_process: Processes
) -> None:
    run = campaign_process.run
    cid = await create_campaign(conn, name="spring sale", body="Hi $(name)", status="draft")
    csv_path = tmp_path / "r.csv"
    csv_path.write_text("msisdn,name\n919812345678,Ann\n919812345679,Bob\n919812345670,Cy\n")

    imported = await run("import", str(cid), str(csv_path), dsn=dsn)
    assert imported.returncode == 0, imported.log()
    finished = imported.events()[-1]
    assert finished["event"] == "import_finished" and finished["rows"] == 3

    await conn.execute(
        "UPDATE campaign.recipients SET status = 'delivered', sent_at = now(), "
        "dr_at = now() + interval '2 seconds' WHERE id = (SELECT min(id) FROM "
        "campaign.recipients WHERE campaign_id = $1)",
        cid,
    )
    # The rate of the last minute is a running campaign's; back to draft afterwards.
    await conn.execute("UPDATE campaign.campaigns SET status = 'running' WHERE id = $1", cid)
    status = await run("status", str(cid), "--json", dsn=dsn)
    assert status.returncode == 0, status.log()
    (report,) = orjson.loads(status.stdout())
    assert report["id"] == cid and report["name"] == "spring sale"
    assert report["total"] == 3
    assert report["counts"]["pending"] == 2 and report["counts"]["delivered"] == 1
    assert report["rate_per_s"] > 0
    assert report["oldest_pending"] is not None
    assert 1.5 < report["report_lag_p50_s"] < 2.5

    await conn.execute("UPDATE campaign.campaigns SET status = 'draft' WHERE id = $1", cid)
    table = await run("status", str(cid), dsn=dsn)
    assert table.returncode == 0
    assert "spring sale" in table.stdout() and "pending" in table.stdout()

    assert (await run("resume", str(cid), dsn=dsn)).returncode == 0
    assert await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id=$1", cid) == "ready"
    assert (await run("pause", str(cid), dsn=dsn)).returncode == 0
    assert await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id=$1", cid) == "paused"
    assert (await run("cancel", str(cid), dsn=dsn)).returncode == 0
    assert (
        await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id=$1", cid) == "cancelled"
    )
    refused = await run("resume", str(cid), dsn=dsn)
    assert refused.returncode == 1
    assert (
        refused.log()
        == f"campaign {cid} is cancelled: resume needs a campaign that is draft or paused\n"
    )


async def test_status_of_unknown_campaign_and_bad_import(
    dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    missing = await campaign_process.run("status", "999999", dsn=dsn)
    assert missing.returncode == 2
    assert missing.log() == "campaign 999999: not found\n"
    bad = tmp_path / "bad.csv"
    bad.write_text("phone\n1\n")
    result = await campaign_process.run("import", "999999", str(bad), dsn=dsn)
    assert result.returncode == 2
    assert "campaign 999999 does not exist" in result.log()


async def test_commands_refuse_an_unmigrated_database(
    empty_dsn: str, campaign_process: Processes
) -> None:
    result = await campaign_process.run("status", dsn=empty_dsn)
    assert result.returncode == 2
    assert "run `campaign migrate`" in result.log()
