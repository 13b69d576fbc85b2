from pathlib import Path

from tests.helpers.proc import Processes, write_config


async def test_migrate_starts_an_embedded_server_when_no_dsn_is_given(
    tmp_path: Path, campaign_process: Processes
) -> None:
    data_dir = tmp_path / "pgdata"
    cfg = write_config(tmp_path / "c.toml", database={"data_dir": str(data_dir)})
    # No dsn: neither the file nor the environment names a database.
    runs = [await campaign_process.run("migrate", config=cfg) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.log()
    events = [r.events() for r in runs]
    started = [e for e in events[0] if e["event"] == "embedded_database_started"]
    assert started and started[0]["data_dir"] == str(data_dir)
    assert (data_dir / "PG_VERSION").exists()
    finished = [next(e for e in ev if e["event"] == "migrate_finished") for ev in events]
    assert finished[0]["applied"] >= 1
    assert finished[1]["applied"] == 0
    assert finished[0]["schema_version"] == finished[1]["schema_version"]
