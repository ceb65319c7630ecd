"""Log eval results to a wandb run (works offline: ``WANDB_MODE=offline``)."""

from __future__ import annotations

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
) -> str:
    """One wandb run: a comparison table per suite, headline numbers in the summary.

    Summary keys are ``<suite>/<decomposition>[/<variant>]/<column>``. Returns the run's
    directory (offline) or URL (online).
    """
    import wandb

    suites = sorted({r.suite for r in results})
    run = wandb.init(
        project=project,
        entity=entity,
        name=name,
        job_type="eval",
        config={
            "suites": suites,
            "decompositions": sorted({r.decomposition_id for r in results}),
            "results": {f"{r.suite}/{r.decomposition_id}": r.config for r in results},
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
            run.log({f"{suite}/comparison": table})
            for row in rows:
                prefix = f"{suite}/{row['decomposition']}"
                if "variant" in row:
                    prefix += f"/{row['variant']}"
                for c, v in row.items():
                    if c not in ("decomposition", "variant") and isinstance(v, int | float):
                        run.summary[f"{prefix}/{c}"] = v
        return str(run.url or run.dir)
    finally:
        run.finish()


def _cell(v: Any) -> Any:
    return v if isinstance(v, int | float | str) or v is None else str(v)
