"""A guard: SQL is never built by string formatting in campaign/, and the named queries
take `$n` parameters only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT\s+INTO|UPDATE|DELETE\s+FROM|CREATE|DROP|ALTER|GRANT|COPY|WHERE|VALUES)\b"
)


def _text_of(node: ast.AST) -> str:
    """The literal parts of a string expression (constants and f-string pieces)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text_of(v) for v in node.values)
    return ""


def formatted_sql(source: str) -> list[int]:
    """Line numbers where SQL-looking text is built by f-string, % or .format()."""
    found: list[int] = []
    for node in ast.walk(ast.parse(source)):
        built: ast.AST | None = None
        if isinstance(node, ast.JoinedStr) and any(
            isinstance(v, ast.FormattedValue) for v in node.values
        ):
            built = node
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
            built = node.left
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"
        ):
            built = node.func.value
        if built is not None and SQL_WORDS.search(_text_of(built)):
            found.append(node.lineno)
    return found


def test_the_guard_catches_formatted_sql() -> None:
    assert formatted_sql('q = f"SELECT * FROM t WHERE id = {x}"') == [1]
    assert formatted_sql('q = "DELETE FROM t WHERE id = %s" % x') == [1]
    assert formatted_sql('q = "UPDATE t SET a = {}".format(x)') == [1]
    assert formatted_sql('q = "SELECT 1 FROM t WHERE a = " + x') == [1]
    assert formatted_sql('log.info(f"batch {n} sent")') == []
    assert formatted_sql('await conn.fetch("SELECT * FROM t WHERE id = $1", x)') == []


def test_no_sql_is_built_by_string_formatting_in_the_package() -> None:
    offenders = {
        str(path.relative_to(ROOT)): lines
        for path in sorted((ROOT / "campaign").rglob("*.py"))
        if (lines := formatted_sql(path.read_text(encoding="utf-8")))
    }
    assert offenders == {}, "use $n parameters (sql/queries/*.sql), not string formatting"


def test_named_queries_use_dollar_parameters_only() -> None:
    for path in sorted((ROOT / "sql" / "queries").glob("*.sql")):
        body = "\n".join(
            line for line in path.read_text(encoding="utf-8").splitlines()
            if not line.lstrip().startswith("--")
        )  # fmt: skip
        assert not re.search(r"%s|%\(\w+\)s|\{\w+\}|:[a-z_]+\b(?!:)", body.replace("::", "")), (
            f"{path.name}: a placeholder that is not $n"
        )
