"""Fixtures of the fault suite and its summary line (rows run/passed, bytes lost)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from faultkit import LEDGER, Harness, Injector

BACKOFF_SCALE = 0.05


def _fast_botocore_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's retry delays (1 s base for throttling) scaled by BACKOFF_SCALE: same attempts, less waiting."""
    from botocore.retries.standard import ExponentialBackoff

    original = ExponentialBackoff.delay_amount

    def delay_amount(self: Any, context: Any) -> float:
        return float(original(self, context)) * BACKOFF_SCALE

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", delay_amount)


@pytest.fixture(scope="module", autouse=True)
def _restore_botocore() -> Iterator[None]:
    """Take the fault hook out of botocore's Endpoint when a fault-suite module is done."""
    yield
    Injector.uninstall()


@pytest.fixture
def harness(request: pytest.FixtureRequest, stack: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
            lambda_context: Any) -> Iterator[Harness]:
    """A fresh stack with fault hooks on every in-process AWS client; the row id comes from the test's param."""
    row = getattr(request.node, "callspec", None)
    row_id = row.id if row is not None else request.node.name
    _fast_botocore_backoff(monkeypatch)
    h = Harness(row_id, stack, tmp_path, monkeypatch, lambda_context).start()
    try:
        yield h
    finally:
        h.stop()


def _fault_reports(terminalreporter: Any) -> dict[str, str]:
    """Outcome per fault-suite test id (the last phase that did not pass wins)."""
    outcomes: dict[str, str] = {}
    for kind in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(kind, []):
            nodeid = getattr(report, "nodeid", "")
            if "tests/faults/" not in nodeid:
                continue
            if report.when == "call" or kind in ("failed", "error", "skipped"):
                if outcomes.get(nodeid) in ("failed", "error"):
                    continue
                outcomes[nodeid] = kind
    return outcomes


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """``fault rows: N run, P passed ...; bytes lost: X`` from the rows' outcomes and the byte ledger."""
    outcomes = _fault_reports(terminalreporter)
    if not outcomes:
        return
    rows = {k: v for k, v in outcomes.items() if "test_fault_row[" in k}
    other = {k: v for k, v in outcomes.items() if "test_fault_row[" not in k}
    counts = {kind: sum(1 for v in rows.values() if v == kind) for kind in ("passed", "failed", "error", "skipped")}
    totals = LEDGER.totals()
    terminalreporter.write_sep("=", "fault suite")
    terminalreporter.write_line(
        f"fault rows: {len(rows)} run, {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['error']} errors, {counts['skipped']} skipped; other fault tests: "
        f"{sum(1 for v in other.values() if v == 'passed')}/{len(other)} passed")
    terminalreporter.write_line(
        f"sessions accounted: {totals['sessions']}, bytes compared: {totals['compared']}, "
        f"bytes in declared gaps: {totals['declared']}, bytes altered: {totals['altered']}")
    terminalreporter.write_line(f"bytes lost: {totals['lost']}")
    for account in LEDGER.sessions:
        lost, altered = account.loss()
        if lost or altered:
            terminalreporter.write_line(f"  {account.row} {account.app}/{account.session_id} ({account.source}): "
                                        f"lost {lost}, altered {altered} {account.note}")
    for nodeid, kind in sorted(outcomes.items()):
        if kind in ("failed", "error"):
            terminalreporter.write_line(f"  {kind.upper()} {nodeid}")
