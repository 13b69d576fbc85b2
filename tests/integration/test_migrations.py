import asyncio

import asyncpg
import pytest

from campaign import db


async def test_migrations_apply_on_empty_database_then_do_nothing(empty_dsn: str) -> None:
    conn = await db.connect(empty_dsn)
    try:
        first = await db.migrate(conn)
        second = await db.migrate(conn)
        assert [m.version for m in first] == list(range(1, db.expected_version() + 1))
        assert second == []
        assert await db.schema_version(conn) == db.expected_version()
        assert await db.check_schema(conn) == db.expected_version()
        tables = {
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'campaign'"
            )
        }
        assert {
            "campaigns",
            "recipients",
            "suppressions",
            "batches",
            "delivery_reports",
            "incoming_messages",
            "webhook_rejects",
            "schema_migrations",
        } <= tables
    finally:
        await conn.close()


async def test_two_processes_migrating_at_once_apply_each_migration_once(empty_dsn: str) -> None:
    conns = [await db.connect(empty_dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(db.migrate(c) for c in conns))
        applied = sorted(m.version for r in results for m in r)
        assert applied == list(range(1, db.expected_version() + 1))
        count = await conns[0].fetchval("SELECT count(*) FROM campaign.schema_migrations")
        assert count == db.expected_version()
    finally:
        for c in conns:
            await c.close()


async def test_check_schema_refuses_unmigrated_and_newer_databases(empty_dsn: str) -> None:
    conn = await db.connect(empty_dsn)
    try:
        with pytest.raises(db.SchemaError, match="run `campaign migrate`"):
            await db.check_schema(conn)
        await db.migrate(conn)
        await conn.execute(
            "INSERT INTO campaign.schema_migrations (version, name) VALUES ($1, 'future')",
            db.expected_version() + 1,
        )
        with pytest.raises(db.SchemaError, match="newer than this code"):
            await db.check_schema(conn)
        with pytest.raises(db.SchemaError, match="newer than this code"):
            await db.migrate(conn)
    finally:
        await conn.close()


async def test_every_named_query_prepares_against_the_schema(conn: asyncpg.Connection) -> None:
    queries = db.load_queries()
    assert queries, "no named queries were loaded"
    for name, sql in queries.items():
        try:
            await conn.prepare(sql)
        except asyncpg.PostgresError as exc:  # pragma: no cover - the assertion message
            pytest.fail(f"query {name} does not prepare: {exc}")
