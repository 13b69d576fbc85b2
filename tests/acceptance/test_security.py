"""Security: the token is compared in constant time; a whole run as a least-privileged
database role (the GRANTs of docs/security.md) works and prints no secret anywhere."""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from campaign import webhooks
from tests.helpers.proc import Processes, free_port, wait_until, webhooks_at, write_config
from tests.helpers.seed import add_recipients, create_campaign, numbers
from tests.helpers.webhooks import TOKEN, dr, running_server

DOCS = Path(__file__).resolve().parents[2] / "docs" / "security.md"
SERVICE_KEY = "svc-key-Zq81-secret"
WEBHOOK_TOKEN = "hook-token-Xy72-secret"
DB_PASSWORD = "db-pass-Uk54-secret"
SECRETS = (SERVICE_KEY, WEBHOOK_TOKEN, DB_PASSWORD)


async def test_token_is_compared_in_constant_time(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(webhooks.hmac, "compare_digest", spy)
    async with running_server(pool) as server, aiohttp.ClientSession() as http:
        for token in ("wrong-token", TOKEN):
            async with http.post(f"{server.url}/webhooks/dr/{token}", json=dr("t1")) as resp:
                assert resp.status == (200 if token == TOKEN else 404)
    assert (b"wrong-token", TOKEN.encode()) in compared
    assert (TOKEN.encode(), TOKEN.encode()) in compared


def grant_statements(role: str, password: str) -> list[str]:
    """The GRANT block of docs/security.md, for `role`: the docs are what is tested."""
    block = re.search(r"```sql\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    assert block, "docs/security.md has no sql block"
    sql = block.group(1).replace("campaign_worker", role).replace("change-me", password)
    return [s.strip() for s in sql.split(";") if s.strip()]


@pytest.fixture
async def worker_dsn(dsn: str, conn: asyncpg.Connection) -> AsyncIterator[str]:
    """A DSN for a new login role with exactly the documented grants (no superuser)."""
    role = f"campaign_worker_{os.getpid()}"
    await conn.execute(f'DROP ROLE IF EXISTS "{role}"')
    for statement in grant_statements(role, DB_PASSWORD):
        await conn.execute(statement)
    parts = urlsplit(dsn)
    # The embedded server's DSN names a socket directory in its query (no host part).
    where = f"{parts.hostname}:{parts.port or 5432}" if parts.hostname else ""
    netloc = f"{role}:{DB_PASSWORD}@{where}"
    try:
        yield urlunsplit(parts._replace(netloc=netloc))
    finally:
        await conn.execute(f'DROP OWNED BY "{role}"')
        await conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def refused_dsn(dsn: str) -> str:
    """The same role and password at a loopback port nothing listens on."""
    parts = urlsplit(dsn)
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{free_port()}"
    return urlunsplit(parts._replace(netloc=netloc, query=""))


def secure_config(path: Path, *, dsn: str, base_url: str, port: int) -> Path:
    """The DSN in the file (the environment has none), the secrets above, debug logs."""
    return write_config(
        path,
        database={"dsn": dsn, "pool_max": 4, "connect_timeout_s": 3.0},
        api={"base_url": base_url},
        services={"default": {"key": SERVICE_KEY, "sender_id": "SECURE"}},
        producer={"poll_interval_s": 0.1, "recovery_interval_s": 0.5},
        webhooks=webhooks_at(port) | {"token": WEBHOOK_TOKEN},
        logging={"level": "debug"},
    )


async def sql_true(conn: asyncpg.Connection, sql: str) -> None:
    async def check() -> bool:
        return bool(await conn.fetchval(sql))

    await wait_until(check, interval_s=0.1, what=sql)


async def test_full_run_as_a_least_privileged_role_prints_no_secret(
    conn: asyncpg.Connection, worker_dsn: str, tmp_path: Path, campaign_process: Processes
) -> None:
    role = urlsplit(worker_dsn).username
    assert not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = $1", role)
    cid = await create_campaign(conn, body="Hello $(name)")
    await add_recipients(conn, cid, numbers(200), [{"name": "Ann"}] * 200)

    sim_port, hook_port = free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    config = secure_config(tmp_path / "c.toml", dsn=worker_dsn, base_url=sim_url, port=hook_port)
    # No dsn: the processes find the restricted role's DSN in the config file only.
    simulator = await campaign_process.start(
        "simulate", "--listen", f"127.0.0.1:{sim_port}",
        "--key", SERVICE_KEY, "--set", "dr_delay_max_s=0.1", "--set", "dr_batch_size=50",
    )  # fmt: skip
    worker = await campaign_process.start("worker", config=config)
    processes = [simulator, worker]
    try:
        await simulator.wait_http(f"{sim_url}/simulate/stats")
        await worker.wait_http(f"http://127.0.0.1:{hook_port}/healthz")
        mo_url = f"http://127.0.0.1:{hook_port}/webhooks/mo/{WEBHOOK_TOKEN}"
        async with aiohttp.ClientSession() as http:
            body = {"oa": "919899999999", "message": "STOP", "url": mo_url}
            async with http.post(f"{sim_url}/simulate/mo", json=body) as resp:
                assert (await resp.json())["status"] == 200
            wrong = f"http://127.0.0.1:{hook_port}/webhooks/dr/not-the-token"
            async with http.post(wrong, json=dr("x")) as resp:
                assert resp.status == 404
        # Claims, sends, reports, matching and completion all ran as the restricted role.
        await sql_true(
            conn,
            f"SELECT status = 'completed' FROM campaign.campaigns WHERE id = {cid}",
        )
        await sql_true(conn, "SELECT count(*) = 1 FROM campaign.suppressions")
    finally:
        for process in processes:
            assert await process.stop() == 0, process.output()[-3000:]

    delivered = await conn.fetchval(
        "SELECT count(*) FROM campaign.recipients WHERE status = 'delivered'"
    )
    assert delivered == 200
    run = campaign_process.run
    runs = [
        await run("status", config=config, name="status"),
        await run("status", "--json", config=config, name="status-json"),
        await run("status", str(cid), config=config, name="status-one"),
        # An MO to a dead receiver: the simulator's failure lines must not show the URL's token.
        await run(
            "simulate",
            "--send-mo",
            "--oa",
            "919800000001",
            "--message",
            "STOP",
            "--mo-url",
            f"http://127.0.0.1:{free_port()}/webhooks/mo/{WEBHOOK_TOKEN}",
            name="send-mo",
        ),
    ]
    assert [r.returncode for r in runs] == [0, 0, 0, 1]
    assert "completed" in runs[0].output()
    # The database refusing the connection: the error line names no password.
    broken = secure_config(
        tmp_path / "broken.toml",
        dsn=refused_dsn(worker_dsn),
        base_url=sim_url,
        port=hook_port,
    )
    failed = await run("worker", config=broken, name="worker-no-db")
    assert failed.returncode != 0
    assert "command_failed" in failed.output() or "worker_failed" in failed.output()

    everything = "\n".join(p.output() for p in [*processes, *runs, failed])
    assert "batch_sent" in everything and "mo_received" in everything
    for secret in SECRETS:
        assert secret not in everything, f"a secret leaked into the output: {secret[:4]}..."


@pytest.mark.parametrize(
    "form",
    [
        "query",  # postgresql://user@host/db?password=...: once logged as it was
        "userinfo",  # postgresql://user:p%40ss@host/db: an '@' in the password
    ],
)
async def test_migrate_prints_the_dsn_without_its_password_in_any_form(
    dsn: str, tmp_path: Path, form: str, campaign_process: Processes
) -> None:
    password = "Pw@" + DB_PASSWORD
    parts = urlsplit(dsn)
    # The test server trusts loopback connections: the password is carried, not checked.
    if form == "query":
        query = "&".join(q for q in (parts.query, f"password={quote(password)}") if q)
        with_password = urlunsplit(parts._replace(query=query))
    else:
        host = parts.netloc.rpartition("@")[2]
        netloc = f"{parts.username}:{quote(password, safe='')}@{host}"
        with_password = urlunsplit(parts._replace(netloc=netloc))
    path = tmp_path / "c.toml"
    path.write_text(f'[database]\ndsn = "{with_password}"\n', encoding="utf-8")
    run = await campaign_process.run("migrate", config=path, name=f"migrate-{form}")
    output = run.output()
    assert run.returncode == 0, output
    (finished,) = [line for line in output.splitlines() if "migrate_finished" in line]
    assert "***" in finished and parts.path in finished
    assert DB_PASSWORD not in output and quote(password, safe="") not in output
