"""Hands each fault test's summary rows to its report (see tests/conftest.py, which prints
the fault matrix's table and the soak's figures at the end of the run)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from tests.helpers.faults import RESULTS, SOAK


@pytest.fixture(autouse=True)
def _hand_results_to_the_report(request: pytest.FixtureRequest) -> Iterator[None]:
    # Tests append to RESULTS / SOAK in whichever process runs them (a pytest-xdist worker
    # under `make test`); the report is what reaches the process that prints the summary.
    rows, lines = len(RESULTS), len(SOAK)
    yield
    for row in RESULTS[rows:]:
        request.node.user_properties.append(("fault_row", dataclasses.astuple(row)))
    for line in SOAK[lines:]:
        request.node.user_properties.append(("soak_line", line))
