"""The built-in suite objects (kept apart from their heavy modules, which load on run)."""

from __future__ import annotations

from typing import Any

from spd_host.evals.configs import FidelityConfig
from spd_host.evals.registry import EvalSuite


def _run_fidelity(adapter: Any, config: Any) -> Any:
    from spd_host.evals.fidelity import run_fidelity

    return run_fidelity(adapter, config)


FIDELITY = EvalSuite(
    name="fidelity",
    description=(
        "Splice the decomposition into the base model (all sites, and each site alone) on "
        "held-out tokens: CE and KL against clean and zero-ablated runs (ce_loss_score, "
        "kl_div_score), explained variance / MSE / cosine at each write target, L0 and "
        "components alive; one row per splice variant."
    ),
    config_model=FidelityConfig,
    run=_run_fidelity,
)


def builtin_suites() -> list[EvalSuite]:
    return [FIDELITY]
