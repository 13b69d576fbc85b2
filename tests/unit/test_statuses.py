"""The state machine in campaign/statuses.py against the SQL that moves recipients.

Every UPDATE of campaign.recipients in sql/queries must be a declared move: the status
literals it writes are the move's targets, the ones it tests recipients for are its
sources. The CHECK constraints are compared in tests/integration/test_constraints.py.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from campaign import db, errors, reports, statuses
from campaign.batch import Batch
from campaign.sender import plan_results

QUERIES = db.load_queries()
_LITERAL = re.compile(r"'([a-z_]+)'")
# The SET clause of an UPDATE of recipients: up to the FROM or WHERE that opens a line.
_UPDATE = re.compile(
    r"UPDATE\s+campaign\.recipients\b(?:\s+\w+)?\s+SET\s+(?P<set>.*?)\n\s*(?:FROM|WHERE)\b",
    re.DOTALL,
)
_SET_STATUS = re.compile(r"(?:^|,)\s*status\s*=\s*(?P<expr>.*?)(?=,\s*\n|\Z)", re.DOTALL)
# A recipient's status tested in a condition: r.status / x.status / q.status / status,
# compared with = or IN. Negations (<>) name what a move does not start from.
_TESTED = re.compile(
    r"(?<![\w.])(?:[rxq]\.)?status\s*(?:=\s*'(?P<one>[a-z_]+)'|IN\s*\((?P<many>[^)]*)\))"
)


def _updates_of_recipients() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, sql in QUERIES.items():
        clauses = [m.group("set") for m in _UPDATE.finditer(sql)]
        if clauses:
            found[name] = clauses
    return found


_RESULT = re.compile(r"\b(?:THEN|ELSE)\s+'([a-z_]+)'")


def _written(set_clause: str) -> set[str]:
    """The literals a SET status = ... can write: a CASE's results, not its conditions."""
    match = _SET_STATUS.search(set_clause)
    assert match is not None, set_clause
    expr = match.group("expr").strip()
    if expr.startswith("CASE"):
        return set(_RESULT.findall(expr))
    return set(_LITERAL.findall(expr))


def _tested(sql: str) -> set[str]:
    """Recipient statuses a query tests for (its conditions, not what its SETs write)."""
    conditions = _UPDATE.sub("", sql)
    out: set[str] = set()
    for m in _TESTED.finditer(conditions):
        values = {m.group("one")} if m.group("one") else set(_LITERAL.findall(m.group("many")))
        out |= values
    return out


def test_every_update_of_recipients_is_a_declared_move() -> None:
    declared = {m.query: m for m in statuses.TRANSITIONS}
    updates = _updates_of_recipients()
    writing = {name for name, clauses in updates.items() if any("status" in c for c in clauses)}
    assert writing == set(declared), "a query writes a status without a move, or vice versa"
    for name in writing:
        move = declared[name]
        for clause in updates[name]:
            literals = _written(clause)
            assert literals <= move.targets, (name, literals - move.targets)


def test_sources_in_the_sql_are_declared() -> None:
    for move in statuses.TRANSITIONS:
        sql = QUERIES[move.query]
        # Batches' statuses share no word with recipients'; campaigns' are tested as c.status.
        recipient_statuses = _tested(sql) & set(statuses.RECIPIENT_STATUSES)
        assert recipient_statuses, f"{move.query} tests no recipient status"
        assert recipient_statuses <= move.sources, (move.query, recipient_statuses - move.sources)


def test_vocabulary_sets_are_consistent() -> None:
    every = set(statuses.RECIPIENT_STATUSES)
    final, unsent = set(statuses.FINAL), set(statuses.UNSENT)
    assert final | set(statuses.OPEN) == every and not final & set(statuses.OPEN)
    assert unsent < set(statuses.OPEN) and set(statuses.IN_FLIGHT) < set(statuses.OPEN)
    for move in statuses.TRANSITIONS:
        assert move.sources <= every and move.targets <= every
        # Nothing but a later delivery report leaves a final status.
        if move.sources & final:
            assert move.role == "reconciler"
    # Every status is reachable, and every open status can be left.
    reached = {"pending"} | {t for m in statuses.TRANSITIONS for t in m.targets}
    assert reached == every
    left = {s for m in statuses.TRANSITIONS for s in m.sources if m.targets - {s}}
    assert set(statuses.OPEN) <= left


def test_never_sent_is_every_final_status_no_message_went_out_for() -> None:
    never = set(statuses.NEVER_SENT)
    assert set(statuses.NOT_SENT) < never < set(statuses.FINAL)
    # What is left are the outcomes of a message the API took.
    assert set(statuses.FINAL) - never == {"delivered", "failed"}


def test_allowed_answers_from_the_table() -> None:
    assert statuses.allowed("producer", "pending", "sending")
    assert not statuses.allowed("sender", "pending", "sending")
    assert statuses.allowed("reconciler", "failed", "delivered")
    assert not statuses.allowed("reconciler", "sending", "delivered")


def test_report_codes_map_to_reconciler_targets() -> None:
    (match,) = [m for m in statuses.TRANSITIONS if m.query == "reconcile_match_reports"]
    produced = set(reports.CODE_STATUS.values()) | {reports.OTHER_CODE_STATUS}
    assert produced <= match.targets


@pytest.mark.parametrize("on_timeout", ["resolve", "resend", "fail"])
def test_sender_plans_only_declared_targets(on_timeout: str) -> None:
    (write,) = [m for m in statuses.TRANSITIONS if m.query == "sender_write_results"]
    batch = Batch(
        id=1,
        campaign_id=1,
        service="s",
        body=b"{}",
        recipient_ids=(1, 2, 3),
        correlation_ids=("a", "b", "c"),
        attempts=(0, 4, 0),
        expires_at=datetime(2000, 1, 1, tzinfo=UTC),
    )
    outcomes = [
        errors.Outcome(
            "ok",
            "1001",
            "queued",
            results=(
                errors.DestinationResult("1001", "Queued", "t1", "a"),
                errors.DestinationResult("7004", "bad", None, "b"),
            ),
        ),
        errors.Outcome("retry", "7020", "throttled"),
        errors.Outcome("in_doubt", "timeout", "timed out"),
        errors.Outcome("stop_service", "7001", "bad key"),
        errors.Outcome("rejected", "7003", "bad request"),
    ]
    seen: set[str] = set()
    for outcome in outcomes:
        for now in (datetime(1999, 1, 1, tzinfo=UTC), datetime(2001, 1, 1, tzinfo=UTC)):
            plan = plan_results(
                batch, outcome, on_timeout=on_timeout, max_attempts=5, retry_in_s=1.0, now=now
            )
            seen |= set(plan.statuses)
    assert seen <= write.targets, seen - write.targets
