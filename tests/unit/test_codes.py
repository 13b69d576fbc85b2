"""The code table of campaign/codes.py is the one docs/webhooks.md shows."""

from __future__ import annotations

import re
from pathlib import Path

from campaign import codes

DOC = Path(__file__).resolve().parents[2] / "docs" / "webhooks.md"


def test_docs_list_every_code_with_its_meaning() -> None:
    rows = dict(re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", DOC.read_text(), re.MULTILINE))
    expected = {**codes.OWN_CODES, **codes.API_CODES, **codes.REPORT_CODES}
    for code, text in expected.items():
        assert rows.get(code, "").strip() == text, code


def test_meaning_prefers_the_report_table_and_names_http_statuses() -> None:
    assert codes.meaning("7006") == codes.REPORT_CODES["7006"]
    assert codes.meaning("http_502") == "HTTP 502 from the API"
    assert codes.meaning("9999") == "undocumented code"
    assert codes.meaning(None) == ""
