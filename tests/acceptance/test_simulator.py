"""The simulator over real sockets: validation, rate limit, faults, reports, MO, stats, CLI."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import tomllib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from campaign.simulator import (
    MO_PATH,
    RESET_PATH,
    STATS_PATH,
    Faults,
    FaultSpec,
    Simulator,
    SimulatorConfig,
)
from campaign.simulator.timestamps import parse_expiry
from tests.helpers.proc import Processes
from tests.helpers.sim import KEY, fast_config, post, receiver, simulator, sms

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def faults(**specs: FaultSpec) -> Faults:
    return dataclasses.replace(Faults(), **specs)


ALWAYS = FaultSpec(probability=1.0)


# --------------------------------------------------------------------------- validation


def _future(hours: int = 1) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _without(body: dict[str, Any], *path: str) -> dict[str, Any]:
    node = body
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    return body


DESTINATION_MANDATORY = (
    "any one of [customerid,msisdn,email, userid,pushid,psid, twitterid, wechatid] is mandatory"
)

REJECTIONS: list[tuple[str, Any, str, str]] = [
    ("7003 no destination", _without(sms(), "destination"), "7003", DESTINATION_MANDATORY),
    ("7003 empty destination", sms(destination=[]), "7003", DESTINATION_MANDATORY),
    ("7003 empty msisdn list", sms(destination=[{"msisdn": []}]), "7003", DESTINATION_MANDATORY),
    ("7003 entry without msisdn", sms(destination=[{"x": 1}]), "7003", DESTINATION_MANDATORY),
    (
        "7003 no text",
        _without(sms(), "channels", "sms", "text"),
        "7003",
        "param 'text' missing for channel sms",
    ),
    ("7003 empty text", sms(text=""), "7003", "param 'text' missing for channel sms"),
    (
        "7003 no sms object",
        sms(channels={"smartlinks": []}),
        "7003",
        "param 'sms' missing for channel sms",
    ),
    (
        "7003 no channels",
        _without(sms(), "channels"),
        "7003",
        "param 'channels' missing for channel sms",
    ),
    (
        "7003 no deliverychannel",
        _without(sms(), "deliverychannel"),
        "7003",
        "param 'deliverychannel' missing",
    ),
    ("7004 priority 0", sms(priority="0"), "7004", "Invalid parameters: priority"),
    ("7004 priority 4", sms(priority=4), "7004", "Invalid parameters: priority"),
    ("7004 priority high", sms(priority="high"), "7004", "Invalid parameters: priority"),
    ("7004 bad expiry", sms(expiry="tomorrow"), "7004", "Invalid parameters: expiry"),
    ("7004 impossible expiry", sms(expiry="2030-02-30T00:00:00Z"), "7004", ""),
    ("7004 unknown channel", sms(deliverychannel="whatsapp"), "7004", ""),
    ("7004 link without smartlink", sms(text="Go {{link_5}}"), "7004", ""),
    (
        "7004 link with another smartlink",
        sms(
            text="Go {{link_5}}",
            channels={"sms": {"text": "Go {{link_5}}"}, "smartlinks": [{"linkid": 6}]},
        ),
        "7004",
        "",
    ),
    ("7004 correlationid over 50 bytes", sms(correlationid="x" * 51), "7004", ""),
    ("7004 text over 1024 chars", sms(text="a" * 1025), "7004", ""),
    ("7004 unknown sms type", sms(channels={"sms": {"text": "hi", "type": "9"}}), "7004", ""),
    ("7004 notifyurl not http", sms(notifyurl="ftp://x"), "7004", ""),
    ("7005 expired", sms(expiry="2015-04-12T13:00:19.456Z"), "7005", "Request expired"),
    (
        "7108 unknown template",
        sms(message={"template": "99"}, channels={"sms": {}}),
        "7108",
        "Invalid template id",
    ),
    ("7000 a JSON string", "hello", "7000", "Invalid JSON"),
    ("7000 an empty array", [], "7000", "Invalid JSON"),
    ("7000 an array of numbers", [1, 2], "7000", "Invalid JSON"),
]


@pytest.mark.parametrize(
    ("body", "code", "description"),
    [r[1:] for r in REJECTIONS],
    ids=[r[0] for r in REJECTIONS],
)
async def test_invalid_requests_get_200_and_a_single_error_object(
    session: aiohttp.ClientSession, body: Any, code: str, description: str
) -> None:
    async with simulator(fast_config(templates=("1",))) as sim:
        answer = await post(session, sim, body)
        stats = sim.stats()
    assert answer.status == 200
    assert answer.code == code
    assert answer.body["response"]["transid"]
    if description:
        assert answer.body["response"]["description"] == description
    assert stats["destinations"]["accepted"] == 0
    assert stats["requests"]["by_result"] == {code: 1}


async def test_invalid_json_missing_and_wrong_keys(session: aiohttp.ClientSession) -> None:
    async with simulator(fast_config(keys=("k1", "k2"), inactive_keys=("old",))) as sim:
        bad_json = await post(session, sim, None, key="k1", raw=b'{"deliverychannel": ')
        no_key = await post(session, sim, sms(), key=None)
        empty_key = await post(session, sim, sms(), key="")
        wrong_key = await post(session, sim, sms(), key="nope")
        inactive = await post(session, sim, sms(), key="old")
        second_key = await post(session, sim, sms(), key="k2")
        stats = sim.stats()
    assert [a.status for a in (bad_json, no_key, wrong_key, inactive)] == [200] * 4
    assert bad_json.code == "7000"
    assert no_key.code == "7002"
    assert no_key.body["response"]["description"] == "Service Key Missing"
    assert empty_key.code == "7002"
    assert wrong_key.code == "7001"
    assert wrong_key.body["response"]["description"] == "Authentication failed."
    assert inactive.code == "7007"
    assert second_key.results[0]["code"] == "1001"
    # A stranger's key is never echoed in stats: it is counted under "unknown".
    assert "nope" not in stats["keys"]
    assert stats["keys"]["unknown"]["requests_by_result"] == {"7001": 1}
    assert stats["keys"]["k2"]["accepted"] == 1


async def test_more_than_1000_destinations_is_7009_counted_over_the_whole_request(
    session: aiohttp.ClientSession,
) -> None:
    numbers = [f"4477009{n:05d}" for n in range(1001)]
    # Two message objects of 500 and 501 destinations: the limit is per request.
    over = [sms(numbers[:500]), sms(numbers[500:])]
    async with simulator() as sim:
        rejected = await post(session, sim, over)
        accepted = await post(session, sim, [sms(numbers[:500]), sms(numbers[500:1000])])
        stats = sim.stats()
    assert rejected.code == "7009"
    assert len(accepted.results) == 1000
    assert stats["destinations"]["rejected_by_code"] == {"7009": 1001}
    assert stats["destinations"]["accepted"] == 1000


async def test_success_is_one_result_per_destination_with_its_correlation_id(
    session: aiohttp.ClientSession,
) -> None:
    body = sms(
        destination=[
            {"msisdn": ["447700900001", "447700900002"], "correlationid": "entry"},
            {"msisdn": ["447700900003"]},
        ],
        correlationid="top",
        priority="3",
        expiry=_future(),
        callbackData="cb",
        notifydata="nd",
        route="",
        conversationid="",
    )
    async with simulator() as sim:
        answer = await post(session, sim, body)
        stats = sim.stats()
    assert answer.status == 200
    assert [r["code"] for r in answer.results] == ["1001"] * 3
    assert [r["description"] for r in answer.results] == ["Queued"] * 3
    # The destination's correlationid wins over the top-level one.
    assert [r["correlationid"] for r in answer.results] == ["entry", "entry", "top"]
    assert len({r["transid"] for r in answer.results}) == 3
    assert stats["correlation_ids"] == {"entry": 2, "top": 1}
    assert stats["msisdns"] == {"447700900001": 1, "447700900002": 1, "447700900003": 1}


async def test_documented_request_shapes_are_accepted(session: aiohttp.ClientSession) -> None:
    smartlink = {
        "deliverychannel": "sms",
        "channels": {
            "smartlinks": [{"linkid": 5, "validity": 30}],
            "sms": {"type": 1, "text": "Gift {{link_5}}", "senderid": "DEMOBK"},
        },
        "destination": [{"msisdn": ["+447700900001"]}],
    }
    template = {
        "correlationid": "",
        "conversationid": "",
        "callbackData": "",
        "notifyurl": "",
        "route": "",
        "expiry": "",
        "deliverychannel": "sms",
        "message": {"template": "1"},
        "channels": {"sms": {}},
        "destination": [{"msisdn": ["447700900002"]}],
    }
    personalised = [
        sms(["447700900003"], text="Hi John"),
        sms(["447700900004"], text="Hi Mark"),
    ]
    unicode_offset_expiry = sms(
        ["447700900005"],
        channels={"sms": {"text": "Привет", "type": "4"}},
        expiry="2099-04-12T18:30:19.456+5:30",
        priority=1,
    )
    async with simulator(fast_config(templates=("1",))) as sim:
        answers = [
            await post(session, sim, body)
            for body in (smartlink, template, personalised, unicode_offset_expiry)
        ]
    assert [len(a.results) for a in answers] == [1, 1, 2, 1]
    assert all(r["code"] == "1001" for a in answers for r in a.results)
    # No correlation id given anywhere: the result carries none.
    assert "correlationid" not in answers[1].results[0]


async def test_invalid_numbers_are_rejected_per_destination(
    session: aiohttp.ClientSession,
) -> None:
    async with simulator(fast_config(require_plus=True)) as sim:
        answer = await post(session, sim, sms(["+447700900001", "447700900002", "+12", "abc"]))
        stats = sim.stats()
    assert [r["code"] for r in answer.results] == ["1001", "7004", "7004", "7004"]
    assert [r["correlationid"] for r in answer.results] == ["c0", "c1", "c2", "c3"]
    assert stats["destinations"]["accepted"] == 1
    assert stats["destinations"]["rejected_by_code"] == {"7004": 3}


async def test_any_key_mode_and_async_with_on_the_class(session: aiohttp.ClientSession) -> None:
    async with Simulator(config=fast_config(keys=())) as sim:
        answer = await post(session, sim, sms(), key="whatever-key")
        stats = sim.stats()
    assert answer.results[0]["code"] == "1001"
    # Keys accepted without a list are pooled under "*", never shown.
    assert list(stats["keys"]) == ["*"]


async def test_bodies_over_max_body_bytes_get_413(session: aiohttp.ClientSession) -> None:
    async with simulator(fast_config(max_body_bytes=2000)) as sim:
        answer = await post(
            session, sim, sms(text="x" * 1000, channels={"sms": {"text": "y" * 2000}})
        )
    assert answer.status == 413


# --------------------------------------------------------------------------- rate limit


async def test_rate_limit_answers_7020_when_the_bucket_is_empty(
    session: aiohttp.ClientSession,
) -> None:
    numbers = [f"4477009{n:05d}" for n in range(100)]
    async with simulator(fast_config(rate_per_s=100.0)) as sim:
        first = await post(session, sim, sms(numbers))
        second = await post(session, sim, sms(numbers))
        stats = sim.stats()
    assert len(first.results) == 100
    assert second.status == 200
    assert second.code == "7020"
    assert stats["destinations"]["rejected_by_code"] == {"7020": 100}
    assert stats["keys"][KEY]["requests_by_result"] == {"1001": 1, "7020": 1}


async def test_rate_limit_429_mode_sets_retry_after(session: aiohttp.ClientSession) -> None:
    numbers = [f"4477009{n:05d}" for n in range(50)]
    config = fast_config(rate_per_s=10.0, burst_s=5.0, rate_limit_mode="429")
    async with simulator(config) as sim:
        first = await post(session, sim, sms(numbers))
        second = await post(session, sim, sms(numbers))
    assert len(first.results) == 50
    assert second.status == 429
    assert second.code == "7020"
    # 50 destinations at 10/s with an empty bucket: about 5 s.
    assert 4 <= int(second.headers["Retry-After"]) <= 6


async def test_accepted_destinations_per_window_stay_within_the_rate(
    session: aiohttp.ClientSession,
) -> None:
    rate = 200.0
    numbers = [f"4477009{n:05d}" for n in range(50)]
    config = fast_config(rate_per_s=rate, stats_window_s=0.5)

    def code_of(answer: Any) -> str:
        response = answer.body["response"]
        return str(response[0]["code"] if isinstance(response, list) else response["code"])

    async with simulator(config) as sim:
        started = time.monotonic()
        codes: list[str] = []
        for _ in range(200):  # bounded; stops at the first refusal
            codes.append(code_of(await post(session, sim, sms(numbers))))
            if codes[-1] == "7020":
                break
            await asyncio.sleep(0.01)
        # Half a second refills 100 tokens at the least, however busy the machine.
        await asyncio.sleep(0.5)
        codes.append(code_of(await post(session, sim, sms(numbers))))
        elapsed = time.monotonic() - started
        stats = sim.stats(summary=True)
    accepted = stats["destinations"]["accepted"]
    assert "7020" in codes and codes[-1] == "1001"
    # The bucket holds one second of rate; beyond that it refills at rate_per_s.
    assert accepted <= rate * 1.0 + rate * elapsed
    # The full bucket went through before the first refusal, and the refill after it.
    assert accepted >= rate * 1.0 + len(numbers)
    windows = stats["keys"][KEY]["accepted_per_window"]
    assert sum(windows.values()) == accepted
    assert all(count <= rate * 1.0 + rate * 0.5 for count in windows.values())


# --------------------------------------------------------------------------- faults


async def test_http_500_on_a_request_schedule(session: aiohttp.ClientSession) -> None:
    config = fast_config(faults=faults(http_500=FaultSpec(probability=1.0, requests=(2, 3))))
    async with simulator(config) as sim:
        answers = [await post(session, sim, sms()) for _ in range(4)]
        stats = sim.stats()
    assert [a.status for a in answers] == [200, 500, 500, 200]
    assert stats["faults"] == {"http_500": 2}
    assert stats["destinations"]["accepted"] == 2


async def test_error_7006_with_a_time_schedule(session: aiohttp.ClientSession) -> None:
    config = fast_config(faults=faults(error_7006=FaultSpec(probability=1.0, between_s=(0, 60))))
    async with simulator(config) as sim:
        answer = await post(session, sim, sms())
        stats = sim.stats()
    assert answer.status == 200
    assert answer.code == "7006"
    assert stats["faults"] == {"error_7006": 1}
    assert stats["destinations"]["accepted"] == 0


async def test_fault_probability_fires_on_some_requests_only(
    session: aiohttp.ClientSession,
) -> None:
    config = fast_config(faults=faults(error_7006=FaultSpec(probability=0.5)))
    async with simulator(config) as sim:
        answers = [await post(session, sim, sms()) for _ in range(40)]
    failed = sum(1 for a in answers if isinstance(a.body["response"], dict))
    assert 5 <= failed <= 35


async def test_slow_response_is_accepted_but_answered_after_the_client_gave_up(
    session: aiohttp.ClientSession,
) -> None:
    async with receiver() as rec:
        held_s = 60.0
        config = fast_config(
            faults=faults(slow_response=FaultSpec(probability=1.0, delay_s=held_s))
        )
        async with simulator(config) as sim:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await post(session, sim, sms(notifyurl=rec.url()))
            await rec.wait_for(1)
            stats = sim.stats()
        # close() ends the held response, not after delay_s (however slow the machine is,
        # far sooner than that).
        assert time.monotonic() - started < held_s / 2
    assert stats["destinations"]["accepted"] == 1
    assert stats["faults"] == {"slow_response": 1}
    assert rec.reports()[0]["deliveryInfoNotification"]["deliveryInfo"]["code"] == "7500"


async def test_dropped_connection_after_the_request_was_read_is_the_in_doubt_case(
    session: aiohttp.ClientSession,
) -> None:
    async with (
        receiver() as rec,
        simulator(
            fast_config(faults=faults(drop_connection=FaultSpec(probability=1.0, requests=(1, 1))))
        ) as sim,
    ):
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await post(session, sim, sms(["447700900001"], notifyurl=rec.url()))
        # The request was accepted and its report is sent all the same.
        await rec.wait_for(1)
        after = await post(session, sim, sms(["447700900002"]))
        stats = sim.stats()
    assert stats["faults"] == {"drop_connection": 1}
    assert stats["msisdns"] == {"447700900001": 1, "447700900002": 1}
    assert rec.reports()[0]["deliveryInfoNotification"]["deliveryInfo"]["destination"] == (
        "447700900001"
    )
    assert after.results[0]["code"] == "1001"


async def test_gateway_502_is_answered_after_the_request_was_accepted(
    session: aiohttp.ClientSession,
) -> None:
    async with (
        receiver() as rec,
        simulator(
            fast_config(faults=faults(gateway_502=FaultSpec(probability=1.0, requests=(1, 1))))
        ) as sim,
    ):
        first = await post(session, sim, sms(["447700900001"], notifyurl=rec.url()))
        # Accepted and reported all the same: only the answer was lost.
        await rec.wait_for(1)
        after = await post(session, sim, sms(["447700900002"]))
        stats = sim.stats()
    assert first.status == 502
    assert stats["faults"] == {"gateway_502": 1}
    assert stats["msisdns"] == {"447700900001": 1, "447700900002": 1}
    assert stats["destinations"]["accepted"] == 2
    assert rec.reports()[0]["deliveryInfoNotification"]["deliveryInfo"]["destination"] == (
        "447700900001"
    )
    assert after.results[0]["code"] == "1001"


async def test_report_before_response(session: aiohttp.ClientSession) -> None:
    config = fast_config(
        dr_delay_min_s=5.0,
        dr_delay_max_s=5.0,
        faults=faults(report_before_response=ALWAYS),
    )
    async with receiver() as rec, simulator(config) as sim:
        answer = await post(
            session, sim, sms(["447700900001", "447700900002"], notifyurl=rec.url())
        )
        # The reports were delivered before the answer came back, though the delay is 5 s.
        delivered = {r["deliveryInfoNotification"]["transid"] for r in rec.reports()}
    assert delivered == {r["transid"] for r in answer.results}


async def test_duplicate_reports(session: aiohttp.ClientSession) -> None:
    config = fast_config(faults=faults(duplicate_report=ALWAYS))
    async with receiver() as rec, simulator(config) as sim:
        answer = await post(
            session, sim, sms(["447700900001", "447700900002"], notifyurl=rec.url())
        )
        await sim.wait_reports_sent(timeout_s=10)
        stats = sim.stats()
    reports = rec.reports()
    assert len(reports) == 4
    for result in answer.results:
        same = [r for r in reports if r["deliveryInfoNotification"]["transid"] == result["transid"]]
        assert len(same) == 2
        assert same[0] == same[1]
    assert stats["faults"] == {"duplicate_report": 2}


async def test_out_of_order_reports_send_the_final_one_first(
    session: aiohttp.ClientSession,
) -> None:
    config = fast_config(
        dr_delay_min_s=0.05,
        dr_delay_max_s=0.1,
        faults=faults(out_of_order=ALWAYS),
    )
    async with receiver() as rec, simulator(config) as sim:
        await post(session, sim, sms(notifyurl=rec.url()))
        await sim.wait_reports_sent(timeout_s=10)
    infos = [r["deliveryInfoNotification"]["deliveryInfo"] for r in rec.reports()]
    assert [i["code"] for i in infos] == ["7500", "7501"]
    # The late interim report is stamped before the final one it follows.
    assert infos[1]["timeStamp"] < infos[0]["timeStamp"]


async def test_reports_for_unknown_transids(session: aiohttp.ClientSession) -> None:
    config = fast_config(faults=faults(unknown_transid=ALWAYS))
    async with receiver() as rec, simulator(config) as sim:
        answer = await post(session, sim, sms(notifyurl=rec.url()))
        await sim.wait_reports_sent(timeout_s=10)
    issued = answer.results[0]["transid"]
    notifications = [r["deliveryInfoNotification"] for r in rec.reports()]
    assert len(notifications) == 2
    (known,) = [n for n in notifications if n["transid"] == issued]
    (stranger,) = [n for n in notifications if n["transid"] != issued]
    assert known["correlationid"] == "c0"
    # Unknown by transid and by correlation id: nothing can match it.
    assert stranger["correlationid"] != "c0"
    assert stranger["deliveryInfo"]["destination"] == known["deliveryInfo"]["destination"]


async def test_timestamps_with_an_offset_or_none(session: aiohttp.ClientSession) -> None:
    offset = fast_config(timestamp_offset="-03:00", faults=faults(timestamp_offset=ALWAYS))
    missing = fast_config(faults=faults(timestamp_missing=ALWAYS))
    infos = []
    for config in (fast_config(), offset, missing):
        async with receiver() as rec, simulator(config) as sim:
            await post(session, sim, sms(notifyurl=rec.url()))
            await sim.wait_reports_sent(timeout_s=10)
        infos.append(rec.reports()[0]["deliveryInfoNotification"]["deliveryInfo"])
    plain, shifted, none = infos
    assert parse_expiry(plain["timeStamp"]) is not None
    assert len(plain["timeStamp"]) == len("2016-07-20T17:13:17.908")
    assert shifted["timeStamp"].endswith("-03:00")
    instant = parse_expiry(shifted["timeStamp"])
    assert instant is not None
    assert abs((instant - datetime.now(UTC)).total_seconds()) < 30
    assert "timeStamp" not in none


async def test_lost_reports_are_never_sent(session: aiohttp.ClientSession) -> None:
    config = fast_config(faults=faults(lost_report=ALWAYS))
    async with receiver() as rec, simulator(config) as sim:
        await post(session, sim, sms(["447700900001", "447700900002"], notifyurl=rec.url()))
        await sim.wait_reports_sent(timeout_s=10)
        stats = sim.stats()
    assert rec.received == []
    assert stats["faults"] == {"lost_report": 2}
    assert stats["reports"]["scheduled"] == 0


# --------------------------------------------------------------------------- reports


async def test_report_has_the_documented_shape(session: aiohttp.ClientSession) -> None:
    async with receiver() as rec, simulator() as sim:
        answer = await post(
            session, sim, sms(["911111111111"], notifyurl=rec.url(), callbackData="return cb")
        )
        await sim.wait_reports_sent(timeout_s=10)
        stats = sim.stats()
    (report,) = rec.reports()
    notification = report["deliveryInfoNotification"]
    assert set(report) == {"deliveryInfoNotification"}
    assert set(notification) == {"deliveryInfo", "correlationid", "callbackData", "transid"}
    info = notification["deliveryInfo"]
    assert set(info) == {
        "deliveryChannel",
        "Description",
        "destinationType",
        "timeStamp",
        "code",
        "deliveryStatus",
        "destination",
    }
    assert info["deliveryChannel"] == "SMS"
    assert info["destinationType"] == "msisdn"
    assert (info["code"], info["deliveryStatus"], info["Description"]) == (
        "7500",
        "Delivered",
        "Delivered",
    )
    assert info["destination"] == "911111111111"
    assert notification["transid"] == answer.results[0]["transid"]
    assert notification["correlationid"] == "c0"
    assert notification["callbackData"] == "return cb"
    assert stats["reports"]["sent"] == 1
    assert stats["reports"]["by_code"] == {"7500": 1}


async def test_outcome_mix_interim_reports_and_forced_codes(
    session: aiohttp.ClientSession,
) -> None:
    numbers = [f"4477009{n:05d}" for n in range(40)]
    config = fast_config(
        dr_outcomes={"7203": 1.0, "7208": 1.0},
        dr_interim_ratio=1.0,
        dr_codes_by_msisdn={numbers[0]: "7102"},
        dr_extra_fields=True,
    )
    async with receiver() as rec, simulator(config) as sim:
        await post(session, sim, sms(numbers, notifyurl=rec.url(), text="€" * 100))
        await sim.wait_reports_sent(timeout_s=10)
    infos = [r["deliveryInfoNotification"]["deliveryInfo"] for r in rec.reports()]
    by_number: dict[str, list[str]] = {}
    for info in infos:
        by_number.setdefault(info["destination"], []).append(info["code"])
    assert all(codes[0] == "7501" for codes in by_number.values())
    finals = {number: codes[1] for number, codes in by_number.items()}
    assert finals[numbers[0]] == "7102"
    assert set(finals.values()) == {"7102", "7203", "7208"}
    assert {i["deliveryStatus"] for i in infos if i["code"] == "7203"} == {"Un-Delivered"}
    # 100 euro signs take 200 GSM-7 units: two parts.
    assert {i["messageCount"] for i in infos} == {2}
    assert all(i["carrier"] for i in infos)


async def test_reports_batched_as_arrays_go_to_the_default_notify_url(
    session: aiohttp.ClientSession,
) -> None:
    numbers = [f"4477009{n:05d}" for n in range(7)]
    async with receiver() as rec:
        config = fast_config(
            dr_batch_size=3,
            dr_delay_min_s=0.05,
            dr_delay_max_s=0.05,
            default_notify_url=rec.url(),
        )
        async with simulator(config) as sim:
            await post(session, sim, sms(numbers))
            await sim.wait_reports_sent(timeout_s=10)
            stats = sim.stats()
    assert sorted(len(item.body) for item in rec.received) == [1, 3, 3]
    assert len(rec.reports()) == 7
    assert stats["reports"]["posts"] == 3


async def test_no_notify_url_means_no_reports(session: aiohttp.ClientSession) -> None:
    async with simulator() as sim:
        await post(session, sim, sms())
        await sim.wait_reports_sent(timeout_s=1)
        stats = sim.stats()
    assert stats["reports"]["scheduled"] == 0


async def test_failed_callbacks_are_retried_then_delivered(
    session: aiohttp.ClientSession,
) -> None:
    async with receiver(fail_first=[500, "close"]) as rec, simulator() as sim:
        answer = await post(session, sim, sms(notifyurl=rec.url()))
        await sim.wait_reports_sent(timeout_s=10)
        stats = sim.stats()
    assert rec.attempts == 3
    (report,) = rec.reports()
    assert report["deliveryInfoNotification"]["transid"] == answer.results[0]["transid"]
    assert stats["reports"] | {"by_code": None} == {
        "scheduled": 1,
        "sent": 1,
        "failed": 0,
        "retried": 2,
        "pending": 0,
        "posts": 1,
        "by_code": None,
    }


async def test_callbacks_give_up_after_three_retries_and_not_after_a_4xx(
    session: aiohttp.ClientSession,
) -> None:
    async with (
        receiver(fail_first=[503] * 10) as down,
        receiver(fail_first=[400]) as refuses,
        simulator() as sim,
    ):
        await post(session, sim, sms(["447700900001"], notifyurl=down.url()))
        await post(session, sim, sms(["447700900002"], notifyurl=refuses.url()))
        await sim.wait_reports_sent(timeout_s=10)
        stats = sim.stats()
    assert down.attempts == 4  # the first try and 3 retries
    assert refuses.attempts == 1
    assert stats["reports"]["failed"] == 2
    assert stats["reports"]["retried"] == 3
    assert stats["reports"]["sent"] == 0


async def test_unreachable_callback_url_is_retried(session: aiohttp.ClientSession) -> None:
    async with receiver() as rec:
        dead_url = rec.url()
    config = fast_config(callback_retries=2)
    async with simulator(config) as sim:
        await post(session, sim, sms(notifyurl=dead_url))
        await sim.wait_reports_sent(timeout_s=10)
        stats = sim.stats()
    assert stats["reports"]["retried"] == 2
    assert stats["reports"]["failed"] == 1


async def test_close_drops_pending_reports_cleanly(session: aiohttp.ClientSession) -> None:
    config = fast_config(dr_delay_min_s=60.0, dr_delay_max_s=60.0)
    async with receiver() as rec:
        sim_cm = simulator(config)
        sim = await sim_cm.__aenter__()
        await post(session, sim, sms(notifyurl=rec.url()))
        assert sim.stats()["reports"]["pending"] == 1
        with pytest.raises(TimeoutError):
            await sim.wait_reports_sent(timeout_s=0.1)
        await sim_cm.__aexit__(None, None, None)
    assert rec.received == []


# --------------------------------------------------------------------------- MO


async def test_mo_over_http_and_in_process(session: aiohttp.ClientSession) -> None:
    async with (
        receiver() as rec,
        simulator(fast_config(mo_url=rec.url("/mo"), mo_da="56789")) as sim,
    ):
        async with session.post(
            sim.base_url + MO_PATH, json={"oa": "447700900001", "message": "STOP"}
        ) as resp:
            over_http = await resp.json()
        direct = await sim.send_mo(
            oa="447700900002", message="START", da="1111", url=rec.url("/other")
        )
        async with session.post(sim.base_url + MO_PATH, json={"message": "x"}) as resp:
            missing_oa = resp.status
        stats = sim.stats()
    assert over_http["status"] == 200
    assert direct["status"] == 200
    assert missing_oa == 400
    first, second = rec.received
    assert first.path == "/mo"
    assert second.path == "/other"
    assert set(first.body) == {"userId", "channel", "da", "oa", "message", "tid", "datetime", "ts"}
    assert first.body["channel"] == "SMS"
    assert (first.body["oa"], first.body["da"], first.body["message"]) == (
        "447700900001",
        "56789",
        "STOP",
    )
    assert first.body["tid"] == over_http["tid"]
    assert (second.body["oa"], second.body["da"]) == ("447700900002", "1111")
    assert first.body["tid"] != second.body["tid"]
    assert stats["mo"] == {"sent": 2, "failed": 0, "retried": 0}


async def test_mo_without_url_is_refused_and_failures_are_retried(
    session: aiohttp.ClientSession,
) -> None:
    async with simulator() as sim:
        async with session.post(sim.base_url + MO_PATH, json={"oa": "1", "message": "x"}) as resp:
            no_url = resp.status
        with pytest.raises(ValueError, match="no MO URL"):
            await sim.send_mo(oa="447700900001", message="STOP")
    assert no_url == 400
    async with receiver(fail_first=[502]) as rec, simulator(fast_config(mo_url=rec.url())) as sim:
        first = await sim.send_mo(oa="447700900001", message="STOP")
        await sim.wait_reports_sent(timeout_s=10)
        stats = sim.stats()
    assert first["status"] == 502
    assert len(rec.received) == 1
    assert stats["mo"] == {"sent": 1, "failed": 0, "retried": 1}


# --------------------------------------------------------------------------- stats


async def test_stats_over_http_count_every_number_and_correlation_id(
    session: aiohttp.ClientSession,
) -> None:
    config = fast_config(keys=("a", "b"))
    async with simulator(config) as sim:
        await post(session, sim, sms(["447700900001", "447700900002"]), key="a")
        await post(session, sim, sms(["447700900001"], correlation_prefix="d"), key="b")
        await post(session, sim, sms(["447700900003"], correlation_prefix=None), key="b")
        async with session.get(sim.base_url + STATS_PATH) as resp:
            full = await resp.json()
        async with session.get(sim.base_url + STATS_PATH + "?summary=1") as resp:
            summary = await resp.json()
        async with session.post(sim.base_url + RESET_PATH) as resp:
            assert resp.status == 200
        after_reset = sim.stats()
    assert full["requests"] == {"total": 3, "by_result": {"1001": 3}}
    assert full["msisdns"] == {"447700900001": 2, "447700900002": 1, "447700900003": 1}
    assert full["correlation_ids"] == {"c0": 1, "c1": 1, "d0": 1}
    assert full["destinations"]["duplicate_msisdns"] == 1
    assert full["destinations"]["distinct_msisdns"] == 3
    assert full["keys"]["a"]["accepted"] == 2
    assert full["keys"]["b"]["accepted"] == 2
    assert sum(full["accepted_per_window"].values()) == 4
    assert "msisdns" not in summary
    assert summary["destinations"] == full["destinations"]
    assert after_reset["destinations"]["accepted"] == 0
    assert after_reset["msisdns"] == {}


async def test_many_destinations_are_counted_exactly(session: aiohttp.ClientSession) -> None:
    async with simulator() as sim:
        for batch in range(20):
            numbers = [f"44770{batch:02d}{n:05d}" for n in range(1000)]
            answer = await post(session, sim, sms(numbers, correlation_prefix=f"b{batch}-"))
            assert len(answer.results) == 1000
        # One number sent again: exactly one duplicate.
        await post(session, sim, sms(["447700000000"], correlation_prefix="again"))
        stats = sim.stats(summary=True)
    assert stats["destinations"]["accepted"] == 20_001
    assert stats["destinations"]["distinct_msisdns"] == 20_000
    assert stats["destinations"]["duplicate_msisdns"] == 1
    assert stats["destinations"]["distinct_correlation_ids"] == 20_001


# --------------------------------------------------------------------------- CLI


async def test_cli_serves_until_sigterm(
    session: aiohttp.ClientSession, tmp_path: Path, campaign_process: Processes
) -> None:
    sim_toml = tmp_path / "sim.toml"
    sim_toml.write_text('keys = ["file-key"]\n[faults.error_7006]\nrequests = [1, 1]\n')
    proc = await campaign_process.start(
        "simulate",
        "--listen",
        "127.0.0.1:0",
        "--config",
        str(sim_toml),
        "--key",
        "cli-key",
        "--set",
        "queued_description=Queued in burst mode",
    )
    try:
        line = await proc.wait_line("listening on")
        assert "listening on http://127.0.0.1:" in line
        base_url = line.rsplit(" ", 1)[1].strip()
        url = base_url + "/resources/v1/messaging"
        body = orjson.dumps(sms())
        answers = []
        for _ in range(2):
            async with session.post(url, data=body, headers={"key": "cli-key"}) as resp:
                answers.append(await resp.json())
        async with session.post(url, data=body, headers={"key": "file-key"}) as resp:
            overridden = await resp.json()
    finally:
        code = await proc.stop(timeout_s=15.0)
    stderr = proc.log()
    assert code == 0, stderr
    assert answers[0]["response"]["code"] == "7006"
    assert answers[1]["response"][0]["description"] == "Queued in burst mode"
    assert overridden["response"]["code"] == "7001"
    assert "simulator_stopped" in stderr
    assert "cli-key" not in stderr


async def test_cli_send_mo_and_config_errors(tmp_path: Path, campaign_process: Processes) -> None:
    async with receiver() as rec:
        sent = await campaign_process.run(
            "simulate",
            "--send-mo",
            "--mo-url",
            rec.url("/mo"),
            "--oa",
            "447700900001",
            "--message",
            "STOP",
            timeout_s=15.0,
        )
    assert sent.returncode == 0
    assert rec.received[0].body["message"] == "STOP"

    refused = await campaign_process.run("simulate", "--set", "dr_batch_size=0", timeout_s=15.0)
    assert refused.returncode == 2
    assert "dr_batch_size" in refused.log()


def test_example_config_shows_every_knob_with_its_default() -> None:
    path = REPO / "simulator.example.toml"
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    # seed has no TOML spelling for its default (None): the file shows it commented out.
    assert set(raw) == {f.name for f in dataclasses.fields(SimulatorConfig)} - {"seed"}
    assert set(raw["faults"]) == {f.name for f in dataclasses.fields(Faults)}
    assert SimulatorConfig.from_toml(path) == SimulatorConfig()


async def test_reports_without_a_transid(session: aiohttp.ClientSession) -> None:
    config = fast_config(dr_interim_ratio=1.0, faults=faults(transid_missing=ALWAYS))
    async with receiver() as rec, simulator(config) as sim:
        answer = await post(
            session,
            sim,
            [
                sms(["447700900001"], notifyurl=rec.url()),
                sms(["447700900002"], notifyurl=rec.url(), correlation_prefix=None),
            ],
        )
        await sim.wait_reports_sent(timeout_s=10)
        stats = sim.stats()
    with_correlation, without_correlation = answer.results
    notifications = [r["deliveryInfoNotification"] for r in rec.reports()]
    mine = [n for n in notifications if n.get("correlationid") == "c0"]
    # Every report of the destination, interim and final, carries only its correlation id.
    assert sorted(n["deliveryInfo"]["code"] for n in mine) == ["7500", "7501"]
    assert all("transid" not in n for n in mine)
    # A destination without a correlation id keeps its transid: nothing else could match it.
    others = [n for n in notifications if "correlationid" not in n]
    assert len(others) == 2
    assert all(n["transid"] == without_correlation["transid"] for n in others)
    assert stats["faults"]["transid_missing"] == 1
    assert stats["transids_omitted"] == {"c0": [with_correlation["transid"]]}
