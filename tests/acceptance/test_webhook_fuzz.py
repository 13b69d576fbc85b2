"""Fuzzed bodies over HTTP: never a 500, never a crash, every unparseable body kept."""

from __future__ import annotations

import io
import random
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import orjson
import pytest

from tests.helpers.webhooks import TOKEN, dr, mo, raw_exchange, running_server

MIB = 1024 * 1024


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def fuzz_bodies(rng: random.Random) -> list[tuple[str, bytes, str]]:
    """(case, body, content type): junk of every kind, all bounded in size."""
    documented = orjson.dumps(dr("T-1"))
    cases: list[tuple[str, bytes, str]] = [
        (f"random {n}", rng.randbytes(rng.randrange(1, 4096)), "application/json")
        for n in range(25)
    ]
    cases += [(f"mutated {n}", _mutate(documented, rng), "application/json") for n in range(25)]
    cases += [
        ("deep arrays", b"[" * 100_000 + b"]" * 100_000, "application/json"),
        ("deep objects", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "application/json"),
        ("huge float", documented.replace(b'"7500"', b"1e400"), "application/json"),
        ("huge integer", documented.replace(b'"7500"', b"9" * 5000), "application/json"),
        (
            "huge messageCount",
            orjson.dumps(dr("T-2", messageCount=0)).replace(
                b'"messageCount":0', b'"messageCount":' + b"9" * 400
            ),
            "application/json",
        ),
        ("ten megabytes of junk", rng.randbytes(10 * MIB), "application/json"),
        ("ten megabytes of JSON", b'["' + b"x" * (10 * MIB) + b'"]', "application/json"),
        ("empty", b"", "application/json"),
        ("NUL bytes in strings", documented.replace(b"T-1", b"T\\u0000-1"), "application/json"),
        ("invalid UTF-8", documented.replace(b"T-1", b"T-\xff\xfe"), "application/json"),
        ("form content type", b"code=7500&transid=x", "application/x-www-form-urlencoded"),
        ("text content type", b"hello", "text/plain"),
        ("xml content type", b"<deliveryInfo><code>7500</code></deliveryInfo>", "text/xml"),
    ]
    return cases


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randrange(1, 8)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


@pytest.mark.parametrize("kind", ["dr", "mo"])
async def test_fuzzed_bodies_never_500_and_every_reject_is_kept(
    kind: str, pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    rng = random.Random(8 if kind == "dr" else 9)
    answers: dict[str, int] = {}
    rejected: list[bytes] = []
    async with running_server(pool, max_body_bytes=16 * MIB) as server:
        url = f"{server.url}/webhooks/{kind}/{TOKEN}"
        for case, body, content_type in fuzz_bodies(rng):
            headers = {"Content-Type": content_type}
            async with http.post(url, data=io.BytesIO(body), headers=headers) as resp:
                answers[case] = resp.status
                await resp.read()
            if resp.status == 400:
                rejected.append(body)
        # Still alive and still storing after all that.
        good = orjson.dumps(dr("after-fuzz") if kind == "dr" else mo("919800000001", "hi"))
        async with http.post(url, data=good) as resp:
            assert resp.status == 200
        async with http.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200

    assert all(status in (200, 400) for status in answers.values()), answers
    assert answers["ten megabytes of junk"] == 400
    assert answers["deep arrays"] == 400 and answers["huge float"] == 400
    kept = await conn.fetch(
        "SELECT kind, reason, content_type, body FROM campaign.webhook_rejects ORDER BY id"
    )
    assert [bytes(r["body"]) for r in kept] == rejected
    assert all(r["kind"] == kind and r["reason"] for r in kept)


async def test_bodies_over_the_limit_are_413_and_the_server_lives_on(
    pool: asyncpg.Pool, http: aiohttp.ClientSession
) -> None:
    async with running_server(pool, max_body_bytes=MIB) as server:
        url = f"{server.url}/webhooks/dr/{TOKEN}"
        for size in (MIB + 1, 10 * MIB):
            async with http.post(url, data=io.BytesIO(b"x" * size)) as resp:
                assert resp.status == 413
        async with http.post(url, data=orjson.dumps(dr("still-ok"))) as resp:
            assert resp.status == 200


def _deep(depth: int, leaf: bytes) -> bytes:
    return b'{"a":' * depth + leaf + b"}" * depth


@pytest.mark.parametrize("kind", ["dr", "mo"])
async def test_deep_bodies_with_and_without_nul_are_400_and_kept(
    kind: str, pool: asyncpg.Pool, conn: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    # ~600 levels: under orjson's own limit, over what a recursive walk of Python survives.
    with_nul = _deep(600, b'"x\\u0000y"')
    deep_extra = orjson.dumps(dr("T-deep")).replace(
        b'"callbackData":"cb"', b'"callbackData":"cb","additionalInfo":' + _deep(600, b"1")
    )
    assert b"additionalInfo" in deep_extra
    answers = []
    async with running_server(pool) as server:
        url = f"{server.url}/webhooks/{kind}/{TOKEN}"
        for body in (with_nul, deep_extra):
            async with http.post(url, data=body) as resp:
                answers.append(resp.status)
    assert answers == [400, 400]
    kept = await conn.fetch("SELECT kind, reason, body FROM campaign.webhook_rejects ORDER BY id")
    assert [bytes(r["body"]) for r in kept] == [with_nul, deep_extra]
    assert "NUL" in kept[0]["reason"] and "deep" in kept[1]["reason"]
    assert await conn.fetchval("SELECT count(*) FROM campaign.delivery_reports") == 0


async def test_signature_header_that_is_not_utf8_is_403(pool: asyncpg.Pool) -> None:
    body = orjson.dumps(dr("T-sig"))
    async with running_server(pool, hmac_secret="a-signing-secret") as server:
        head = (
            f"POST /webhooks/dr/{TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n"
        ).encode()
        answer = await raw_exchange(
            server.url, head + b"X-Hub-Signature: sha256=\xff\xfe\xc3\x28\r\n\r\n" + body
        )
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line == b"HTTP/1.1 403 Forbidden", answer[:200]
        # The receiver lives on.
        assert (
            await raw_exchange(
                server.url, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            )
        ).startswith(b"HTTP/1.1 200")


async def test_content_type_that_is_not_utf8_is_kept_with_the_reject(
    pool: asyncpg.Pool, conn: asyncpg.Connection
) -> None:
    body = b"not json"
    async with running_server(pool) as server:
        answer = await raw_exchange(
            server.url,
            (
                f"POST /webhooks/mo/{TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            ).encode()
            + b"Content-Type: text/\xff\xfe\r\n\r\n"
            + body,
        )
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    row = await conn.fetchrow("SELECT kind, content_type, body FROM campaign.webhook_rejects")
    assert (row["kind"], bytes(row["body"])) == ("mo", body)
    assert row["content_type"].startswith("text/")
