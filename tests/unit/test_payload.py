from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from campaign import payload, sms

LINKS = payload.parse_smartlinks(
    [{"linkid": 5, "validity": 30}, {"linkid": "promo", "validity": 5}]
)


def settings(**overrides: object) -> payload.MessageSettings:
    values: dict[str, object] = {"sender_id": "DEMOBK", "priority": 2} | overrides
    return payload.MessageSettings(**values)  # type: ignore[arg-type]


def dest(n: int, text: str | None = "Hello", **kw: object) -> payload.Destination:
    return payload.Destination(correlation_id=f"c{n}", msisdn=f"9198000000{n:02d}", text=text, **kw)  # type: ignore[arg-type]


def test_uniform_text_is_one_message_with_a_destination_per_recipient() -> None:
    raw = payload.build_body(settings(), [dest(1), dest(2), dest(3)])
    assert isinstance(raw, bytes)
    body = orjson.loads(raw)
    assert isinstance(body, dict)
    assert body["deliverychannel"] == "sms"
    assert body["channels"] == {"sms": {"text": "Hello", "senderid": "DEMOBK"}}
    assert body["destination"] == [
        {"msisdn": ["919800000001"], "correlationid": "c1"},
        {"msisdn": ["919800000002"], "correlationid": "c2"},
        {"msisdn": ["919800000003"], "correlationid": "c3"},
    ]
    assert body["priority"] == "2"
    for absent in ("expiry", "callbackData", "notifyurl", "message"):
        assert absent not in body


def test_personalised_texts_are_an_array_grouped_by_text() -> None:
    body = orjson.loads(
        payload.build_body(settings(), [dest(1, "Hi A"), dest(2, "Hi B"), dest(3, "Hi A")])
    )
    assert isinstance(body, list)
    assert [m["channels"]["sms"]["text"] for m in body] == ["Hi A", "Hi B"]
    assert [d["correlationid"] for d in body[0]["destination"]] == ["c1", "c3"]
    assert [d["correlationid"] for d in body[1]["destination"]] == ["c2"]
    assert all(m["priority"] == "2" and m["channels"]["sms"]["senderid"] == "DEMOBK" for m in body)


def test_unicode_text_is_type_4() -> None:
    body = orjson.loads(payload.build_body(settings(), [dest(1, "Zoë ç", ucs2=True)]))
    assert body["channels"]["sms"]["type"] == "4"
    body = orjson.loads(payload.build_body(settings(), [dest(1, "plain")]))
    assert "type" not in body["channels"]["sms"]


def test_smartlinks_for_every_link_in_the_text() -> None:
    d = dest(1, "Go {{link_5}} or {{link_promo}}", link_ids=("5", "promo"))
    body = orjson.loads(payload.build_body(settings(smartlinks=LINKS), [d]))
    assert body["channels"]["smartlinks"] == [
        {"linkid": 5, "validity": 30},
        {"linkid": "promo", "validity": 5},
    ]


def test_a_link_without_a_configured_smartlink_is_invalid() -> None:
    with pytest.raises(sms.InvalidRecipient) as info:
        payload.check_links(("5", "9"), LINKS)
    assert info.value.code == "unknown_smartlink"
    assert "link_9" in info.value.message
    payload.check_links(("5",), LINKS)


def test_parse_smartlinks_ignores_malformed_entries() -> None:
    assert set(
        payload.parse_smartlinks([{"linkid": 1}, {"validity": 3}, "x", {"linkid": None}])
    ) == {"1"}
    assert payload.parse_smartlinks({"linkid": 1}) == {}


def test_template_campaign_sends_the_template_id_without_text() -> None:
    body = orjson.loads(
        payload.build_body(settings(template_id="42"), [dest(1, None), dest(2, None)])
    )
    assert body["message"] == {"template": "42"}
    assert body["channels"] == {"sms": {"senderid": "DEMOBK"}}
    assert len(body["destination"]) == 2


def test_optional_members() -> None:
    expires = datetime(
        2026, 1, 2, 8, 34, 5, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))
    )
    body = orjson.loads(
        payload.build_body(
            settings(
                priority=3,
                expires_at=expires,
                callback_data="cb-1",
                notify_url="https://example.test/webhooks/dr/tok",
            ),
            [dest(1)],
        )
    )
    assert body["priority"] == "3"
    assert body["expiry"] == "2026-01-02T03:04:05.123Z"
    assert body["callbackData"] == "cb-1"
    assert body["notifyurl"] == "https://example.test/webhooks/dr/tok"


def test_format_expiry_needs_a_zone() -> None:
    assert payload.format_expiry(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == (
        "2026-01-02T03:04:05.000Z"
    )
    with pytest.raises(ValueError):
        payload.format_expiry(datetime(2026, 1, 2, 3, 4, 5))


def test_limits() -> None:
    payload.build_body(settings(), [dest(i % 100) for i in range(1000)])
    with pytest.raises(ValueError, match="1001 destinations"):
        payload.build_body(settings(), [dest(i % 100) for i in range(1001)])
    with pytest.raises(ValueError):
        payload.build_body(settings(), [])
    with pytest.raises(ValueError, match="priority"):
        payload.build_body(settings(priority=4), [dest(1)])
