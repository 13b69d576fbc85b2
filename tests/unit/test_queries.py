import pytest

from campaign import db


def test_parse_queries_splits_named_blocks_and_keeps_comments() -> None:
    text = """
-- header comment, not part of any query
-- name: first
-- why it exists
SELECT 1;

-- name: second
SELECT $1::int;
"""
    queries = db.parse_queries(text)
    assert list(queries) == ["first", "second"]
    assert queries["first"].endswith("SELECT 1;")
    assert queries["second"] == "SELECT $1::int;"


def test_parse_queries_rejects_duplicates_and_empty_blocks() -> None:
    with pytest.raises(db.QueryError, match="defined twice"):
        db.parse_queries("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;")
    with pytest.raises(db.QueryError, match="has no SQL"):
        db.parse_queries("-- name: a\n-- only a comment\n")


def test_require_names_every_missing_query() -> None:
    queries = db.load_queries()
    assert "control_pause" in queries
    with pytest.raises(db.QueryError, match="no_such_query"):
        db.require(queries, ["control_pause", "no_such_query"])
    subset = db.require(queries, ["control_pause"])
    with pytest.raises(TypeError):
        subset["x"] = "SELECT 1"  # type: ignore[index]


def test_migrations_are_numbered_without_gaps() -> None:
    versions = [m.version for m in db.load_migrations()]
    assert versions == list(range(1, len(versions) + 1))


def test_describe_dsn_hides_the_password() -> None:
    assert db.describe_dsn("postgresql://app:s3cret@db:5432/x") == "postgresql://app:***@db:5432/x"
    assert db.describe_dsn("postgresql://app@db/x") == "postgresql://app@db/x"
    # The forms that leaked: a query parameter, an unencoded '@', a key=value string.
    assert db.describe_dsn("postgresql://app@db/prod?password=S3cretPw") == (
        "postgresql://app@db/prod?password=***"
    )
    assert db.describe_dsn("postgresql://app:p@ss@db/x") == "postgresql://app:***@db/x"
    assert db.describe_dsn("host=db password=S3cretPw") == "host=db password=***"
