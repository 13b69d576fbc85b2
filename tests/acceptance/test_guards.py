"""Guard rails through the whole sending path: `campaign check` predicts what the workers
then do, and the frequency cap holds with three workers sending two campaigns at once."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from zoneinfo import ZoneInfo

import asyncpg
import orjson
import pytest

from campaign import config
from campaign.commands import check
from campaign.statuses import NOT_SENT
from tests.helpers.fake_api import FakeApi
from tests.helpers.proc import SERVICE_KEY
from tests.helpers.seed import add_recipients, create_campaign, numbers, statuses
from tests.helpers.sending import drain, make_settings

# A curly apostrophe: not GSM-7, it turns the whole text UCS-2.
CURLY = "\u2019"


@pytest.fixture
async def api() -> AsyncIterator[FakeApi]:
    async with FakeApi(key=SERVICE_KEY) as fake:
        yield fake


def capped_settings(
    api: FakeApi, dsn: str, *, max_per_msisdn: int, **worker: str
) -> config.Settings:
    settings = make_settings(api.base_url, worker=worker or None)
    return dataclasses.replace(
        settings,
        policy=config.PolicySettings(max_per_msisdn=max_per_msisdn),
        pricing=config.PricingSettings(currency="EUR", default=0.01, countries={"91": 0.002}),
        database=dataclasses.replace(settings.database, dsn=dsn),
    )


async def test_check_counts_what_the_workers_then_do(
    api: FakeApi, conn: asyncpg.Connection, dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = capped_settings(api, dsn, max_per_msisdn=1)
    # An earlier campaign reached five numbers: under a cap of 1 they are capped now.
    earlier = await create_campaign(conn)
    await add_recipients(conn, earlier, numbers(5))
    assert await drain(settings, dsn) == 0

    cid = await create_campaign(conn, body=f"Hi $(name), it{CURLY}s your day", status="draft")
    msisdns = [
        *numbers(5),  # capped
        *numbers(10, start=100),  # sent
        "919800000100",  # duplicate of the first of those
        "+91 98000 00101",  # duplicate, written another way
        "12",  # invalid number
        "919800000200",  # suppressed
        "919800000201",  # missing variable
    ]
    variables = [{"name": "Ann"}] * (len(msisdns) - 1) + [{}]
    await add_recipients(conn, cid, msisdns, variables)
    await conn.execute("INSERT INTO campaign.suppressions (msisdn) VALUES ('+919800000200')")

    capsys.readouterr()
    args = argparse.Namespace(campaign_id=cid, json=True, sample=2)
    assert await check.cmd_check(args, settings) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["outcomes"] == {
        "send": 10,
        "invalid": 2,
        "suppressed": 1,
        "duplicate": 2,
        "capped": 5,
        "waiting": 0,
        "expired": 0,
    }
    assert {i["code"] for i in report["invalid"]} == {
        "missing_variable",
        report["invalid"][0]["code"],
    }
    assert report["encodings"] == {"ucs2": 10}
    assert report["ucs2_characters"] == {CURLY: 10}
    assert report["total_parts"] == 10
    assert report["cost"] == pytest.approx(10 * 0.002)
    assert (
        len(report["samples"]) == 2
        and report["samples"][0]["text"] == f"Hi Ann, it{CURLY}s your day"
    )
    # Read-only: nothing moved, nothing registered.
    assert await statuses(conn, cid) == {"pending": len(msisdns)}
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM campaign.campaign_numbers WHERE campaign_id = $1", cid
        )
        == 0
    )

    await conn.execute("UPDATE campaign.campaigns SET status = 'ready' WHERE id = $1", cid)
    assert await drain(settings, dsn) == 0
    after = await statuses(conn, cid)
    done = {s: after.get(s, 0) for s in NOT_SENT}
    done["send"] = sum(n for s, n in after.items() if s not in NOT_SENT)
    assert done == {k: n for k, n in report["outcomes"].items() if k not in ("waiting", "expired")}


async def test_check_counts_rows_outside_their_sending_window_as_waiting(
    api: FakeApi, conn: asyncpg.Connection, dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = capped_settings(api, dsn, max_per_msisdn=0)
    # A window that opens two hours from now in India (the numbers' zone): shut now.
    local = dt.datetime.now(ZoneInfo("Asia/Kolkata"))
    start = (local + dt.timedelta(hours=2)).time().replace(second=0, microsecond=0)
    end = (local + dt.timedelta(hours=3)).time().replace(second=0, microsecond=0)
    cid = await create_campaign(conn, status="draft")
    await conn.execute(
        "UPDATE campaign.campaigns SET window_start = $2, window_end = $3 WHERE id = $1",
        cid,
        start,
        end,
    )
    await add_recipients(conn, cid, numbers(4))

    args = argparse.Namespace(campaign_id=cid, json=True, sample=0)
    assert await check.cmd_check(args, settings) == 0
    report = orjson.loads(capsys.readouterr().out)
    assert report["outcomes"]["waiting"] == 4 and report["outcomes"]["send"] == 0

    # The worker does what check said: the rows wait, and check then counts them apart.
    await conn.execute("UPDATE campaign.campaigns SET status = 'ready' WHERE id = $1", cid)
    assert await drain(settings, dsn) == 0
    assert await statuses(conn, cid) == {"pending": 4}
    capsys.readouterr()
    assert await check.cmd_check(args, settings) == 0
    again = orjson.loads(capsys.readouterr().out)
    assert again["checked"] == 0 and again["already_waiting"] == 4
    first = await conn.fetchval(
        "SELECT min(next_attempt_at) FROM campaign.recipients WHERE campaign_id = $1", cid
    )
    assert again["next_at"] == first.isoformat()


async def test_check_exits_2_on_a_bad_id_or_an_unknown_service(
    api: FakeApi, conn: asyncpg.Connection, dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = capped_settings(api, dsn, max_per_msisdn=0)
    args = argparse.Namespace(campaign_id=999_999, json=False, sample=0)
    assert await check.cmd_check(args, settings) == 2
    assert "campaign 999999: not found" in capsys.readouterr().err
    cid = await create_campaign(conn, service="nosuch", status="draft")
    args = argparse.Namespace(campaign_id=cid, json=False, sample=0)
    assert await check.cmd_check(args, settings) == 2
    assert "service 'nosuch' is not in the config" in capsys.readouterr().err


async def test_the_cap_holds_with_three_workers_sending_two_campaigns(
    api: FakeApi, conn: asyncpg.Connection, dsn: str
) -> None:
    shared = numbers(300)
    first = await create_campaign(conn)
    second = await create_campaign(conn)
    await add_recipients(conn, first, shared)
    await add_recipients(conn, second, list(reversed(shared)))
    workers = [capped_settings(api, dsn, max_per_msisdn=1, worker_id=f"w{i}") for i in range(3)]
    assert await asyncio.gather(*(drain(s, dsn, timeout_s=120.0) for s in workers)) == [0, 0, 0]
    per_number = await conn.fetch(
        "SELECT msisdn, count(*) FILTER (WHERE status = 'queued') AS accepted,"
        " count(*) FILTER (WHERE status = 'capped') AS capped"
        " FROM campaign.recipients GROUP BY msisdn"
    )
    assert len(per_number) == 300
    assert all(r["accepted"] == 1 and r["capped"] == 1 for r in per_number)
    # What reached the API: each number once.
    sent = [d[0] for r in api.requests if r.accepted for d in r.destinations]
    assert sorted(sent) == sorted(shared)
