"""Prints the fault matrix's summary table (fault, recipients, lost, duplicated, time)
and the soak's figures at the end of the run.

Tests append to `RESULTS` / `SOAK` in whichever process runs them (a pytest-xdist worker
under `make test`); an autouse fixture hands each test's new entries to its report, and
the process that prints the summary collects them from the reports it receives."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from tests.helpers.faults import RESULTS, SOAK, Row, summary_table

_ROWS: list[Row] = []
_SOAK_LINES: list[str] = []


@pytest.fixture(autouse=True)
def _hand_results_to_the_report(request: pytest.FixtureRequest) -> Iterator[None]:
    rows, lines = len(RESULTS), len(SOAK)
    yield
    for row in RESULTS[rows:]:
        request.node.user_properties.append(("fault_row", dataclasses.astuple(row)))
    for line in SOAK[lines:]:
        request.node.user_properties.append(("soak_line", line))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "teardown":
        return
    for name, value in report.user_properties:
        if name == "fault_row":
            _ROWS.append(Row(*value))
        elif name == "soak_line":
            _SOAK_LINES.append(str(value))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _ROWS:
        terminalreporter.section("fault matrix")
        terminalreporter.write_line(summary_table(_ROWS))
    if _SOAK_LINES:
        terminalreporter.section("soak")
        for line in _SOAK_LINES:
            terminalreporter.write_line(line)
