"""Parsing delivery reports and incoming messages, the code table, opt-out keywords."""

from __future__ import annotations

import json
import zoneinfo
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaign import reports
from campaign.config import OptOutSettings, ServiceSettings
from campaign.reports import ParseError
from tests.helpers.webhooks import dr, mo

DOCUMENTED_DR = b"""{
"deliveryInfoNotification": {
"deliveryInfo": {
"deliveryChannel": "SMS",
"Description": "Delivered",
"destinationType": "msisdn",
"timeStamp": "2016-07-20T17:13:17.908",
"code": "7500",
"deliveryStatus": "Delivered",
"destination": "911111111111"
},
"correlationid": "4eef-92ca-79fd0250c4a3-262895e4-2217",
"callbackData": "return callbackdata",
"transid": "262895e4-2217-4eef-92ca-79fd0250c4a3"
}
}"""


def test_documented_delivery_report() -> None:
    (report,) = reports.parse_delivery_reports(DOCUMENTED_DR)
    assert report.transid == "262895e4-2217-4eef-92ca-79fd0250c4a3"
    assert report.correlation_id == "4eef-92ca-79fd0250c4a3-262895e4-2217"
    assert report.code == "7500"
    assert report.delivery_status == "Delivered"
    assert report.description == "Delivered"
    assert report.destination == "911111111111"
    assert report.callback_data == "return callbackdata"
    # No offset means UTC.
    assert report.reported_at == datetime(2016, 7, 20, 17, 13, 17, 908000, tzinfo=UTC)
    assert report.message_count is None
    assert report.raw == orjson.loads(DOCUMENTED_DR)


def test_array_newer_fields_and_any_key_casing() -> None:
    newer = dr("t1", "7201", correlation_id="c1", at="2022-10-10T13:53:13.749+01:00")
    info = newer["deliveryInfoNotification"]["deliveryInfo"]
    info.update(messageCount=2, carrier="Vodafone", subtid="s-9", additionalInfo={"k": [1]})
    lower = {
        "DELIVERYINFONOTIFICATION": {
            "deliveryinfo": {"CODE": 7500, "description": "Delivered", "timestamp": None},
            "TransId": "t2",
        }
    }
    first, second = reports.parse_delivery_reports(orjson.dumps([newer, lower]))
    assert first.reported_at == datetime(2022, 10, 10, 12, 53, 13, 749000, tzinfo=UTC)
    assert (first.message_count, first.carrier, first.subtid) == (2, "Vodafone", "s-9")
    assert first.additional_info == {"k": [1]}
    assert (second.transid, second.code, second.description) == ("t2", "7500", "Delivered")
    assert second.reported_at is None
    assert second.correlation_id is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2016-07-20T17:13:17.908Z", datetime(2016, 7, 20, 17, 13, 17, 908000, tzinfo=UTC)),
        ("2016-07-20 17:13:17", datetime(2016, 7, 20, 17, 13, 17, tzinfo=UTC)),
        (
            "2016-07-20T17:13:17-05:30",
            datetime(2016, 7, 20, 17, 13, 17, tzinfo=timezone(-timedelta(hours=5, minutes=30))),
        ),
        (1469034797, datetime(2016, 7, 20, 17, 13, 17, tzinfo=UTC)),
        ("1469034797908", datetime(2016, 7, 20, 17, 13, 17, 908000, tzinfo=UTC)),
    ],
)
def test_timestamp_forms(value: object, expected: datetime) -> None:
    (report,) = reports.parse_delivery_reports(orjson.dumps(dr("t", at=None, timeStamp=value)))
    assert report.reported_at == expected
    assert report.reported_at is not None and report.reported_at.utcoffset() == timedelta(0)


def test_report_timezone_applies_only_to_timestamps_without_an_offset() -> None:
    kolkata = zoneinfo.ZoneInfo("Asia/Kolkata")
    plain = orjson.dumps(dr("t", at="2016-07-20T17:13:17.908"))
    (report,) = reports.parse_delivery_reports(plain, zone=kolkata)
    assert report.reported_at == datetime(2016, 7, 20, 11, 43, 17, 908000, tzinfo=UTC)
    (default,) = reports.parse_delivery_reports(plain)
    assert default.reported_at == datetime(2016, 7, 20, 17, 13, 17, 908000, tzinfo=UTC)
    # An offset, or Z, or epoch numbers say their zone themselves.
    for value in ("2016-07-20T17:13:17.908Z", "2016-07-20T17:13:17.908+00:00", 1469035397908):
        body = orjson.dumps(dr("t", at=None, timeStamp=value))
        (report,) = reports.parse_delivery_reports(body, zone=kolkata)
        assert report.reported_at is not None
        assert report.reported_at.utcoffset() == timedelta(0)
        assert report.reported_at.minute != 43, "an explicit zone was read as report_timezone"


def test_informational_fields_with_odd_values_are_dropped_not_refused() -> None:
    (report,) = reports.parse_delivery_reports(
        orjson.dumps(dr("t", messageCount="many", carrier={"name": "x"}))
    )
    assert (report.message_count, report.carrier) == (None, None)
    (report,) = reports.parse_delivery_reports(orjson.dumps(dr("t", messageCount=2**40)))
    assert report.message_count is None
    (report,) = reports.parse_delivery_reports(orjson.dumps(dr("t", messageCount="3")))
    assert report.message_count == 3


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b"42", "expected a JSON object"),
        (b"[1]", "expected a JSON object"),
        (b"{}", "deliveryInfoNotification: missing"),
        (b'{"deliveryInfoNotification": []}', "deliveryInfoNotification: missing"),
        (b'{"deliveryInfoNotification": {"transid": "t"}}', "deliveryInfo: missing"),
        (
            b'{"deliveryInfoNotification": {"transid": "t", "deliveryInfo": {}}}',
            "code: missing",
        ),
        (orjson.dumps(dr(None)), "neither transid nor correlationid"),
        (orjson.dumps(dr("t", at="yesterday")), "timeStamp: not a timestamp"),
        (orjson.dumps(dr("t", at=None, timeStamp=[1])), "timeStamp: expected a timestamp"),
        (orjson.dumps(dr("t", code=True)), "code: expected text"),
        (orjson.dumps(dr("t", Description="a\x00b")), "NUL"),
        (orjson.dumps([dr("t"), {"x": 1}]), "item 1: deliveryInfoNotification"),
    ],
)
def test_unusable_delivery_reports_raise_parse_error_with_a_reason(
    body: bytes, reason: str
) -> None:
    with pytest.raises(ParseError) as info:
        reports.parse_delivery_reports(body)
    assert reason in info.value.reason


def test_documented_incoming_message_and_an_array() -> None:
    (message,) = reports.parse_incoming_messages(orjson.dumps(mo("919812345678", "STOP", tid="m1")))
    assert (message.oa, message.da, message.message, message.tid) == (
        "919812345678",
        "56767",
        "STOP",
        "m1",
    )
    assert (message.user_id, message.channel, message.sent_at) == (
        "u1",
        "SMS",
        "2026-01-02 03:04:05",
    )
    assert message.raw["ts"] == "1767323045000"
    both = reports.parse_incoming_messages(orjson.dumps([mo("1", "a"), {"OA": "2"}]))
    assert [(m.oa, m.message, m.tid) for m in both] == [("1", "a", None), ("2", "", None)]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[", "not valid JSON"),
        (b'{"message": "STOP"}', "oa: missing"),
        (b'{"oa": ["1"]}', "oa: expected text"),
        (b'{"oa": "1", "message": {"t": 1}}', "message: expected text"),
    ],
)
def test_unusable_incoming_messages(body: bytes, reason: str) -> None:
    with pytest.raises(ParseError) as info:
        reports.parse_incoming_messages(body)
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("code", "status", "final"),
    [
        ("7500", "delivered", True),
        ("7208", "expired", True),
        ("7501", "queued", False),
        ("7201", "failed", True),
        ("7102", "failed", True),
        ("9999", "failed", True),
    ],
)
def test_code_table(code: str, status: str, final: bool) -> None:
    assert reports.status_for_code(code) == status
    assert reports.is_final(code) is final


@pytest.mark.parametrize(
    ("message", "action"),
    [
        ("STOP", "opt_out"),
        ("stop", "opt_out"),
        ("  Stop please", "opt_out"),
        ("STOP.", "opt_out"),
        ("unsubscribe me", "opt_out"),
        ("StopAll", "opt_out"),
        ("cancel", "opt_out"),
        ("END", "opt_out"),
        ("quit!", "opt_out"),
        ("START", "opt_in"),
        ("unstop", "opt_in"),
        ("stopping by later", None),
        ("please STOP", None),
        ("", None),
        ("   ", None),
        ("...", None),
        ("hello", None),
    ],
)
def test_optout_keywords_first_word_any_case(message: str, action: str | None) -> None:
    defaults = OptOutSettings()
    assert (
        reports.optout_action(
            message, stop_keywords=defaults.stop_keywords, start_keywords=defaults.start_keywords
        )
        == action
    )


def test_optout_keywords_come_from_settings() -> None:
    assert reports.optout_action("arret", stop_keywords=["ARRET"], start_keywords=[]) == "opt_out"
    assert reports.optout_action("STOP", stop_keywords=["ARRET"], start_keywords=[]) is None


@pytest.mark.parametrize(
    ("oa", "normalised"),
    [
        ("447911123456", "+447911123456"),
        ("+447911123456", "+447911123456"),
        ("00447911123456", "+447911123456"),
        # Not valid per phonenumbers' metadata, but E.164-shaped: still opted out.
        ("911111111111", "+911111111111"),
        ("56767", None),
        ("ACME", None),
        ("", None),
    ],
)
def test_normalise_oa(oa: str, normalised: str | None) -> None:
    assert reports.normalise_oa(oa) == normalised


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=6)
    ),
    max_leaves=30,
)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
keys = st.sampled_from(
    [
        "code",
        "CODE",
        "timeStamp",
        "timestamp",
        "transid",
        "correlationid",
        "messageCount",
        "carrier",
        "description",
        "deliveryStatus",
        "callbackData",
        "oa",
        "message",
        "tid",
    ]
)
# Near-misses of the real shapes reach the field checks, not just the first type test.
shaped = st.builds(
    lambda info, outer: {"deliveryInfoNotification": {"deliveryInfo": info, **outer}},
    st.dictionaries(keys, scalars | json_values, max_size=8),
    st.dictionaries(keys, scalars, max_size=4),
)
bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    shaped.map(lambda v: json.dumps(v).encode()),
    st.lists(shaped, max_size=3).map(lambda v: json.dumps(v).encode()),
    st.dictionaries(keys, scalars, max_size=6).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=64),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_parsers_raise_only_parse_error(body: bytes) -> None:
    for parse in (reports.parse_delivery_reports, reports.parse_incoming_messages):
        try:
            parsed = parse(body)
        except ParseError as exc:
            assert exc.reason
        else:
            assert isinstance(parsed, list)


# --- properties of well-formed input: every field that was sent is what is parsed -------

# Ids as the platform issues them (no whitespace: fields are stripped, see below).
ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc"), blacklist_characters="\x00"),
    min_size=1,
    max_size=50,
)
codes = st.sampled_from(["7500", "7501", "7208", "7201", "7004", "7102", "7999"])
instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.just(UTC)
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(ids, ids, codes, instants), min_size=1, max_size=5))
def test_well_formed_reports_round_trip(items: list[tuple[str, str, str, datetime]]) -> None:
    sent = [dr(transid, code, correlation_id=corr, at=at) for transid, corr, code, at in items]
    parsed = reports.parse_delivery_reports(orjson.dumps(sent if len(sent) > 1 else sent[0]))
    assert len(parsed) == len(items)
    for report, (transid, corr, code, at) in zip(parsed, items, strict=True):
        assert (report.transid, report.correlation_id, report.code) == (transid, corr, code)
        # The documented timestamp has milliseconds and no offset (UTC).
        assert report.reported_at == at.replace(microsecond=at.microsecond // 1000 * 1000)


@settings(max_examples=300, deadline=None)
@given(ids, st.text(max_size=200), st.one_of(st.none(), ids))
def test_incoming_messages_round_trip_stripped_and_nul_refused(
    oa: str, text: str, tid: str | None
) -> None:
    body = orjson.dumps(mo(oa, text, tid=tid))
    if "\x00" in text:
        # PostgreSQL text cannot hold NUL: refused here, kept as a reject by the receiver.
        with pytest.raises(ParseError):
            reports.parse_incoming_messages(body)
        return
    [message] = reports.parse_incoming_messages(body)
    assert (message.oa, message.message, message.tid) == (oa, text.strip(), tid)


@pytest.mark.parametrize("parse", [reports.parse_delivery_reports, reports.parse_incoming_messages])
def test_deep_bodies_raise_parse_error_not_recursion_error(
    parse: Callable[[bytes], object],
) -> None:
    deep_nul = b'{"a":' * 600 + b'"\\u0000"' + b"}" * 600
    with pytest.raises(ParseError, match="NUL"):
        parse(deep_nul)
    too_deep = (
        b'{"oa":"1","a":' + b"[" * (reports.MAX_DEPTH + 1) + b"]" * (reports.MAX_DEPTH + 1) + b"}"
    )
    with pytest.raises(ParseError, match="nested deeper"):
        parse(too_deep)


def test_optout_regions_follow_the_services_default_region() -> None:
    uk = ServiceSettings(key="k", sender_id="56767", default_region="GB")
    fr = ServiceSettings(key="k", sender_id="+33 6 00", default_region="fr")
    plain = ServiceSettings(key="k", sender_id="ACME")
    both = reports.OptOutRegions.from_services([uk, fr, plain])
    assert both.region_for("56767") == "GB" and both.region_for("33600") == "fr"
    # Two regions and a short code of neither: no guess.
    assert both.region_for("99999") == "" and both.region_for(None) == ""
    # One region among the services that set one: it is the guess for any short code.
    assert reports.OptOutRegions.from_services([uk, plain]).region_for("99999") == "GB"
    assert reports.OptOutRegions.from_services([plain]).region_for("56767") == ""


@pytest.mark.parametrize(
    ("oa", "region", "normalised"),
    [
        ("07911 123456", "GB", "+447911123456"),
        ("07911 123456", "", None),
        ("(202) 555-0123", "US", "+12025550123"),
        ("447911123456", "US", "+447911123456"),
        ("+33612345678", "GB", "+33612345678"),
    ],
)
def test_normalise_oa_reads_national_numbers_in_the_region(
    oa: str, region: str, normalised: str | None
) -> None:
    assert reports.normalise_oa(oa, default_region=region) == normalised
