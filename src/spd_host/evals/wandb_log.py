"""Log eval results to a wandb run (works offline: ``WANDB_MODE=offline``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from spd_host.evals.results import EvalResult
from spd_host.evals.tables import comparison_rows


def log_results(
    results: Sequence[EvalResult],
    *,
    project: str = "spd-host-evals",
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] | None = None,
) -> str:
    """One wandb run: a comparison table per suite, headline numbers in the summary.

    Summary keys are ``<suite>/<decomposition>[/<variant>]/<column>`` with every character
    outside ``[A-Za-z0-9_./:-]`` (spaces included) replaced by ``_`` (see
    :func:`summary_metrics`). Returns the run's directory (offline) or URL (online).
    """
    import wandb

    suites = sorted({r.suite for r in results})
    run = wandb.init(
        project=project,
        entity=entity,
        name=name,
        group=group,
        tags=list(tags) if tags else None,
        job_type="eval",
        config={
            "suites": suites,
            "decompositions": sorted({r.decomposition_id for r in results}),
            "results": {f"{r.suite}/{r.decomposition_id}": r.config for r in results},
            # the dataset actually evaluated on (a config's None means "the recorded default")
            "datasets": {
                f"{r.suite}/{r.decomposition_id}": getattr(r, "dataset", None)
                for r in results
                if isinstance(getattr(r, "dataset", None), str)
            },
        },
    )
    try:
        for suite in suites:
            rows = comparison_rows([r for r in results if r.suite == suite])
            columns: list[str] = []
            for row in rows:
                columns += [c for c in row if c not in columns]
            data: list[list[Any]] = [[_cell(row.get(c)) for c in columns] for row in rows]
            table = wandb.Table(columns=list[str | int](columns), data=data)
            run.log({metric_key(f"{suite}/comparison"): table})
        for key, value in summary_metrics(results).items():
            run.summary[key] = value
        return str(run.url or run.dir)
    finally:
        run.finish()


def metric_key(text: str) -> str:
    """A wandb key without spaces or odd characters (``CE score`` -> ``CE_score``)."""
    return re.sub(r"[^A-Za-z0-9_./:-]+", "_", text).strip("_")


def summary_metrics(results: Sequence[EvalResult]) -> dict[str, float]:
    """The headline numbers of every result, keyed ``<suite>/<decomposition>[/<variant>]/<column>``."""
    out: dict[str, float] = {}
    for suite in sorted({r.suite for r in results}):
        for row in comparison_rows([r for r in results if r.suite == suite]):
            prefix = f"{suite}/{row['decomposition']}"
            if "variant" in row:
                prefix += f"/{row['variant']}"
            for c, v in row.items():
                if c not in ("decomposition", "variant") and isinstance(v, int | float):
                    out[metric_key(f"{prefix}/{c}")] = v
    for r in results:
        out.update(_scope_metrics(r))
    return out


def _scope_metrics(r: EvalResult) -> dict[str, float]:
    """Per splice scope (all sites, each site alone) and write target: CE/KL scores, MSE,
    cosine similarity and explained variance, for results that have them (fidelity)."""
    out: dict[str, float] = {}
    base = f"{r.suite}/{r.decomposition_id}"
    for row in getattr(r, "loss", None) or []:
        for name in ("ce_loss_score", "kl_div_score", "ce_spliced", "kl_spliced"):
            v = getattr(row, name, None)
            if isinstance(v, int | float):
                out[metric_key(f"{base}/{row.variant}/scope/{row.scope}/{name}")] = v
    for row in getattr(r, "recon", None) or []:
        for name in ("mse", "cosine_similarity", "explained_variance"):
            v = getattr(row, name, None)
            if isinstance(v, int | float):
                key = f"{base}/{row.variant}/scope/{row.scope}/{row.target}/{name}"
                out[metric_key(key)] = v
    return out


def _cell(v: Any) -> Any:
    return v if isinstance(v, int | float | str) or v is None else str(v)
