"""Test fixtures: a real PostgreSQL always.

`CAMPAIGN_TEST_DSN` names a server (CI uses the machine's PostgreSQL 15); without it an
embedded server is started for the session. A template database is migrated once per
session and every test that asks for `dsn` gets its own copy of it.

`campaign_process` starts real `python -m campaign` processes (tests/helpers/proc.py) and
kills every one still running when the test ends.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from campaign import db
from tests.helpers.faults import Row, summary_table
from tests.helpers.proc import Processes, processes

_counter = itertools.count()


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """A DSN of a server where tests may create databases."""
    env = os.environ.get("CAMPAIGN_TEST_DSN")
    if env:
        yield env
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        tmp = Path(tempfile.mkdtemp(prefix="campaign-test-pg-"))
        server = pgserver.get_server(tmp, cleanup_mode="delete")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
async def template_dsn(pg_server_dsn: str) -> AsyncIterator[str]:
    name = f"campaign_tpl_{os.getpid()}"
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = with_database(pg_server_dsn, name)
        conn = await db.connect(dsn)
        try:
            await db.migrate(conn)
        finally:
            await conn.close()
        yield dsn
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _copy_database(server_dsn: str, template: str) -> tuple[str, str]:
    name = f"campaign_t_{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(
            f'CREATE DATABASE "{name}" TEMPLATE "{urlsplit(template).path.lstrip("/")}"'
        )
    finally:
        await admin.close()
    return name, with_database(server_dsn, name)


async def _drop_database(server_dsn: str, name: str) -> None:
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def dsn(pg_server_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    """A freshly migrated database of this test's own."""
    name, test_dsn = await _copy_database(pg_server_dsn, template_dsn)
    try:
        yield test_dsn
    finally:
        await _drop_database(pg_server_dsn, name)


@pytest.fixture
async def empty_dsn(pg_server_dsn: str) -> AsyncIterator[str]:
    """An empty database (no schema), for migration tests."""
    name = f"campaign_e_{os.getpid()}_{next(_counter)}"
    admin = await asyncpg.connect(pg_server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(pg_server_dsn, name)
    finally:
        await _drop_database(pg_server_dsn, name)


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await db.connect(dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(dsn, min_size=1, max_size=10)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def campaign_process(tmp_path: Path) -> AsyncIterator[Processes]:
    """`await campaign_process.start("worker", config=cfg, dsn=dsn)` / `.run("status", ...)`:
    output in tmp_path, one environment policy, every process killed at teardown."""
    async with processes(tmp_path) as started:
        yield started


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The slow tests (faults, soak) first: pytest-xdist workers then share out the short
    # ones at the end instead of one worker finishing a long test alone.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# The fault matrix's table and the soak's figures, printed at the end of the run. They
# come in the tests' reports (tests/faults/conftest.py), so this works in the process that
# prints, with or without pytest-xdist workers; hence these hooks live in the root conftest,
# which that process always loads.
_FAULT_ROWS: list[Row] = []
_SOAK_LINES: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "teardown":
        return
    for name, value in report.user_properties:
        if name == "fault_row":
            _FAULT_ROWS.append(Row(*value))
        elif name == "soak_line":
            _SOAK_LINES.append(str(value))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FAULT_ROWS:
        terminalreporter.section("fault matrix")
        terminalreporter.write_line(summary_table(_FAULT_ROWS))
    if _SOAK_LINES:
        terminalreporter.section("soak")
        for line in _SOAK_LINES:
            terminalreporter.write_line(line)
