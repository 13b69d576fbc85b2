import os
import subprocess
import sys
from pathlib import Path

import orjson


def test_migrate_starts_an_embedded_server_when_no_dsn_is_given(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\ndata_dir = "{data_dir}"\n[logging]\nformat = "json"\n')
    env = {k: v for k, v in os.environ.items() if k != "CAMPAIGN_DATABASE_DSN"}
    runs = [
        subprocess.run(
            [sys.executable, "-m", "campaign", "--config", str(cfg), "migrate"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    events = [[orjson.loads(line) for line in r.stderr.splitlines()] for r in runs]
    started = [e for e in events[0] if e["event"] == "embedded_database_started"]
    assert started and started[0]["data_dir"] == str(data_dir)
    assert (data_dir / "PG_VERSION").exists()
    finished = [next(e for e in ev if e["event"] == "migrate_finished") for ev in events]
    assert finished[0]["applied"] >= 1
    assert finished[1]["applied"] == 0
    assert finished[0]["schema_version"] == finished[1]["schema_version"]
