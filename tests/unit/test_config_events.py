"""[events], [policy], [optout] reply_window_h and [retention] events_days: defaults and
one clear line for each mistake."""

from __future__ import annotations

from typing import Any

import pytest

from campaign import config


def test_defaults() -> None:
    s = config.Settings()
    assert s.events.enabled and s.events.kinds == config.EVENT_KINDS
    assert s.events.forward_url == "" and s.events.forward_batch == 500
    assert s.policy.suppress_codes == ("7102", "7203") and s.policy.suppress_days == 90
    assert s.policy.retry_codes == ("7006", "7206", "7207") and s.policy.retry_after_s == 1800
    assert s.optout.reply_window_h == 72
    assert s.retention.events_days == 7


def test_a_forwarder_needs_a_secret_and_the_secret_is_redacted() -> None:
    s = config.parse(
        {"events": {"forward_url": "https://app.example/events", "forward_secret": "s3cr3t-x"}}
    )
    assert "s3cr3t-x" in s.secrets()
    with pytest.raises(config.ConfigError, match=r"\[events\] forward_secret: missing"):
        config.parse({"events": {"forward_url": "https://app.example/events"}})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"events": {"kinds": ["reply", "sms"]}}, r"\[events\] kinds: 'sms' is not one of"),
        ({"events": {"forward_url": "ftp://x", "forward_secret": "s"}}, "http:// or https://"),
        (
            {"events": {"forward_timeout_s": 20.0, "forward_lease_s": 10.0}},
            "forward_lease_s: must be longer than forward_timeout_s",
        ),
        ({"events": {"forward_batch": 0}}, r"\[events\] forward_batch: must be greater than 0"),
        ({"events": {"enabled": "yes"}}, "expected true or false"),
        ({"policy": {"suppress_codes": ["72O3"]}}, "'72O3' is not a 4-digit code"),
        ({"policy": {"retry_codes": ["7203"]}}, "7203 is also in suppress_codes"),
        ({"policy": {"suppress_days": -1}}, "must not be negative"),
        ({"policy": {"retry_after_s": 0}}, "retry_after_s: must be greater than 0"),
        ({"optout": {"reply_window_h": 0}}, "reply_window_h: must be greater than 0"),
        ({"retention": {"events_days": -2}}, "events_days: must not be negative"),
    ],
)
def test_mistakes_name_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.parse(raw)
