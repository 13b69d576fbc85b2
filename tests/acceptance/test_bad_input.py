"""Bad input: each bad recipient or campaign gets a clear error and changes nothing else.

Campaign CHECKs (priority 0 / 4, both or neither of body / template, expires before
send_after) and recipient CHECKs are tested in tests/integration/test_constraints.py;
here the worker meets what the schema lets through.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from campaign.worker import Worker
from tests.helpers.fake_api import FakeApi
from tests.helpers.proc import SERVICE_KEY
from tests.helpers.seed import add_recipients, create_campaign, numbers
from tests.helpers.sending import drain, make_settings


@pytest.fixture
async def api() -> AsyncIterator[FakeApi]:
    async with FakeApi(key=SERVICE_KEY) as fake:
        yield fake


SQL_LIKE = "'; DROP TABLE campaign.recipients; --"

# (msisdn, variables, expected status, expected error_code); the body is
# "Hi $(name) {{link_5}}" for every row with smartlink 5 configured, or a row's own text.
BAD_RECIPIENTS: list[tuple[str, str, dict[str, Any], str, str | None]] = [
    ("malformed number", "91-98ab-12345", {"name": "A"}, "invalid", "invalid_msisdn"),
    ("empty number", "", {"name": "A"}, "invalid", "invalid_msisdn"),
    ("30 digits", "9" * 30, {"name": "A"}, "invalid", "invalid_msisdn"),
    ("SQL-looking number", SQL_LIKE, {"name": "A"}, "invalid", "invalid_msisdn"),
    ("unknown country code", "+999123456789", {"name": "A"}, "invalid", "invalid_msisdn"),
    ("missing variable", "919800000001", {}, "invalid", "missing_variable"),
    ("variable not text", "919800000002", {"name": {"x": 1}}, "invalid", "invalid_variable"),
    ("too long", "919800000003", {"name": "x" * 1100}, "invalid", "text_too_long"),
    ("SQL-looking variable", "919800000004", {"name": SQL_LIKE}, "queued", None),
    ("emoji variable", "919800000005", {"name": "Zoë 🎉"}, "queued", None),
    ("foreign international", "+447911123456", {"name": "A"}, "queued", None),
]


async def test_bad_recipients_get_a_clear_error_and_the_rest_are_sent(
    api: FakeApi, conn: asyncpg.Connection, dsn: str
) -> None:
    cid = await create_campaign(
        conn, body="Hi $(name) {{link_5}}", smartlinks=[{"linkid": 5, "validity": 60}]
    )
    good = numbers(5, start=100)
    ids = await add_recipients(
        conn,
        cid,
        [m for _, m, _, _, _ in BAD_RECIPIENTS] + good,
        [v for _, _, v, _, _ in BAD_RECIPIENTS] + [{"name": "Ann"}] * len(good),
    )
    settings = make_settings(api.base_url, service={"default_region": "IN"})
    assert await drain(settings, dsn) == 0

    rows = {
        r["id"]: r
        for r in await conn.fetch("SELECT * FROM campaign.recipients WHERE campaign_id = $1", cid)
    }
    for (case, _, _, status, code), rid in zip(BAD_RECIPIENTS, ids, strict=False):
        row = rows[rid]
        assert (row["status"], row["error_code"]) == (status, code), case
        if status == "invalid":
            assert row["error_message"], f"{case}: no message for people"
    for rid in ids[len(BAD_RECIPIENTS) :]:
        assert rows[rid]["status"] == "queued"
    sent = {msisdn: text for r in api.requests for msisdn, _, text in r.destinations}
    # Nothing invalid reached the API; the rest went with their text intact.
    assert len(sent) == len(good) + 3
    assert sent["919800000004"] == f"Hi {SQL_LIKE} {{{{link_5}}}}"
    assert sent["919800000005"] == "Hi Zoë 🎉 {{link_5}}"
    assert sent["447911123456"] == "Hi A {{link_5}}"
    emoji = rows[ids[9]]
    assert (emoji["encoding"], emoji["msisdn_e164"]) == ("ucs2", "+919800000005")
    # The SQL-looking values were data, never SQL: the table and its rows are all there.
    assert await conn.fetchval("SELECT count(*) FROM campaign.recipients") == len(ids)


async def test_smartlink_placeholder_without_its_link_is_invalid(
    api: FakeApi, conn: asyncpg.Connection, dsn: str
) -> None:
    cid = await create_campaign(conn, body="Gift {{link_9}}")
    other = await create_campaign(conn, body="Plain")
    await add_recipients(conn, cid, numbers(2))
    await add_recipients(conn, other, numbers(2, start=50))
    assert await drain(make_settings(api.base_url), dsn) == 0
    rows = await conn.fetch(
        "SELECT campaign_id, status, error_code, error_message FROM campaign.recipients"
    )
    linked = [r for r in rows if r["campaign_id"] == cid]
    assert {(r["status"], r["error_code"]) for r in linked} == {("invalid", "unknown_smartlink")}
    assert "9" in linked[0]["error_message"]
    assert {r["status"] for r in rows if r["campaign_id"] == other} == {"queued"}
    assert api.destinations() == 2


async def test_variables_that_are_not_an_object_are_refused_by_the_database(
    conn: asyncpg.Connection,
) -> None:
    cid = await create_campaign(conn)
    for value in ("[1, 2]", '"text"', "42", "null"):
        with pytest.raises(asyncpg.CheckViolationError) as info:
            await conn.execute(
                "INSERT INTO campaign.recipients (campaign_id, msisdn, variables) "
                "VALUES ($1, '919800000000', $2::jsonb)",
                cid,
                value,
            )
        assert info.value.constraint_name == "recipients_variables_check"
    assert await conn.fetchval("SELECT count(*) FROM campaign.recipients") == 0


async def test_campaign_on_an_unknown_service_is_logged_once_and_left_alone(
    api: FakeApi, conn: asyncpg.Connection, dsn: str
) -> None:
    stray = await create_campaign(conn, service="no-such-service")
    good = await create_campaign(conn)
    await add_recipients(conn, stray, numbers(3))
    await add_recipients(conn, good, numbers(3, start=10))
    settings = make_settings(api.base_url)
    with capture_logs() as logs:
        worker = Worker(settings=settings, dsn=dsn, drain=True)
        assert await worker.run() == 0

    errors = [e for e in logs if e["event"] == "campaign_service_unknown"]
    assert len(errors) == 1, "one line per campaign, not one per poll"
    assert errors[0]["campaign_id"] == stray
    assert errors[0]["service"] == "no-such-service"
    assert errors[0]["log_level"] == "error"
    # Another worker may send for that service: its recipients are not touched.
    stray_rows = await conn.fetch(
        "SELECT status FROM campaign.recipients WHERE campaign_id = $1", stray
    )
    assert {r["status"] for r in stray_rows} == {"pending"}
    assert (
        await conn.fetchval("SELECT status FROM campaign.campaigns WHERE id = $1", stray) == "ready"
    )
    good_rows = await conn.fetch(
        "SELECT status FROM campaign.recipients WHERE campaign_id = $1", good
    )
    assert {r["status"] for r in good_rows} == {"queued"}
