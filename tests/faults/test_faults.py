"""The fault suite: every row of :data:`rows.ROWS` as one test, plus the table's own consistency."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from rows import CATEGORIES, ROWS, Row

pytestmark = [pytest.mark.faults, pytest.mark.integration]

THREAT_MODEL = Path(__file__).resolve().parents[2] / "docs" / "THREAT_MODEL.md"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_fault_row(row: Row, harness) -> None:
    row.check(harness)


def test_the_table_has_at_least_30_rows_each_fully_described() -> None:
    assert len(ROWS) >= 30
    for r in ROWS:
        assert r.category in CATEGORIES
        assert r.description and r.expected, r.id


def test_threat_model_and_table_name_the_same_rows() -> None:
    text = THREAT_MODEL.read_text("utf-8")
    named = set(re.findall(r"\b((?:INF|RUN|HRI|API|TAM)-\d\d)\b", text))
    assert named == {r.id for r in ROWS}
