"""The fault suite: every row of :data:`rows.ROWS` as one test, plus the table's own consistency."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from faultkit import stream_loss
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


def test_the_ledger_counts_undeclared_losses_and_alterations() -> None:
    expected = b"0123456789"
    assert stream_loss(expected, [b"0123456789"]) == (0, 0)
    assert stream_loss(expected, [b"012", 4, b"789"]) == (0, 0)  # a declared hole
    assert stream_loss(expected, [b"01", 2, b"45", 2, b"89"]) == (0, 0)  # two declared holes
    assert stream_loss(expected, [b"012", b"789"]) == (4, 0)  # a hole nobody declared
    assert stream_loss(expected, [b"012", 2, b"789"]) == (2, 0)  # declared too little
    assert stream_loss(expected, [b"0123", b"X", b"56789"]) == (1, 1)  # one byte altered
    assert stream_loss(expected, [b"0123456789", b"9"]) == (0, 1)  # one byte invented
    assert stream_loss(expected, [b"01234", 5]) == (0, 0)  # lost at the end, declared
    assert stream_loss(expected, []) == (10, 0)
