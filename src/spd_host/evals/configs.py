"""Config models of the built-in suites (pydantic only: importing them stays cheap)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Convention = Literal["spd-host", "saelens", "goodfire"]
CONVENTIONS: dict[str, str] = {
    "spd-host": "all positions; CE/KL pooled over every pair/position; MSE per element",
    "saelens": "SAELens run_evals(exclude_special_tokens=True): special-token positions "
    "excluded and not spliced; MSE per-token sum; l2_ratio, relative_reconstruction_bias, L1, "
    "feature density",
    "goodfire": "Goodfire SPD CEandKLLosses: per-batch means weighted by B*S, ce_unrecovered "
    "against the zero_masked baseline, rounded_ci at the run's rounding_threshold, L0 at the "
    "run's ci_alive_threshold",
}


JudgeConvention = Literal["spd-host", "delphi"]
JUDGE_CONVENTIONS: dict[str, str] = {
    "spd-host": "mean over components of per-trial balanced accuracy; multi-select prompt; "
    "fuzzing marks at recorded firings",
    "delphi": "delphi's result analysis: one confusion matrix over all examples (micro) with "
    "F1, precision, recall, class-balanced accuracy, frequency-weighted F1 and AUROC from "
    "logprobs; one 0/1 per example, 5 per prompt; fuzzing `default` with marks at >= 0.3 x max",
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FidelityConfig(_Frozen):
    """Options of the fidelity suite (CLI flags map onto these)."""

    dataset: str | None = Field(
        default=None, description="Token source; default: the decomposition's dataset, else demo."
    )
    text_column: str | None = None
    seq_len: int | None = Field(default=None, gt=1, description="Default: the decomposition's.")
    n_tokens: int = Field(default=8_192, gt=0, description="Held-out tokens to evaluate on.")
    batch_size: int = Field(default=16, gt=0)
    seed: int = 0
    per_site: bool = Field(default=True, description="Also splice / ablate each site alone.")
    per_site_variants: Literal["first", "all"] = Field(
        default="first",
        description="Splice variants run per site: the first only (the all-sites scope always "
        "runs every variant), or all (scopes x variants forwards: slow for SPD's many sites).",
    )
    variants: tuple[str, ...] | None = Field(
        default=None, description="Splice variants to run; default: all the adapter exposes."
    )
    threshold: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="Firing threshold passed to the HarvestFn; default 0.0 (goodfire: the "
        "run's ci_alive_threshold).",
    )
    convention: Convention = Field(
        default="spd-host", description="Which field's definitions to compute (see docs/evals.md)."
    )
    prepend_bos: bool | None = Field(
        default=None,
        description="Start every sequence with the tokenizer's BOS (the sequence keeps seq_len "
        "tokens); default: what the decomposition recorded, else what the tokenizer does.",
    )
    rounding_threshold: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="goodfire: rounded_ci keeps components with CI > this; default the run's "
        "eval_metric_configs CEandKLLosses.rounding_threshold.",
    )
    ci_sampling: bool = Field(
        default=False,
        description="goodfire: compute the eval CI under the run's `sampling` (binomial adds "
        "the training noise), once per batch, as the reference's eval does.",
    )
    seed_masks: int = Field(default=0, description="Seed of stochastic / random masks.")
    fused_gelu: bool = Field(
        default=True,
        description="Evaluate transformers' NewGELU (gelu_new) with torch's fused tanh GELU: the "
        "same formula (transformers' gelu_pytorch_tanh), equal to float32 rounding, 2.5x faster.",
    )
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads on CPU during the eval; default 1 for models under 50M "
        "parameters (thread hand-offs cost more than the maths), else torch's own.",
    )
    use_harvest: bool = Field(
        default=True, description="Count alive components from the stored harvest if one exists."
    )
    harvest_run: str | None = Field(default=None, description="Harvest sub-run (default latest).")


class FidelitySettings(_Frozen):
    """What a convention means for one method, said by its adapter (optional capability).

    An adapter may define ``fidelity_settings(convention: str, config: FidelityConfig) ->
    FidelitySettings``; the engine then passes ``splice_options`` to every ``splice`` call as
    ``options=`` and uses the rest. Adapters without it get the defaults (no options, zero
    ablation as the baseline, the configured threshold).
    """

    splice_options: dict[str, Any] = Field(default_factory=dict)
    baseline_variant: str | None = Field(
        default=None, description="A splice variant whose forward is the ablation baseline."
    )
    alive_threshold: float | None = Field(
        default=None, description="Firing threshold for L0 / alive under this convention."
    )
    peer_names: dict[str, str] = Field(
        default_factory=dict, description="Splice variant -> the peer's name for it."
    )
    default_variants: list[str] | None = Field(
        default=None, description="Variants run when none are asked for (default: all offered)."
    )
    notes: list[str] = Field(default_factory=list)


class JudgeSuiteConfig(_Frozen):
    """Options of the LLM-judged suites (intruder, detection, fuzzing).

    The judge fields mirror ``spd_host.autointerp.AutointerpConfig`` (same providers, limits
    and cost cap); ``provider=None`` picks the first provider with a key set, else ``offline``
    (a deterministic baseline judge, not an LLM).
    """

    provider: str | None = None
    model: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    max_concurrent: int = Field(default=8, ge=1)
    rpm: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    cost_cap_usd: float | None = Field(
        default=5.0,  # = autointerp's DEFAULT_COST_CAP_USD; None removes the cap
        ge=0,
        allow_inf_nan=False,
        description="Hard cap on this suite's total judge spend for the decomposition, across resumes.",
    )
    max_attempts: int = Field(default=3, ge=1)
    backoff_base_s: float = Field(default=1.0, ge=0)
    timeout_s: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    max_retry_after_s: float = Field(default=300.0, ge=0, allow_inf_nan=False)
    max_output_tokens: int = Field(default=300, ge=16)
    input_price_per_mtok: float | None = Field(default=None, ge=0)
    output_price_per_mtok: float | None = Field(default=None, ge=0)

    n_components: int | None = Field(default=50, ge=1, description="Components sampled (seeded).")
    n_trials: int = Field(default=5, ge=1, description="Trials per component.")
    seed: int = 0
    harvest_run: str | None = None
    max_example_tokens: int = Field(default=64, ge=4)
    density_tolerance: float = Field(
        default=0.5, gt=0, description="Intruder: |d_other - d_target| <= tolerance * d_target."
    )
    n_real: int = Field(default=4, ge=2, description="Intruder: real examples per trial.")
    n_positive: int = Field(default=5, ge=1, description="Detection: activating examples.")
    n_negative: int = Field(default=5, ge=1, description="Detection: non-activating examples.")
    n_fuzz_examples: int = Field(default=6, ge=2, description="Fuzzing: examples per trial.")
    positives: Literal["quantiles", "top_and_reservoir"] = Field(
        default="quantiles",
        description="Detection/fuzzing positives: 'quantiles' bins the reservoir (uniform over "
        "all firings) into n_quantiles bins, top-K only in the top bin (delphi); "
        "'top_and_reservoir' spreads over the pooled top-K and reservoir (before #15).",
    )
    n_quantiles: int = Field(
        default=10, ge=1, description="Activation quantile bins of positives (delphi's default)."
    )
    negatives: Literal["random", "similar_density"] = Field(
        default="random",
        description="Detection negatives: 'random' windows of any component's reservoir, "
        "weighted by firing count (delphi's default); 'similar_density' windows of components "
        "within density_tolerance of the target's density. Both checked not to fire.",
    )
    window: Literal["as_recorded", "prefer_alone", "widen"] = Field(
        default="as_recorded",
        description="Positives whose firing the window alone does not reproduce: show as "
        "recorded, prefer others in the same bin, or widen the left context (bounded).",
    )
    max_widen_tokens: int = Field(
        default=64, ge=1, description="window='widen': at most this many tokens of left context."
    )
    label_model: str | None = Field(
        default=None, description="Detection/fuzzing: use labels by this autointerp model only."
    )
    force: bool = Field(
        default=False, description="Judge again the trials a previous run already judged."
    )
    batch: bool = Field(
        default=False, description="Judge through the provider's batch API (half price, <= 24 h)."
    )
    poll_interval_s: float = Field(
        default=30.0, gt=0, allow_inf_nan=False, description="Seconds between batch polls."
    )
    cancel_batches: bool = Field(
        default=False,
        description="Judge nothing: cancel this run's open batches and record what they "
        "return (finished trials billed and kept, the rest failed trials a re-run retries).",
    )
    convention: JudgeConvention = Field(
        default="spd-host",
        description="Detection/fuzzing: whose definitions (docs/evals.md); sets the defaults "
        "of the five options below.",
    )
    prompt_form: Literal["select", "binary"] | None = Field(
        default=None,
        description="select: name every positive example; binary: one 0/1 per example "
        "(delphi). Default: binary under delphi, else select.",
    )
    n_examples_shown: int | None = Field(
        default=None,
        ge=1,
        description="Ask each component's examples, pooled over its trials and shuffled, this "
        "many per prompt (delphi's n_examples_shown); None: one prompt per trial. Default: 5 "
        "under delphi.",
    )
    logprobs: bool | None = Field(
        default=None,
        description="Binary form: ask the provider for logprobs for P(1) and AUROC. Default: "
        "on under delphi.",
    )
    top_logprobs: int = Field(default=5, ge=1, le=20, description="Alternatives per token.")
    fuzz_type: Literal["spd-host", "default", "active"] | None = Field(
        default=None,
        description="Fuzzing: spd-host (half of the activating examples mis-marked), delphi's "
        "default (non-activating windows with random marks) or active (activating examples "
        "shown twice, once mis-marked). Default: default under delphi.",
    )
    mark_rule: Literal["firing", "delphi"] | None = Field(
        default=None,
        description="Fuzzing marks: firing (the recorded firings) or delphi (activation >= "
        "mark_fraction x the example's max). Default: delphi under delphi.",
    )
    mark_fraction: float = Field(default=0.3, gt=0, le=1, description="delphi mark rule.")

    def judge_style(self) -> dict[str, Any]:
        """The five convention-dependent options with their defaults filled in."""
        delphi = self.convention == "delphi"
        return {
            "prompt_form": self.prompt_form or ("binary" if delphi else "select"),
            "n_examples_shown": self.n_examples_shown or (5 if delphi else None),
            "logprobs": delphi if self.logprobs is None else self.logprobs,
            "fuzz_type": self.fuzz_type or ("default" if delphi else "spd-host"),
            "mark_rule": self.mark_rule or ("delphi" if delphi else "firing"),
        }

    def llm(self) -> Any:
        from spd_host.autointerp.config import AutointerpConfig

        return AutointerpConfig(
            provider=self.provider,
            model=self.model,
            base_url=self.base_url,
            api_key_env=self.api_key_env,
            max_concurrent=self.max_concurrent,
            rpm=self.rpm,
            cost_cap_usd=self.cost_cap_usd,
            max_attempts=self.max_attempts,
            backoff_base_s=self.backoff_base_s,
            timeout_s=self.timeout_s,
            max_retry_after_s=self.max_retry_after_s,
            max_output_tokens=self.max_output_tokens,
            input_price_per_mtok=self.input_price_per_mtok,
            output_price_per_mtok=self.output_price_per_mtok,
            batch=self.batch,
            poll_interval_s=self.poll_interval_s,
            cancel_batches=self.cancel_batches,
        )
