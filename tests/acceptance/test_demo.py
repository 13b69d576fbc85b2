"""`campaign demo` as a user runs it, piped: one line per stage and a summary on the
terminal streams, every event in the log file it names, no secret anywhere; earlier demo
campaigns deleted at the start; `--reset` deleting only the embedded database."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import asyncpg
import orjson

from campaign import db
from campaign.commands.demo import SERVICE, SERVICE_KEY, TOKEN
from tests.helpers.proc import Processes


def state(tmp_path: Path) -> dict[str, str]:
    """The demo's log directory under the test's own directory."""
    return {"XDG_STATE_HOME": str(tmp_path)}


def _named_log_file(text: str) -> Path:
    (line,) = [line for line in text.splitlines() if line.strip().startswith("log:")]
    return Path(line.split()[1])


async def test_demo_piped_prints_a_line_per_stage_and_logs_to_its_file(
    dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    result = await campaign_process.run(
        "demo", "--recipients", "2000", "--rate", "2000", dsn=dsn, env=state(tmp_path)
    )
    assert result.returncode == 0, result.log()[-3000:]
    out, err = result.stdout(), result.log()

    # The terminal: a few plain lines, never a JSON log line.
    for line in (out + err).splitlines():
        assert not line.lstrip().startswith("{"), line
    stages = [line.split()[0] for line in err.splitlines() if line and not line[0].isspace()]
    assert stages == ["campaign", "seeding", "sending", "reports"], err
    assert "2,000/2,000" in err
    assert len(err.splitlines()) < 10

    # The summary (what the demo seeds: four malformed numbers, one row without its
    # variables, three customers listed twice and one customer who replied STOP).
    assert ": completed" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert int(rows["total"][1].replace(",", "")) == 2000
    assert int(rows["invalid"][1]) == 5
    assert int(rows["suppressed"][1]) == 1
    assert int(rows["duplicate"][1]) == 3
    assert int(rows["delivered"][1].replace(",", "")) > 1600
    assert "report lag" in out and "data: postgresql://" in out
    # Guard rails while sending: a window open now for the (Indian) recipients, a canary
    # judged good (the demo's outcomes fail about 6 %), a brake that did not fire.
    guards = next(line for line in out.splitlines() if "guard rails" in line)
    assert "recipients' local time (0 waiting)" in guards
    assert "canary 100 (judged, sending went on)" in guards
    assert "brake at 25% failed (not fired)" in guards

    # The page the summary offers: the campaign's dashboard as one file.
    page = next(line.split() for line in out.splitlines() if line.strip().startswith("page:"))
    assert page[1:3] == ["campaign", "report"] and page[4:6] == ["--html", "report.html"]
    html = tmp_path / "report.html"
    report = await campaign_process.run("report", page[3], "--html", str(html), dsn=dsn)
    assert report.returncode == 0, report.output()
    assert '<script id="campaign-data"' in html.read_text(encoding="utf-8")

    # The log file: named at the start and in the summary, under the user's log directory.
    log_file = _named_log_file(out)
    assert _named_log_file(err) == log_file
    assert log_file.is_relative_to(tmp_path) and log_file.is_file()
    events = [orjson.loads(line) for line in log_file.read_text().splitlines()]
    names = {e["event"] for e in events}
    assert {"worker_started", "batch_sent", "mo_received", "campaign_completed"} <= names
    finished = [e["stage"] for e in events if e["event"] == "demo_stage_finished"]
    assert finished == ["seeding", "sending", "reports"]

    for text in (out, err, log_file.read_text()):
        assert SERVICE_KEY not in text and TOKEN not in text


async def test_demo_deletes_earlier_demo_campaigns_and_nothing_else(
    dsn: str, conn: asyncpg.Connection, tmp_path: Path, campaign_process: Processes
) -> None:
    queries = db.load_queries()
    # An interrupted earlier run: its campaign, recipients and a matched report are left.
    earlier = await conn.fetchval(queries["demo_create_campaign"], SERVICE, "Hi $(name)", 10)
    await conn.execute(queries["demo_seed_recipients"], earlier, 50)
    await conn.execute(
        "INSERT INTO campaign.delivery_reports (transid, code, state, recipient_id, raw) "
        "SELECT 't1', '7500', 'matched', min(id), '{}' FROM campaign.recipients "
        "WHERE campaign_id = $1",
        earlier,
    )
    # An application's campaign in the same database stays, as do its recipients.
    mine = await conn.fetchval(
        "INSERT INTO campaign.campaigns (name, service, body) "
        "VALUES ('demo of mine', 'demo', 'Hi') RETURNING id"
    )
    await conn.execute(
        "INSERT INTO campaign.recipients (campaign_id, msisdn) VALUES ($1, '+919812345678')", mine
    )

    result = await campaign_process.run(
        "demo", "--recipients", "100", "--rate", "2000", dsn=dsn, env=state(tmp_path)
    )
    assert result.returncode == 0, result.log()[-3000:]
    assert "deleted 1 earlier demo campaign" in result.log()

    campaigns = {r["id"] for r in await conn.fetch("SELECT id FROM campaign.campaigns")}
    assert earlier not in campaigns and mine in campaigns and len(campaigns) == 2
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM campaign.recipients WHERE campaign_id = $1", earlier
        )
        == 0
    )
    assert (
        await conn.fetchval("SELECT count(*) FROM campaign.recipients WHERE campaign_id = $1", mine)
        == 1
    )
    assert (
        await conn.fetchval("SELECT count(*) FROM campaign.delivery_reports WHERE transid = 't1'")
        == 0
    )


def _config(tmp_path: Path, data_dir: Path) -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\ndata_dir = "{data_dir}"\n')
    return cfg


async def test_reset_deletes_the_embedded_database(
    tmp_path: Path, campaign_process: Processes
) -> None:
    # Not under tmp_path: when run as root, pgserver's server runs as another user that must
    # reach the directory, and pytest makes its own base directory private at each start.
    parent = Path(tempfile.mkdtemp(prefix="campaign-test-reset-"))
    try:
        await _reset_deletes(tmp_path, parent / "pgdata", campaign_process)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


async def _reset_deletes(tmp_path: Path, data_dir: Path, processes: Processes) -> None:
    cfg = _config(tmp_path, data_dir)
    # A real embedded database: `migrate` starts the server in data_dir and stops it.
    migrated = await processes.run("migrate", config=cfg, env=state(tmp_path))
    assert migrated.returncode == 0, migrated.log()
    assert (data_dir / "PG_VERSION").is_file()

    reset = await processes.run("demo", "--reset", config=cfg, env=state(tmp_path))
    assert reset.returncode == 0, reset.log()
    assert not data_dir.exists()
    assert str(data_dir) in reset.stdout() and "deleted" in reset.stdout()

    again = await processes.run("demo", "--reset", config=cfg, env=state(tmp_path))
    assert again.returncode == 0 and "nothing to delete" in again.stdout()


async def test_reset_refuses_with_a_dsn_or_anything_but_an_idle_data_directory(
    tmp_path: Path, pg_server_dsn: str, campaign_process: Processes
) -> None:
    run = campaign_process.run
    data_dir = tmp_path / "pgdata"
    data_dir.mkdir()
    (data_dir / "keep").write_text("not PostgreSQL's")
    cfg = _config(tmp_path, data_dir)

    with_dsn = await run("demo", "--reset", config=cfg, dsn=pg_server_dsn, env=state(tmp_path))
    assert with_dsn.returncode == 2
    (line,) = with_dsn.log().splitlines()
    assert "DSN is configured" in line and "nothing was deleted" in line

    not_postgres = await run("demo", "--reset", config=cfg, env=state(tmp_path))
    assert not_postgres.returncode == 2
    assert "not a PostgreSQL data directory" in not_postgres.log()

    # A server running in it (this test's own pid stands in for the postmaster).
    (data_dir / "PG_VERSION").write_text("15\n")
    (data_dir / "postmaster.pid").write_text(f"{os.getpid()}\n{data_dir}\n")
    running = await run("demo", "--reset", config=cfg, env=state(tmp_path))
    assert running.returncode == 1
    assert f"pid {os.getpid()}" in running.log()

    assert (data_dir / "keep").exists()
