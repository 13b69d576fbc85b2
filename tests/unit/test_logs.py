import io
import logging

import orjson
import pytest
import structlog

from campaign import config, logs


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_with_event_level_and_keys() -> None:
    out = io.StringIO()
    logs.configure(fmt="json", level="info", stream=out)
    structlog.get_logger("t").info("batch_sent", campaign_id=7, batch_id=9)
    structlog.get_logger("t").debug("not_shown")
    (line,) = _lines(out)
    assert line["event"] == "batch_sent"
    assert line["campaign_id"] == 7 and line["batch_id"] == 9
    assert line["level"] == "info"
    assert "timestamp" in line


def test_stdlib_loggers_go_through_the_same_renderer() -> None:
    out = io.StringIO()
    logs.configure(fmt="json", level="info", stream=out)
    logging.getLogger("asyncpg.pool").warning("connection lost")
    (line,) = _lines(out)
    assert line["event"] == "connection lost"
    assert line["level"] == "warning"


def test_secrets_are_redacted_everywhere() -> None:
    out = io.StringIO()
    secret = "sk_live_0123456789"
    logs.configure(fmt="json", level="info", secrets=[secret, "x"], stream=out)
    structlog.get_logger("t").info(
        "oops", url=f"http://h/webhooks/dr/{secret}", nested={"k": [secret]}
    )
    logging.getLogger("aiohttp.client").error("failed for key %s", secret)
    text = out.getvalue()
    assert secret not in text
    assert text.count(logs.REDACTED) == 3


def test_console_format_is_not_json() -> None:
    out = io.StringIO()
    logs.configure(fmt="console", level="info", stream=out)
    structlog.get_logger("t").info("worker_stopping", reason="signal")
    text = out.getvalue()
    assert "worker_stopping" in text and "reason" in text
    assert not text.lstrip().startswith("{")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_writes_a_burst_per_interval_then_says_how_many_it_dropped() -> None:
    clock = _Clock()
    throttle = logs.LogThrottle(burst=3, interval_s=60.0, clock=clock)
    answers = [throttle.allow("webhook_not_found") for _ in range(10)]
    # Three lines, each dropping nothing before it, then silence.
    assert answers == [0, 0, 0, None, None, None, None, None, None, None]
    # Another event has its own budget.
    assert throttle.allow("webhook_unauthorized") == 0
    clock.now += 60.0
    # The next window's first line carries the seven dropped in the last one.
    assert throttle.allow("webhook_not_found") == 7
    assert throttle.allow("webhook_not_found") == 0


def test_dsn_passwords_are_redacted_in_every_form_they_take(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    monkeypatch.setenv(config.ENV_DSN, "postgresql://app:p@ss%21Word@db/x?password=Qu3ry%2BPw")
    logs.configure(fmt="json", level="info", secrets=config.Settings().secrets(), stream=out)
    structlog.get_logger("t").error(
        "command_failed", error="auth failed for p@ss!Word, tried p@ss%21Word and Qu3ry+Pw"
    )
    text = out.getvalue()
    for leaked in ("p@ss", "Word", "Qu3ry"):
        assert leaked not in text
