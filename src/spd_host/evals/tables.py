"""Rich tables for eval results: one comparison table across decompositions, plus details."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from spd_host.evals.results import EvalResult


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"
    return str(value)


def print_table(console: Any, table: Table) -> None:
    """Print without squeezing numbers to ellipses: off a terminal (pipes, files, CI logs) the
    console is widened to what the table needs for this one print."""
    from rich.measure import Measurement

    if console.is_terminal:
        console.print(table)
        return
    needed = Measurement.get(console, console.options.update_width(10_000), table).maximum
    previous = console.width
    console.width = max(previous, needed)
    try:
        console.print(table)
    finally:
        console.width = previous


def comparison_rows(results: Sequence[EvalResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        for row in r.table_rows():
            rows.append({"decomposition": r.decomposition_id, **row})
    return rows


def comparison_table(results: Sequence[EvalResult], *, title: str | None = None) -> Table:
    """One row per decomposition (per variant where the suite has several)."""
    rows = comparison_rows(results)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    suites = sorted({r.suite for r in results})
    table = Table(title=title or f"{', '.join(suites)}: {len(results)} decomposition(s)")
    for c in columns:
        label = "decomposition" if c == "decomposition" else c
        if c in ("decomposition", "variant", "judge"):
            table.add_column(label, justify="left", no_wrap=True)
        else:
            table.add_column(label, justify="right")
    for row in rows:
        table.add_row(*(fmt(row.get(c)) for c in columns))
    table.caption = "; ".join(attributed_notes(results)) or None
    return table


def attributed_notes(results: Sequence[EvalResult]) -> list[str]:
    """Each distinct note once, prefixed with the decompositions it applies to unless it applies
    to every row, so a caption never suggests that one row's caveat holds for all."""
    ids = list(dict.fromkeys(r.decomposition_id for r in results))
    holders: dict[str, list[str]] = {}
    for r in results:
        for note in r.notes:
            holders.setdefault(note, [])
            if r.decomposition_id not in holders[note]:
                holders[note].append(r.decomposition_id)
    return [
        note if len(who) == len(ids) else f"{', '.join(who)}: {note}"
        for note, who in sorted(holders.items())
    ]


def fidelity_detail_table(result: Any) -> Table:
    """Every (scope, variant) row of a FidelityResult: the per-site picture."""
    table = Table(title=f"fidelity detail: {result.decomposition_id}")
    for c in (
        "scope",
        "variant",
        "CE spliced",
        "CE zero-abl",
        "CE score",
        "KL",
        "KL score",
        "EV",
        "L0",
        "alive",
    ):
        table.add_column(c, justify="left" if c in ("scope", "variant") else "right")
    sparsity = {s.site: s for s in result.sparsity}
    for row in result.loss:
        evs = [
            r.explained_variance
            for r in result.recon
            if r.scope == row.scope
            and r.variant == row.variant
            and r.explained_variance is not None
        ]
        sp = sparsity.get(row.scope)
        table.add_row(
            row.scope,
            row.variant,
            fmt(row.ce_spliced),
            fmt(row.ce_ablated),
            fmt(row.ce_loss_score),
            fmt(row.kl_spliced),
            fmt(row.kl_div_score),
            fmt(sum(evs) / len(evs) if evs else None),
            fmt(sp.l0 if sp else result.l0_total if row.scope == "all" else None),
            fmt(sp.alive_fraction if sp else result.alive_fraction if row.scope == "all" else None),
        )
    table.caption = (
        f"CE clean {fmt(result.loss[0].ce_clean)} on {result.n_tokens} tokens of {result.dataset}; "
        f"alive from {result.alive_source}; convention {getattr(result, 'convention', 'spd-host')}"
    )
    return table
