"""`campaign demo` as a user runs it, piped: one line per stage and a summary on the
terminal streams, every event in the log file it names, no secret anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from campaign.commands.demo import SERVICE_KEY, TOKEN


def run_campaign(
    *args: str, state_dir: Path, dsn: str | None = None, timeout_s: float = 110.0
) -> subprocess.CompletedProcess[str]:
    """`campaign ARGS` with its log directory under `state_dir` and the DSN given (or none:
    the embedded database), whatever the environment of the test run says."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("CAMPAIGN_CONFIG", "CAMPAIGN_DATABASE_DSN")
    }
    env["XDG_STATE_HOME"] = str(state_dir)
    if dsn is not None:
        env["CAMPAIGN_DATABASE_DSN"] = dsn
    return subprocess.run(
        [sys.executable, "-m", "campaign", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )


def _named_log_file(text: str) -> Path:
    (line,) = [line for line in text.splitlines() if line.strip().startswith("log:")]
    return Path(line.split()[1])


def test_demo_piped_prints_a_line_per_stage_and_logs_to_its_file(dsn: str, tmp_path: Path) -> None:
    result = run_campaign(
        "demo", "--recipients", "2000", "--rate", "2000", state_dir=tmp_path, dsn=dsn
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out, err = result.stdout, result.stderr

    # The terminal: a few plain lines, never a JSON log line.
    for line in (out + err).splitlines():
        assert not line.lstrip().startswith("{"), line
    stages = [line.split()[0] for line in err.splitlines() if line and not line[0].isspace()]
    assert stages == ["campaign", "seeding", "sending", "reports"], err
    assert "2,000/2,000" in err
    assert len(err.splitlines()) < 10

    # The summary (what the demo seeds: four malformed numbers, one row without its
    # variables and one customer who replied STOP).
    assert ": completed" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert int(rows["total"][1].replace(",", "")) == 2000
    assert int(rows["invalid"][1]) == 5
    assert int(rows["suppressed"][1]) == 1
    assert int(rows["delivered"][1].replace(",", "")) > 1600
    assert "report lag" in out and "data: postgresql://" in out

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
