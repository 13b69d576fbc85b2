"""PostgreSQL access: the only module that imports asyncpg.

Named queries live in `sql/queries/*.sql` and are loaded once into a read-only mapping;
migrations in `sql/migrations/NNNN_name.sql` are applied forward-only under an advisory
lock, so two processes migrating at once are safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import re
import socket
import warnings
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import orjson
import structlog

from campaign import config

if TYPE_CHECKING:
    from campaign.config import Settings

log = structlog.get_logger(__name__)

# An arbitrary constant shared by every campaign process: "campaign" in ASCII.
MIGRATION_LOCK_KEY = 0x63616D706169676E

_NAME_LINE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$")
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

Pool = asyncpg.Pool
Connection = asyncpg.Connection
PoolConnection = asyncpg.pool.PoolConnectionProxy
Record = asyncpg.Record
PostgresError = asyncpg.PostgresError
InterfaceError = asyncpg.InterfaceError
# Raised by a pooled connection whose server side was terminated mid-operation.
InternalClientError = asyncpg.InternalClientError


# Errors that mean "the database is not there right now" (down, restarting, a connection
# killed mid-query, a timeout): loops log them, back off and carry on.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


class SchemaError(Exception):
    """The database schema is not the one this code was built for."""


class QueryError(Exception):
    """A named query is missing or malformed."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def _sql_root() -> Any:
    return importlib.resources.files("campaign.sql")


def parse_queries(text: str, *, source: str = "<sql>") -> dict[str, str]:
    """Split a file into `-- name: x` blocks; each block runs to the next name line."""
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if name is None:
            return
        body = "\n".join(lines).strip()
        if not any(line.strip() and not line.strip().startswith("--") for line in lines):
            raise QueryError(f"{source}: query {name} has no SQL")
        queries[name] = body

    for line in text.splitlines():
        match = _NAME_LINE.match(line)
        if match:
            flush()
            name = match.group(1)
            if name in queries:
                raise QueryError(f"{source}: query {name} is defined twice")
            lines = []
        elif name is not None:
            lines.append(line)
    flush()
    return queries


def load_queries() -> Mapping[str, str]:
    """Every named query shipped with the package, as a read-only mapping."""
    queries: dict[str, str] = {}
    folder = _sql_root() / "queries"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        for name, sql in parse_queries(
            entry.read_text(encoding="utf-8"), source=entry.name
        ).items():
            if name in queries:
                raise QueryError(f"{entry.name}: query {name} is defined in two files")
            queries[name] = sql
    return MappingProxyType(queries)


def require(queries: Mapping[str, str], names: Iterable[str]) -> Mapping[str, str]:
    """The subset of `queries` a role uses; a missing name stops the process at start-up."""
    missing = [n for n in names if n not in queries]
    if missing:
        raise QueryError(f"named queries missing from sql/queries: {', '.join(missing)}")
    return MappingProxyType({n: queries[n] for n in names})


def load_migrations() -> list[Migration]:
    folder = _sql_root() / "migrations"
    migrations = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            sql = entry.read_text(encoding="utf-8")
            migrations.append(Migration(int(match.group(1)), match.group(2), sql))
    migrations.sort(key=lambda m: m.version)
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise SchemaError(f"migrations are not numbered 1..N without gaps: {versions}")
    return migrations


def expected_version() -> int:
    return len(load_migrations())


async def schema_version(conn: asyncpg.Connection) -> int:
    """The highest applied migration, 0 when the schema was never migrated."""
    exists = await conn.fetchval("SELECT to_regclass('campaign.schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    version = await conn.fetchval("SELECT max(version) FROM campaign.schema_migrations")
    return int(version or 0)


async def check_schema(conn: asyncpg.Connection) -> int:
    """Refuse to run against an older or newer schema than this code's."""
    have, want = await schema_version(conn), expected_version()
    if have < want:
        raise SchemaError(
            f"database schema is at version {have}, this code needs {want}: run `campaign migrate`"
        )
    if have > want:
        raise SchemaError(
            f"database schema is at version {have}, newer than this code's {want}: upgrade campaign"
        )
    return have


async def migrate(conn: asyncpg.Connection) -> list[Migration]:
    """Apply pending migrations, each in its own transaction; returns those applied."""
    migrations = load_migrations()
    applied: list[Migration] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE SCHEMA IF NOT EXISTS campaign;
            CREATE TABLE IF NOT EXISTS campaign.schema_migrations (
                version    integer PRIMARY KEY,
                name       text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            """
        )
        done = {
            r["version"] for r in await conn.fetch("SELECT version FROM campaign.schema_migrations")
        }
        if done and max(done) > len(migrations):
            raise SchemaError(
                f"database schema is at version {max(done)}, newer than this "
                f"code's {len(migrations)}: upgrade campaign"
            )
        for migration in migrations:
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO campaign.schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied.append(migration)
            log.info("migration_applied", version=migration.version, name=migration.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied


async def init_connection(conn: asyncpg.Connection) -> None:
    """Per-connection set-up: jsonb as Python objects through orjson."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        format="text",
    )


# asyncpg prepares every statement, and PostgreSQL moves a prepared statement to a generic
# plan after five executions when that looks no dearer. A generic plan made while the
# tables were small outlives their growth until autovacuum analyzes them: the reconciler's
# match plan from a near-empty database took minutes per pass on 300,000 recipients
# (0.14 s planned afresh). Our statements each move up to thousands of rows, so planning
# every execution costs nothing that shows.
# JIT compilation is off: PostgreSQL compiles a statement whose estimated cost passes
# jit_above_cost (with inlining and optimisation past 500,000), and the producer's probe
# for due work, planned with the canary's count over every recipient of a campaign,
# passes that with a few million rows: 330 ms of LLVM on each probe of a 10,000,000-row
# campaign, where the probe itself runs in under 10 ms, and sending fell from 8,300 to
# 3,100 destinations/s (bench, memory stage). None of our statements runs long enough
# for compiled expressions to pay back.
SERVER_SETTINGS = {"plan_cache_mode": "force_custom_plan", "jit": "off"}


class DatabaseConfigError(Exception):
    """The DSN cannot be used as written; the message never holds its password."""


class DatabaseUnreachable(Exception):
    """No PostgreSQL answered at the DSN's address; the message names host and port."""


def dsn_target(dsn: str) -> str:
    """Where a DSN points, `host:port` (or a socket directory), for error messages.

    Raises DatabaseConfigError for a DSN asyncpg would reject with a traceback."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise DatabaseConfigError(
            f"database DSN {describe_dsn(dsn)!r}: expected postgresql://USER@HOST:PORT/DATABASE"
        )
    query = parse_qs(parts.query)
    try:
        port = parts.port or int(query.get("port", ["5432"])[0])
    except ValueError:
        raise DatabaseConfigError(
            f"database DSN {describe_dsn(dsn)!r}: the port is not a number"
        ) from None
    host = parts.hostname or query.get("host", ["localhost"])[0]
    return f"{host}:{port}" if not host.startswith("/") else f"{host} (port {port})"


def _connect_failed(dsn: str, exc: BaseException) -> DatabaseUnreachable:
    reasons: dict[type[BaseException], str] = {
        ConnectionRefusedError: "connection refused",
        socket.gaierror: "host name not found",
        TimeoutError: "no answer in time",
    }
    reason = reasons.get(type(exc), type(exc).__name__)
    return DatabaseUnreachable(f"cannot connect to PostgreSQL at {dsn_target(dsn)}: {reason}")


async def connect(dsn: str, *, timeout_s: float = 10.0) -> asyncpg.Connection:
    dsn_target(dsn)
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout_s, server_settings=SERVER_SETTINGS)
    except (OSError, TimeoutError) as exc:
        raise _connect_failed(dsn, exc) from exc
    except (asyncpg.ClientConfigurationError, ValueError) as exc:
        raise DatabaseConfigError(
            f"database DSN {describe_dsn(dsn)!r}: {_scrub(exc, dsn)}"
        ) from exc
    await init_connection(conn)
    return conn


def _scrub(exc: BaseException, dsn: str) -> str:
    """The error's text without the DSN's password, should the driver quote it."""
    text = str(exc)
    password = urlsplit(dsn).password
    return text.replace(password, "***") if password else text


class _PooledConnection(asyncpg.Connection):
    """A pool connection whose release costs no round trip unless it listened.

    asyncpg resets every released connection with `pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL`: one more round trip per pooled query or transaction (the
    receiver's group commits pay it every time). Our pooled connections take no session
    advisory locks (only migrate does, on a connection of its own; the producer's one is
    transaction-scoped and ends with its transaction), open no cursors and change no
    session settings; LISTEN is the one session state they use, so the full reset runs
    only after one. An open transaction is still rolled back and listener callbacks are
    still dropped on every release (asyncpg does that before asking for this query).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listened = False

    async def add_listener(self, channel: str, callback: Any) -> None:
        self._listened = True
        await super().add_listener(channel, callback)

    def get_reset_query(self) -> str:
        query: str = super().get_reset_query() if self._listened else ""
        return query

    # asyncpg's own signature: the pool calls reset(timeout=...).
    async def reset(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await super().reset(timeout=timeout)
        self._listened = False


async def create_pool(
    dsn: str, *, min_size: int = 2, max_size: int = 10, timeout_s: float = 10.0
) -> asyncpg.Pool:
    dsn_target(dsn)
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout_s,
            server_settings=SERVER_SETTINGS,
            init=init_connection,
            connection_class=_PooledConnection,
        )
    except (OSError, TimeoutError) as exc:
        raise _connect_failed(dsn, exc) from exc
    assert pool is not None
    return pool


def default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("campaign")) / "pgdata"


class EmbeddedServer:
    """A PostgreSQL server run by the `pgserver` package in a data directory of ours."""

    def __init__(self, *, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None

    def start(self) -> str:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver falls back fine.
            warnings.simplefilter("ignore")
            from pgserver import postgres_server

            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._server = postgres_server.get_server(self.data_dir, cleanup_mode="stop")
        dsn = str(self._server.get_uri())
        log.info("embedded_database_started", data_dir=str(self.data_dir))
        return dsn

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[str]:
    """Yield a DSN: the configured one, or an embedded server's started for the duration."""
    dsn = settings.database_dsn
    if dsn:
        yield dsn
        return
    data_dir = Path(settings.database.data_dir) if settings.database.data_dir else None
    server = EmbeddedServer(data_dir=data_dir or default_data_dir())
    dsn = await asyncio.to_thread(server.start)
    try:
        yield dsn
    finally:
        await asyncio.to_thread(server.stop)


def describe_dsn(dsn: str) -> str:
    """The DSN without its password (in any of the places one is written), for output."""
    return config.mask_dsn(dsn)
