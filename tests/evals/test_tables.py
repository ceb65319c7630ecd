"""Comparison-table captions attribute each note to the rows it applies to."""

from __future__ import annotations

from spd_host.evals.results import EvalResult
from spd_host.evals.tables import attributed_notes, comparison_table


def result(did: str, notes: list[str]) -> EvalResult:
    return EvalResult(
        suite="toy", decomposition_id=did, method="toy", package_version="0", config={}, notes=notes
    )


def test_notes_shared_by_all_rows_are_unprefixed_others_name_their_rows() -> None:
    results = [
        result("a:demo", ["offline judge", "alive from harvest"]),
        result("b:demo", ["offline judge", "alive from eval tokens"]),
        result("c:demo", ["offline judge", "alive from eval tokens"]),
    ]
    assert attributed_notes(results) == [
        "b:demo, c:demo: alive from eval tokens",
        "a:demo: alive from harvest",
        "offline judge",
    ]
    assert comparison_table(results).caption == (
        "b:demo, c:demo: alive from eval tokens; a:demo: alive from harvest; offline judge"
    )
