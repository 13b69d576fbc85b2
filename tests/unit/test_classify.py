"""The classification table: every answer the API (or the network) can give."""

from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from campaign import errors
from campaign.errors import classify


def api_error(code: str, description: str = "d") -> bytes:
    return orjson.dumps({"response": {"code": code, "description": description, "transid": "t"}})


def results(*codes: str) -> bytes:
    return orjson.dumps(
        {
            "response": [
                {"code": c, "description": "x", "transid": f"t{i}", "correlationid": f"c{i}"}
                for i, c in enumerate(codes)
            ]
        }
    )


@pytest.mark.parametrize(
    ("status", "body", "body_sent", "kind", "code"),
    [
        # Request-level API codes, all with HTTP 200.
        (200, api_error("7020"), True, "retry", "7020"),
        (200, api_error("7006"), True, "retry", "7006"),
        (200, api_error("7001"), True, "stop_service", "7001"),
        (200, api_error("7002"), True, "stop_service", "7002"),
        (200, api_error("7007"), True, "stop_service", "7007"),
        (200, api_error("7000"), True, "rejected", "7000"),
        (200, api_error("7003"), True, "rejected", "7003"),
        (200, api_error("7004"), True, "rejected", "7004"),
        (200, api_error("7005"), True, "expired", "7005"),
        (200, api_error("7009"), True, "rejected", "7009"),
        (200, api_error("7108"), True, "rejected", "7108"),
        (200, api_error("7200"), True, "rejected", "7200"),
        # HTTP-level answers.
        (429, b"", True, "retry", "http_429"),
        # A 5xx came after the body was sent: the platform may have queued the messages
        # (a gateway's 502 / 504 after the platform answered), so it is in doubt...
        (500, b"oops", True, "in_doubt", "http_500"),
        (502, b"", True, "in_doubt", "http_502"),
        (502, b"<html>502 Bad Gateway</html>", True, "in_doubt", "http_502"),
        (503, b"busy", True, "in_doubt", "http_503"),
        (504, b"", True, "in_doubt", "http_504"),
        (500, results("1001"), True, "in_doubt", "http_500"),
        # ...unless the platform itself refused the whole request with its own error object.
        (503, api_error("7006"), True, "retry", "7006"),
        (500, api_error("7020"), True, "retry", "7020"),
        (500, api_error("7001"), True, "stop_service", "7001"),
        (502, api_error("7004"), True, "rejected", "7004"),
        (400, b"bad", True, "rejected", "http_400"),
        (404, b"", True, "rejected", "http_404"),
        (413, b"", True, "rejected", "http_413"),
        (400, api_error("7004"), True, "rejected", "7004"),
        (401, b"", True, "stop_service", "http_401"),
        (403, b"", True, "stop_service", "http_403"),
        (401, api_error("7001"), True, "stop_service", "7001"),
        (301, b"", True, "stop_service", "http_301"),
        # A 2xx nobody can read may still have queued the messages.
        (200, b"<html>", True, "in_doubt", "bad_response"),
        (200, b'{"response": 5}', True, "in_doubt", "bad_response"),
        (200, b"", True, "in_doubt", "bad_response"),
    ],
)
def test_http_answers(status: int, body: bytes, body_sent: bool, kind: str, code: str) -> None:
    outcome = classify(status, body, body_sent=body_sent)
    assert (outcome.kind, outcome.code) == (kind, code)


@pytest.mark.parametrize(
    ("exc", "body_sent", "kind", "code"),
    [
        (ConnectionRefusedError("refused"), False, "retry", "connection_error"),
        (ConnectionResetError("reset"), False, "retry", "connection_error"),
        (TimeoutError(), False, "retry", "timeout"),
        (TimeoutError(), True, "in_doubt", "timeout"),
        (ConnectionResetError("reset"), True, "in_doubt", "connection_error"),
        (OSError("broken pipe"), True, "in_doubt", "connection_error"),
    ],
)
def test_transport_failures_depend_on_whether_the_body_left(
    exc: BaseException, body_sent: bool, kind: str, code: str
) -> None:
    outcome = classify(None, exc, body_sent=body_sent)
    assert (outcome.kind, outcome.code) == (kind, code)
    assert outcome.description


def test_success_list_keeps_every_destination_result() -> None:
    outcome = classify(200, results("1001", "7004", "7020"), body_sent=True)
    assert outcome.kind == "ok"
    assert [(r.code, r.transid, r.correlation_id, r.kind) for r in outcome.results] == [
        ("1001", "t0", "c0", "queued"),
        ("7004", "t1", "c1", "rejected"),
        ("7020", "t2", "c2", "retry"),
    ]


def test_an_answer_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    parse = errors.parse_response

    def counting(body: bytes) -> object:
        calls.append(body)
        return parse(body)

    monkeypatch.setattr(errors, "parse_response", counting)
    assert classify(200, results("1001", "7004"), body_sent=True).kind == "ok"
    assert classify(401, api_error("7001"), body_sent=True).kind == "stop_service"
    assert len(calls) == 2


def test_single_success_object_is_ok() -> None:
    body = orjson.dumps(
        {"response": {"code": "1001", "description": "Queued in burst mode", "transid": "t"}}
    )
    outcome = classify(200, body, body_sent=True)
    assert outcome.kind == "ok"
    assert outcome.results[0].transid == "t"


def test_numeric_codes_are_read_as_text() -> None:
    body = orjson.dumps({"response": {"code": 7001, "description": "Authentication failed."}})
    assert classify(200, body, body_sent=True).kind == "stop_service"


def test_retry_after_is_honoured() -> None:
    assert classify(429, b"", body_sent=True, retry_after="7").retry_after_s == 7.0
    assert classify(429, b"", body_sent=True).retry_after_s is None


def test_a_503_with_retry_after_is_a_refusal_and_is_retried() -> None:
    outcome = classify(503, b"busy", body_sent=True, retry_after="2")
    assert (outcome.kind, outcome.code, outcome.retry_after_s) == ("retry", "http_503", 2.0)
    # A Retry-After nobody can read does not make a 503 a refusal; nor does it other 5xx.
    assert classify(503, b"", body_sent=True, retry_after="soon").kind == "in_doubt"
    assert classify(502, b"", body_sent=True, retry_after="2").kind == "in_doubt"
    assert classify(500, b"", body_sent=True, retry_after="2").kind == "in_doubt"
    # The platform's own 7020 object with a 5xx: retried after the Retry-After it gave.
    assert classify(500, api_error("7020"), body_sent=True, retry_after="3").retry_after_s == 3.0


def test_parse_retry_after_date() -> None:
    now = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert errors.parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now=now) == 30.0
    assert errors.parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now=now) == 0.0
    assert errors.parse_retry_after("soon", now=now) is None


def test_classify_needs_a_status_or_an_exception() -> None:
    with pytest.raises(ValueError):
        classify(None, None, body_sent=False)


@given(st.binary(max_size=200))
def test_any_2xx_body_is_classified_without_crashing(body: bytes) -> None:
    assert classify(200, body, body_sent=True).kind in {
        "ok",
        "retry",
        "in_doubt",
        "stop_service",
        "rejected",
    }


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@given(json_values)
def test_parse_response_raises_only_response_error(value: object) -> None:
    try:
        parsed = errors.parse_response(orjson.dumps({"response": value}))
    except errors.ResponseError:
        return
    items = parsed if isinstance(parsed, list) else [parsed]
    assert all(isinstance(r, errors.DestinationResult) and r.code for r in items)


@pytest.mark.parametrize("status", [200, 500])
def test_7005_request_expired_is_expired_not_rejected(status: int) -> None:
    outcome = classify(status, api_error("7005", "Request expired"), body_sent=True)
    assert (outcome.kind, outcome.code) == ("expired", "7005")
    assert errors.destination_kind("7005") == "expired"
