import io
import logging

import orjson
import structlog

from campaign import logs


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
