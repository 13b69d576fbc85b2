"""db.create_pool: a released connection stops listening, without a reset round trip each time."""

from __future__ import annotations

import asyncpg
import pytest

from campaign import db


@pytest.fixture
async def one(dsn: str):
    p = await db.create_pool(dsn, min_size=1, max_size=1)
    try:
        yield p
    finally:
        await p.close()


async def test_release_without_listen_sends_no_reset_query(one: asyncpg.Pool) -> None:
    async with one.acquire() as conn:
        assert await conn.fetchval("SELECT 1") == 1
        assert conn.get_reset_query() == ""


async def test_release_after_listen_unlistens(one: asyncpg.Pool) -> None:
    def heard(*_args: object) -> None:
        pass

    async with one.acquire() as conn:
        await conn.add_listener("pool_test", heard)
        # A channel the server still has (as when UNLISTEN of remove_listener is lost).
        await conn.execute("LISTEN pool_left")
        await conn.remove_listener("pool_test", heard)
        assert "UNLISTEN" in conn.get_reset_query()
    # max_size 1: the same connection comes back, and it no longer listens to anything.
    async with one.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
        assert conn.get_reset_query() == ""
