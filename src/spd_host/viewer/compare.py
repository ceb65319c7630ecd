"""The compare view: eval tables across decompositions, and components of different
decompositions on the same hook point that share top tokens or fire on the same positions."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from spd_host.viewer.index import ComponentIndex
from spd_host.viewer.source import DecompositionSource

MAX_COMPONENTS = 2000  # densest alive components per site considered
MAX_PAIRS = 15


def eval_tables(sources: list[DecompositionSource]) -> list[dict[str, Any]]:
    """One table per suite, rows from the suites' own ``table_rows`` (as ``spd-host eval``)."""
    from spd_host.evals.tables import attributed_notes, comparison_rows

    by_suite: dict[str, list[Any]] = defaultdict(list)
    for s in sources:
        for r in s.eval_results():
            by_suite[r.suite].append(r)
    out = []
    for suite, results in sorted(by_suite.items()):
        rows = comparison_rows(results)
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        out.append(
            {"suite": suite, "columns": columns, "rows": rows, "notes": attributed_notes(results)}
        )
    return out


def base_models(sources: list[DecompositionSource]) -> dict[str, str]:
    """Each decomposition's base model (the compare view warns when they differ)."""
    return {s.decomposition_id: str(s.adapter.base_model_name) for s in sources}


def _hooks(source: DecompositionSource) -> dict[str, set[str]]:
    return {
        s.name: {s.reads_from, *s.writes_to, *([s.address] if s.address else [])}
        for s in source.adapter.sites
    }


def _positions(source: DecompositionSource, key: str) -> set[int]:
    d = source.repo.component(key)
    return {e.position for e in [*d.top_examples, *d.reservoir_examples]}


def matches(
    sources: list[DecompositionSource], indexes: list[ComponentIndex]
) -> list[dict[str, Any]]:
    """For every pair of decompositions and of their sites sharing a hook point, the component
    pairs with the largest Jaccard overlap of top input tokens."""
    out = []
    hooks = [_hooks(s) for s in sources]
    for a in range(len(sources)):
        for b in range(a + 1, len(sources)):
            for site_a, ha in hooks[a].items():
                for site_b, hb in hooks[b].items():
                    common = sorted(ha & hb)
                    if not common:
                        continue
                    pairs = _pairs(sources, indexes, a, b, site_a, site_b)
                    out.append(
                        {
                            "a": a,
                            "b": b,
                            "a_id": sources[a].decomposition_id,
                            "b_id": sources[b].decomposition_id,
                            "site_a": site_a,
                            "site_b": site_b,
                            "hook": ", ".join(common),
                            "pairs": pairs,
                        }
                    )
    return out


def _pairs(
    sources: list[DecompositionSource],
    indexes: list[ComponentIndex],
    a: int,
    b: int,
    site_a: str,
    site_b: str,
) -> list[dict[str, Any]]:
    rows_a = indexes[a].token_rows([site_a], MAX_COMPONENTS)
    rows_b = indexes[b].token_rows([site_b], MAX_COMPONENTS)
    by_token: dict[str, list[int]] = defaultdict(list)
    sets_b = [set((r["input_ids"] or "").split()) for r in rows_b]
    for j, s in enumerate(sets_b):
        for t in s:
            by_token[t].append(j)
    scored = []
    for i, ra in enumerate(rows_a):
        sa = set((ra["input_ids"] or "").split())
        shared: dict[int, int] = defaultdict(int)
        for t in sa:
            for j in by_token.get(t, ()):
                shared[j] += 1
        for j, n in shared.items():
            jac = n / len(sa | sets_b[j])
            scored.append((-jac, ra["gidx"], rows_b[j]["gidx"], i, j))
    scored.sort()
    out = []
    for negj, _, _, i, j in scored[:MAX_PAIRS]:
        ra, rb = rows_a[i], rows_b[j]
        ids_a = (ra["input_ids"] or "").split()
        shared_ids = [t for t in ids_a if t in sets_b[j]]
        cofire = len(_positions(sources[a], ra["key"]) & _positions(sources[b], rb["key"]))
        out.append(
            {
                "a_key": ra["key"],
                "b_key": rb["key"],
                "a_label": ra["label"],
                "b_label": rb["label"],
                "jaccard": -negj,
                "shared": [repr(sources[a].decode(int(t))) for t in shared_ids],
                "cofire": cofire,
            }
        )
    return out
