"""The built-in suite objects (kept apart from their heavy modules, which load on run)."""

from __future__ import annotations

from typing import Any

from spd_host.evals.configs import FidelityConfig, JudgeSuiteConfig
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


def _judge(kind: str) -> Any:
    def run(adapter: Any, config: Any) -> Any:
        from spd_host.evals.llm.suites import run_judge_suite

        return run_judge_suite(kind, adapter, config)  # type: ignore[arg-type]

    return run


INTRUDER = EvalSuite(
    name="intruder",
    description=(
        "Coherence without labels: an LLM judge picks the intruder among 4 real examples of a "
        "component and 1 example of a component of similar firing density that does not fire "
        "for it; accuracy over trials (chance 0.2)."
    ),
    config_model=JudgeSuiteConfig,
    run=_judge("intruder"),
    needs_llm=True,
    needs_harvest=True,
)
DETECTION = EvalSuite(
    name="detection",
    description=(
        "Label quality: from the autointerp label, the judge picks which examples make the "
        "component fire among activating and truly non-activating ones; balanced accuracy."
    ),
    config_model=JudgeSuiteConfig,
    run=_judge("detection"),
    needs_llm=True,
    needs_harvest=True,
)
FUZZING = EvalSuite(
    name="fuzzing",
    description=(
        "Label specificity: the judge tells correctly marked firing tokens from random marks "
        "placed where the component does not fire; balanced accuracy."
    ),
    config_model=JudgeSuiteConfig,
    run=_judge("fuzzing"),
    needs_llm=True,
    needs_harvest=True,
)


def builtin_suites() -> list[EvalSuite]:
    from spd_host.evals.llm.scorer_suites import SCORER_SUITES

    return [FIDELITY, INTRUDER, DETECTION, FUZZING, *SCORER_SUITES]
