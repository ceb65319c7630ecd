"""Page data: plain dicts built from the stores, shared by ``serve`` and the static ``dashboard``.

The templates only format what these functions return, so the numbers a page shows are the
numbers ``HarvestRepo`` returns (the browser tests compare them one for one).
"""

from __future__ import annotations

import math
from typing import Any

from spd_host.harvest.models import ActivationExample, TokenScore
from spd_host.viewer.index import ComponentIndex
from spd_host.viewer.source import JUDGE_SUITES, DecompositionSource, finite

N_QUANTILES = 4
COOC_METRICS = ("jaccard", "precision", "recall", "pmi")


def histogram_bins(edges: list[float], counts: list[int]) -> list[dict[str, Any]]:
    """Histogram counts with readable bin labels: bin 0 is ``[0, e0)``, the last ``[e_last, inf)``."""
    bounds = [0.0, *edges, math.inf]
    return [
        {"lo": bounds[i], "hi": bounds[i + 1], "count": int(c)}
        for i, c in enumerate(counts)
        if i + 1 < len(bounds)
    ]


def example_view(
    source: DecompositionSource, ex: ActivationExample, scale: float
) -> dict[str, Any]:
    """One window: every token with its text, every activation type's value and a shade."""
    primary = source.primary
    toks = []
    for i, t in enumerate(ex.tokens):
        acts = {name: float(vals[i]) for name, vals in ex.activations.items()}
        v = acts.get(primary, 0.0)
        alpha = 0.0 if scale <= 0 else min(1.0, abs(v) / scale)
        toks.append(
            {
                "id": int(t),
                "text": source.decode(t),
                "acts": acts,
                "fired": bool(ex.firings[i]),
                "centre": i == ex.centre,
                "alpha": round(alpha, 3),
                "negative": v < 0,
            }
        )
    return {"rank": ex.rank, "score": ex.score, "position": ex.position, "tokens": toks}


def quantile_groups(
    source: DecompositionSource, examples: list[ActivationExample], scale: float
) -> list[dict[str, Any]]:
    """The uniform (reservoir) sample split into ``N_QUANTILES`` groups by score, highest first."""
    if not examples:
        return []
    ordered = sorted(examples, key=lambda e: (-e.score, e.position))
    n = len(ordered)
    groups = []
    for q in range(N_QUANTILES):
        part = ordered[q * n // N_QUANTILES : (q + 1) * n // N_QUANTILES]
        if not part:
            continue
        groups.append(
            {
                "name": f"quantile {q + 1} of {N_QUANTILES}",
                "max": part[0].score,
                "min": part[-1].score,
                "fraction": len(part) / n,
                "examples": [example_view(source, e, scale) for e in part],
            }
        )
    return groups


def _scores(source: DecompositionSource, scores: list[TokenScore]) -> list[dict[str, Any]]:
    return [
        {
            "id": s.token,
            "text": source.decode(s.token),
            "value": s.value,
            "count": s.count,
            "total": s.token_total,
        }
        for s in scores
    ]


def token_tables(source: DecompositionSource, key: str, top: int = 10) -> dict[str, Any]:
    out = {}
    for kind in ("input", "output"):
        ts = source.repo.token_stats(key, kind, top=top)  # type: ignore[arg-type]
        out[kind] = {
            "pmi": _scores(source, ts.top_pmi),
            "precision": _scores(source, ts.top_precision),
            "recall": _scores(source, ts.top_recall),
            "bottom_pmi": _scores(source, ts.bottom_pmi),
            "approximation_bound": ts.approximation_bound,
        }
    return out


def correlated(source: DecompositionSource, key: str, top: int = 12) -> list[dict[str, Any]]:
    """Partners by Jaccard, each with all four co-occurrence metrics."""
    by_metric = {
        m: dict(source.repo.correlated(key, metric=m, top=10**9))  # type: ignore[arg-type]
        for m in COOC_METRICS
    }
    ranked = list(by_metric["jaccard"].items())[:top]
    return [{"key": k, **{m: finite(by_metric[m].get(k)) for m in COOC_METRICS}} for k, _ in ranked]


def label_views(source: DecompositionSource, key: str) -> list[dict[str, Any]]:
    return [
        {
            "label": r.label,
            "status": r.status,
            "baseline": r.is_baseline,
            "confidence": r.confidence,
            "reasoning": r.reasoning,
            "strategy": r.strategy,
            "model": f"{r.provider}/{r.model}",
            "finished_at": r.finished_at,
            "error": r.error,
        }
        for r in source.label_records(key)
    ]


def eval_views(source: DecompositionSource, key: str, site: str) -> list[dict[str, Any]]:
    """This component's judge scores and its site's fidelity rows."""
    out: list[dict[str, Any]] = []
    for r in source.eval_results():
        if r.suite in JUDGE_SUITES:
            mine = next((c for c in r.components if c.key == key), None)
            out.append(
                {
                    "suite": r.suite,
                    "judge": r.judge + (" (BASELINE)" if r.baseline else ""),
                    "score": None if mine is None else mine.score,
                    "trials": None if mine is None else f"{mine.n_ok} ok, {mine.n_failed} failed",
                    "chance": r.chance,
                    "overall": r.score,
                }
            )
        elif r.suite == "fidelity":
            sp = next((s for s in r.sparsity if s.site == site), None)
            rows = [x for x in r.loss if x.scope == site]
            out.append(
                {
                    "suite": "fidelity",
                    "judge": "",
                    "score": rows[0].ce_loss_score if rows else None,
                    "trials": None
                    if sp is None
                    else f"site L0 {sp.l0}, alive {sp.alive_fraction:.3f}",
                    "chance": None,
                    "overall": r.loss_row().ce_loss_score,
                }
            )
    return out


def component_page(
    source: DecompositionSource, index: ComponentIndex, key: str, logits: Any = None
) -> dict[str, Any]:
    """Everything the component page shows."""
    d = source.repo.component(key)
    primary = source.primary
    scale = max(abs(d.max_firing.get(primary) or 0.0), 1e-12)
    g = source.repo.layout.index(key)
    prev_key, next_key = index.neighbours(g)
    return {
        "decomposition_id": source.decomposition_id,
        "key": key,
        "site": d.site,
        "index": d.index,
        "gidx": g,
        "prev": prev_key,
        "next": next_key,
        "primary": primary,
        "act_types": list(source.repo.layout.act_types),
        "firing_count": d.firing_count,
        "density": d.density,
        "n_tokens": source.repo.n_tokens,
        "mean_all": d.mean_all,
        "mean_firing": d.mean_firing,
        "max_firing": d.max_firing,
        "histogram": histogram_bins(d.histogram_edges, d.histogram_counts),
        "top_examples": [example_view(source, e, scale) for e in d.top_examples],
        "quantiles": quantile_groups(source, d.reservoir_examples, scale),
        "tokens": token_tables(source, key),
        "correlated": correlated(source, key),
        "labels": label_views(source, key),
        "evals": eval_views(source, key, d.site),
        "method": source.method_info(),
        "site_info": source.site_info(d.site),
        "logits": None if logits is None else logits.for_key(source, key),
    }
