"""The suite objects of the simulation, embedding and surprisal scorers (cheap to import:
their modules load on run)."""

from __future__ import annotations

from typing import Any

from spd_host.evals.llm.scorer_configs import EmbeddingConfig, SimulationConfig, SurprisalConfig
from spd_host.evals.registry import EvalSuite


def _run_simulation(adapter: Any, config: Any) -> Any:
    from spd_host.evals.llm.simulation import run_simulation

    return run_simulation(adapter, config)


def _run_embedding(adapter: Any, config: Any) -> Any:
    from spd_host.evals.llm.embedding import run_embedding

    return run_embedding(adapter, config)


def _run_surprisal(adapter: Any, config: Any) -> Any:
    from spd_host.evals.llm.surprisal import run_surprisal

    return run_surprisal(adapter, config)


SIMULATION = EvalSuite(
    name="simulation",
    description=(
        "Label predictiveness (OpenAI's neuron simulator, as delphi): from the label, the judge "
        "predicts each token's activation 0-10 on top, quantile-drawn and non-activating "
        "windows; Pearson correlation with the true activations (json or logprobs mode)."
    ),
    config_model=SimulationConfig,
    run=_run_simulation,
    needs_llm=True,
    needs_harvest=True,
)
EMBEDDING = EvalSuite(
    name="embedding",
    description=(
        "Label retrieval (delphi's embedding scorer): a local sentence-embedding model embeds "
        "the label as a query and activating / non-activating windows; AUROC of the cosine "
        "similarity (chance 0.5)."
    ),
    config_model=EmbeddingConfig,
    run=_run_embedding,
    needs_harvest=True,
)
SURPRISAL = EvalSuite(
    name="surprisal",
    description=(
        "Label informativeness (delphi's surprisal scorer): a local causal LM's loss on each "
        "window with vs without the label as a prefix; AUROC of the loss decrease separating "
        "activating from non-activating windows (chance 0.5)."
    ),
    config_model=SurprisalConfig,
    run=_run_surprisal,
    needs_harvest=True,
)
SCORER_SUITES = [SIMULATION, EMBEDDING, SURPRISAL]
