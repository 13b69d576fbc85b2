import re

import asyncpg
import pytest

from campaign import statuses


async def _campaign(conn: asyncpg.Connection, **overrides: object) -> int:
    values = {"name": "c", "service": "default", "body": "hello"} | overrides
    cols = ", ".join(values)
    params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    return int(
        await conn.fetchval(
            f"INSERT INTO campaign.campaigns ({cols}) VALUES ({params}) RETURNING id",
            *values.values(),
        )
    )


async def test_campaign_defaults(conn: asyncpg.Connection) -> None:
    cid = await _campaign(conn)
    row = await conn.fetchrow("SELECT * FROM campaign.campaigns WHERE id = $1", cid)
    assert row["status"] == "draft"
    assert row["priority"] == 2
    assert row["smartlinks"] == []


@pytest.mark.parametrize(
    ("overrides", "constraint"),
    [
        ({"status": "sending"}, "campaigns_status_check"),
        ({"priority": 0}, "campaigns_priority_check"),
        ({"priority": 4}, "campaigns_priority_check"),
        ({"body": None}, "campaigns_body_or_template_check"),
        ({"template_id": "7"}, "campaigns_body_or_template_check"),
        ({"body": "x" * 1025}, "campaigns_body_length_check"),
        ({"smartlinks": {"linkid": 5}}, "campaigns_smartlinks_check"),
        ({"callback_data": "x" * 2001}, "campaigns_callback_data_check"),
    ],
)
async def test_campaign_constraints_reject_bad_rows(
    conn: asyncpg.Connection, overrides: dict[str, object], constraint: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await _campaign(conn, **overrides)
    assert info.value.constraint_name == constraint


async def test_campaign_window_must_be_ordered(conn: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await conn.execute(
            "INSERT INTO campaign.campaigns (name, service, body, send_after, expires_at) "
            "VALUES ('c', 's', 'b', now(), now() - interval '1 hour')"
        )
    assert info.value.constraint_name == "campaigns_window_check"


async def test_recipient_defaults_and_constraints(conn: asyncpg.Connection) -> None:
    cid = await _campaign(conn)
    row = await conn.fetchrow(
        "INSERT INTO campaign.recipients (campaign_id, msisdn) VALUES ($1, '919812345678') "
        "RETURNING *",
        cid,
    )
    assert row["status"] == "pending"
    assert row["variables"] == {}
    assert 1 <= len(row["correlation_id"].encode()) <= 50
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await conn.execute(
            "INSERT INTO campaign.recipients (campaign_id, msisdn, status) "
            "VALUES ($1, '1', 'sent')",
            cid,
        )
    assert info.value.constraint_name == "recipients_status_check"
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await conn.execute(
            "INSERT INTO campaign.recipients (campaign_id, msisdn, variables) "
            "VALUES ($1, '1', '[1, 2]')",
            cid,
        )
    assert info.value.constraint_name == "recipients_variables_check"
    assert row["correlation_id"] == f"r{row['id']}"
    with pytest.raises(asyncpg.GeneratedAlwaysError):
        await conn.execute(
            "INSERT INTO campaign.recipients (campaign_id, msisdn, correlation_id) "
            "VALUES ($1, '1', 'mine')",
            cid,
        )
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute(
            "INSERT INTO campaign.recipients (campaign_id, msisdn) VALUES (999999, '1')"
        )


async def test_suppressions_take_e164_with_plus_only(conn: asyncpg.Connection) -> None:
    await conn.execute("INSERT INTO campaign.suppressions (msisdn) VALUES ('+919812345678')")
    for bad in ("919812345678", "+0123456789", "+12", "+1234567890123456", "'; DROP TABLE x"):
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO campaign.suppressions (msisdn) VALUES ($1)", bad)


async def test_inserts_notify_the_worker_once_per_statement(
    conn: asyncpg.Connection, dsn: str
) -> None:
    import asyncio

    listener = await asyncpg.connect(dsn)
    got: list[str] = []
    await listener.add_listener("campaign_work", lambda *args: got.append(args[3]))
    try:
        cid = await _campaign(conn)
        await conn.execute(
            "INSERT INTO campaign.recipients (campaign_id, msisdn) "
            "SELECT $1, '9198' || g FROM generate_series(100000, 100999) g",
            cid,
        )
        await conn.execute("UPDATE campaign.campaigns SET status = 'ready' WHERE id = $1", cid)
        # A safety limit: a busy machine delivers the notifications late, never not at all.
        async with asyncio.timeout(30):
            while len(got) < 3:
                await asyncio.sleep(0.02)
        assert got == ["campaigns", "recipients", "campaigns"]
    finally:
        await listener.close()


async def test_recipients_added_to_a_completed_campaign_reopen_it(conn: asyncpg.Connection) -> None:
    done = await _campaign(conn, status="completed")
    other = await _campaign(conn, status="completed")
    await conn.execute(
        "UPDATE campaign.campaigns SET completed_at = now() WHERE id = ANY($1::bigint[])",
        [done, other],
    )
    await conn.execute(
        "INSERT INTO campaign.recipients (campaign_id, msisdn) VALUES ($1, '+919812345678')", done
    )
    rows = await conn.fetch(
        "SELECT id, status, completed_at FROM campaign.campaigns WHERE id = ANY($1::bigint[])",
        [done, other],
    )
    by_id = {r["id"]: r for r in rows}
    assert by_id[done]["status"] == "running" and by_id[done]["completed_at"] is None
    assert by_id[other]["status"] == "completed"


@pytest.mark.parametrize(
    ("constraint", "vocabulary"),
    [
        ("recipients_status_check", statuses.RECIPIENT_STATUSES),
        ("campaigns_status_check", statuses.CAMPAIGN_STATUSES),
        ("batches_status_check", statuses.BATCH_STATUSES),
    ],
)
async def test_status_checks_hold_the_vocabulary_of_statuses_py(
    conn: asyncpg.Connection, constraint: str, vocabulary: tuple[str, ...]
) -> None:
    definition = await conn.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = $1", constraint
    )
    assert definition is not None, constraint
    assert set(re.findall(r"'([a-z_]+)'::text", definition)) == set(vocabulary)
