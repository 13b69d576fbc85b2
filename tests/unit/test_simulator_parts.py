"""Pure parts of the simulator: request validation, timestamps, SMS parts, token bucket."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign.simulator import FaultSpec
from campaign.simulator.parts import sms_parts
from campaign.simulator.ratelimit import TokenBucket
from campaign.simulator.reports import _Report, render_report
from campaign.simulator.timestamps import format_timestamp, parse_expiry
from campaign.simulator.validation import (
    RequestError,
    _Context,
    count_destinations,
    parse_messages,
)

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def parse(data: Any, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "templates": frozenset({"1"}),
        "max_destinations": 1000,
        "require_plus": False,
        "default_notify_url": "",
        "now": NOW,
    }
    options.update(overrides)
    return parse_messages(data, **options)


def message(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "deliverychannel": "SMS",
        "channels": {"sms": {"text": "hi"}},
        "destination": [{"msisdn": ["447700900001", 447700900002]}],
    }
    body.update(fields)
    return body


def test_parse_messages_plans_every_destination() -> None:
    long_text = {"sms": {"text": "a" * 200}}
    plans, total, valid = parse(
        [
            message(notifyurl="http://127.0.0.1:1/dr", callbackData="cb", channels=long_text),
            message(),
        ],
        default_notify_url="http://127.0.0.1:2/default",
        count_parts=True,
    )
    assert (total, valid) == (4, 4)
    assert plans[0].context == _Context("http://127.0.0.1:1/dr", "cb", 2)
    assert plans[1].context.url == "http://127.0.0.1:2/default"
    # Integer msisdns are taken as their digits; no correlation id anywhere means None.
    assert plans[0].destinations == [
        ("447700900001", None, True),
        ("447700900002", None, True),
    ]


def test_parse_messages_flags_bad_numbers_without_rejecting_the_request() -> None:
    body = message(destination=[{"msisdn": ["+447700900001", "0123", "1" * 16, "44"]}])
    plans, total, valid = parse(body)
    assert (total, valid) == (4, 1)
    assert [ok for _, _, ok in plans[0].destinations] == [True, False, False, False]
    _, _, valid_with_plus = parse(message(), require_plus=True)
    assert valid_with_plus == 0


def test_the_destination_limit_is_configurable() -> None:
    with pytest.raises(RequestError) as info:
        parse(message(), max_destinations=1)
    assert info.value.code == "7009"


def test_expiry_is_compared_with_now() -> None:
    just_after = (NOW + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    just_before = (NOW - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")
    parse(message(expiry=just_after))
    with pytest.raises(RequestError) as info:
        parse(message(expiry=just_before))
    assert (info.value.code, info.value.description) == ("7005", "Request expired")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "deliverychannel",
                    "channels",
                    "sms",
                    "text",
                    "destination",
                    "msisdn",
                    "correlationid",
                    "priority",
                    "expiry",
                    "message",
                    "template",
                    "smartlinks",
                    "linkid",
                    "notifyurl",
                    "callbackData",
                    "type",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_parse_messages_raises_only_request_errors(data: Any) -> None:
    try:
        parse(data)
    except RequestError as exc:
        assert exc.code in {"7000", "7003", "7004", "7005", "7009", "7108"}
    assert count_destinations(data) >= 0


def test_count_destinations_is_lenient() -> None:
    assert count_destinations([message(), {"destination": "x"}, 5]) == 2
    assert count_destinations("text") == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2015-04-12T13:00:19.456Z", datetime(2015, 4, 12, 13, 0, 19, 456000, tzinfo=UTC)),
        ("2015-04-12T18:51:19", datetime(2015, 4, 12, 18, 51, 19, tzinfo=UTC)),
        (
            "2015-04-12T18:30:19.456+5:30",
            datetime(2015, 4, 12, 13, 0, 19, 456000, tzinfo=UTC),
        ),
        ("2022-10-10T13:53:13.749+01:00", datetime(2022, 10, 10, 12, 53, 13, 749000, tzinfo=UTC)),
        ("2022-10-10T13:53:13-0300", datetime(2022, 10, 10, 16, 53, 13, tzinfo=UTC)),
        ("2015-04-12", None),
        ("2015-02-30T00:00:00Z", None),
        ("2015-04-12T25:00:00Z", None),
        ("2015-04-12T10:00:00+24:00", None),
        ("soon", None),
    ],
)
def test_parse_expiry(text: str, expected: datetime | None) -> None:
    assert parse_expiry(text) == expected


def test_format_timestamp_documented_form_and_offsets() -> None:
    moment = datetime(2016, 7, 20, 17, 13, 17, 908000, tzinfo=UTC).timestamp()
    assert format_timestamp(moment) == "2016-07-20T17:13:17.908"
    assert format_timestamp(moment, "+5:30") == "2016-07-20T22:43:17.908+05:30"
    assert format_timestamp(moment, "-03:00") == "2016-07-20T14:13:17.908-03:00"
    # Milliseconds round without ever printing 1000.
    assert format_timestamp(59.9996) == "1970-01-01T00:01:00.000"
    shifted = datetime.fromisoformat(format_timestamp(moment, "+01:00"))
    assert shifted == datetime(2016, 7, 20, 18, 13, 17, 908000, tzinfo=timezone(timedelta(hours=1)))


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("€" * 80, 1),  # extension characters count two
        ("€" * 81, 2),
        ("я" * 70, 1),
        ("я" * 71, 2),
        ("я" * 134, 2),
        ("я" * 135, 3),
        ("😀" * 35, 1),  # two UTF-16 units each
        ("😀" * 36, 2),
    ],
)
def test_sms_parts(text: str, parts: int) -> None:
    assert sms_parts(text) == parts


def test_token_bucket_counts_destinations() -> None:
    bucket = TokenBucket(rate_per_s=100.0, capacity=100.0, now=0.0)
    assert bucket.take(60, 0.0) == 0.0
    assert bucket.take(60, 0.0) == pytest.approx(0.2)
    # Refused takes cost nothing; after 0.2 s there is room for 60.
    assert bucket.take(60, 0.2) == 0.0
    # Never more than the capacity, however long the pause.
    assert bucket.take(101, 100.0) == pytest.approx(0.01)
    assert bucket.take(100, 100.0) == 0.0


def test_fault_schedules() -> None:
    spec = FaultSpec(probability=0.5, requests=(3, 4), between_s=(10.0, 20.0))
    assert spec.applies(3, 10.0) == 0.5
    assert spec.applies(4, 19.9) == 0.5
    assert spec.applies(2, 15.0) == 0.0
    assert spec.applies(5, 15.0) == 0.0
    assert spec.applies(3, 20.0) == 0.0
    assert spec.applies(3, 9.9) == 0.0
    assert FaultSpec().applies(1, 0.0) == 0.0
    assert FaultSpec(probability=1.0).applies(10**6, 10**6) == 1.0


def test_render_report_without_timestamp_and_with_extra_fields() -> None:
    report = _Report(_Context("http://x", None, 3), "7206", "t1", "447700900001", None, 0.0, None)
    rendered = render_report(report, extra_fields=True)
    info = rendered["deliveryInfoNotification"]["deliveryInfo"]
    assert "timeStamp" not in info
    assert (info["code"], info["deliveryStatus"], info["Description"]) == (
        "7206",
        "Un-Delivered",
        "SIM full",
    )
    assert info["messageCount"] == 3
    # Absent correlation id and callback data are left out, not sent as null.
    assert set(rendered["deliveryInfoNotification"]) == {"deliveryInfo", "transid"}
