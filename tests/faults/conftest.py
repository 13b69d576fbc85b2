"""Prints the fault matrix's summary table (fault, recipients, lost, duplicated, time)
and the soak's figures at the end of the run."""

from __future__ import annotations

import pytest

from tests.helpers.faults import RESULTS, SOAK, summary_table


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RESULTS:
        terminalreporter.section("fault matrix")
        terminalreporter.write_line(summary_table(RESULTS))
    if SOAK:
        terminalreporter.section("soak")
        for line in SOAK:
            terminalreporter.write_line(line)
