"""Config models of the simulation, embedding and surprisal suites (pydantic only: cheap)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from spd_host.evals.configs import JudgeSuiteConfig

SimulationMode = Literal["json", "logprobs"]


class SimulationConfig(JudgeSuiteConfig):
    """Options of ``eval simulation``: the judge fields of :class:`JudgeSuiteConfig` (same
    providers, limits, cost cap), and which windows one trial shows.

    One trial is one request: the label and ``n_top + n_quantile + n_nonactivating`` windows,
    answered all at once as JSON (one integer 0-10 per token per window).
    """

    mode: SimulationMode = Field(
        default="json",
        description="json: the judge's integers are the prediction; logprobs: the expected "
        "value over 0-10 from each written number's top_logprobs (OpenAI-compatible providers).",
    )
    top_logprobs: int = Field(default=10, ge=2, le=20, description="logprobs mode: alternatives.")
    n_top: int = Field(default=2, ge=0, description="Windows from the top-activating examples.")
    n_quantile: int = Field(
        default=4, ge=0, description="Activating windows drawn by activation quantile."
    )
    n_nonactivating: int = Field(
        default=2, ge=0, description="Windows on which the component does not fire (truth 0)."
    )
    n_trials: int = Field(default=1, ge=1, description="Trials (requests) per component.")
    max_example_tokens: int = Field(default=32, ge=4)
    max_output_tokens: int = Field(default=2_000, ge=16)


class _Local(BaseModel):
    """Fields shared by the scorers that run a local model instead of an LLM judge."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    n_components: int | None = Field(default=50, ge=1, description="Components sampled (seeded).")
    seed: int = 0
    harvest_run: str | None = None
    label_model: str | None = Field(
        default=None, description="Use labels by this autointerp model only."
    )
    max_example_tokens: int = Field(default=32, ge=4)
    n_activating: int = Field(
        default=10, ge=1, description="Activating windows, drawn by activation quantile."
    )
    n_nonactivating: int = Field(
        default=10, ge=1, description="Windows on which the component does not fire."
    )
    positives: Literal["quantiles", "top_and_reservoir"] = Field(
        default="quantiles", description="How activating windows are drawn (see populations)."
    )
    n_quantiles: int = Field(default=10, ge=1, description="Activation quantile bins (delphi's).")
    negatives: Literal["random", "similar_density"] = Field(
        default="random", description="Where non-activating windows come from."
    )
    density_tolerance: float = Field(default=0.5, gt=0)
    batch_size: int = Field(default=16, ge=1)
    device: str | None = Field(default=None, description="torch device; default cuda if present.")
    force: bool = Field(default=False, description="Score again components already scored.")


class EmbeddingConfig(_Local):
    """Options of ``eval embedding``."""

    model: str | None = Field(
        default=None,
        description="Sentence-embedding model: a local directory or a name in the local Hugging "
        "Face cache (never downloaded); 'offline': the bag-of-tokens baseline; default: "
        f"{'sentence-transformers/all-MiniLM-L6-v2'} if cached, else the baseline.",
    )
    query_prefix: str = Field(
        default="Instruct: Retrieve text passages that match this description of a "
        "neural-network feature.\nQuery: ",
        description="Put before the label when it is embedded as the query.",
    )


class SurprisalConfig(_Local):
    """Options of ``eval surprisal``."""

    model: str | None = Field(
        default=None,
        description="Causal LM that reads the windows: a local directory or a name in the local "
        "Hugging Face cache (never downloaded); default: the decomposition's own base model.",
    )
    null_description: str = Field(
        default="Various unrelated sentences.",
        description="The description in the prefix without the label (delphi's).",
    )
    batch_size: int = Field(default=8, ge=1)
