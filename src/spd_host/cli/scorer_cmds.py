"""``spd-host eval simulation | embedding | surprisal``: the scorers researchers ran delphi for.

Registered on :data:`spd_host.cli.eval_cmd.eval_app`; the options map onto
:mod:`spd_host.evals.llm.scorer_configs` (unset flags keep the config defaults).
"""

from __future__ import annotations

from typing import Annotated

import typer

from spd_host.cli.common import BaseModelOpt, handles_errors, use_base_model
from spd_host.cli.eval_cmd import (
    BaseUrl,
    Batch,
    CancelBatches,
    CostCap,
    Force,
    HarvestRun,
    IdsArg,
    JsonOut,
    LabelModel,
    ListBatches,
    MaxAttempts,
    MaxConcurrent,
    Model,
    NComponents,
    Negatives,
    NoCostCap,
    NQuantiles,
    NTrials,
    PollInterval,
    Positives,
    Provider,
    Timeout,
    eval_app,
    list_suite_batches,
    run_many,
)

Mode = Annotated[
    str | None,
    typer.Option("--mode", help="json (the judge's integers) or logprobs (expected values)."),
]
TopLogprobs = Annotated[
    int | None, typer.Option("--top-logprobs", help="logprobs mode: alternatives per token.")
]
MaxTokens = Annotated[
    int | None, typer.Option("--max-example-tokens", help="Tokens per window (default 32).")
]
LocalModel = Annotated[
    str | None,
    typer.Option("--model", help="Local model directory or Hugging Face cache name."),
]
NActivating = Annotated[int | None, typer.Option("--n-activating", help="Activating windows.")]
NNon = Annotated[
    int | None, typer.Option("--n-nonactivating", help="Windows on which it does not fire.")
]
Device = Annotated[str | None, typer.Option("--device", help="torch device (default cuda/cpu).")]
LocalBatch = Annotated[int | None, typer.Option("--batch-size", help="Windows per forward.")]


@eval_app.command("simulation")
@handles_errors
def simulation(
    ids: IdsArg,
    provider: Provider = None,
    model: Model = None,
    base_url: BaseUrl = None,
    mode: Mode = None,
    top_logprobs: TopLogprobs = None,
    max_concurrent: MaxConcurrent = None,
    cost_cap: CostCap = None,
    no_cost_cap: NoCostCap = False,
    timeout: Timeout = None,
    max_attempts: MaxAttempts = None,
    n_components: NComponents = None,
    n_trials: NTrials = None,
    n_nonactivating: NNon = None,
    max_example_tokens: MaxTokens = None,
    positives: Positives = None,
    n_quantiles: NQuantiles = None,
    negatives: Negatives = None,
    harvest_run: HarvestRun = None,
    label_model: LabelModel = None,
    force: Force = False,
    batch: Batch = False,
    poll_interval: PollInterval = None,
    list_batches: ListBatches = False,
    cancel_batches: CancelBatches = False,
    json_out: JsonOut = False,
    base_model: BaseModelOpt = None,
) -> None:
    """Label predictiveness: the judge simulates per-token activations (Pearson correlation)."""
    use_base_model(base_model)
    if list_batches:
        list_suite_batches("simulation", ids, json_out=json_out)
        return
    options = {
        "provider": provider, "model": model, "base_url": base_url, "mode": mode,
        "top_logprobs": top_logprobs, "max_concurrent": max_concurrent, "cost_cap_usd": cost_cap,
        "no_cost_cap": no_cost_cap, "timeout_s": timeout, "max_attempts": max_attempts,
        "n_components": n_components, "n_trials": n_trials, "n_nonactivating": n_nonactivating,
        "max_example_tokens": max_example_tokens, "harvest_run": harvest_run,
        "label_model": label_model, "force": force, "positives": positives,
        "n_quantiles": n_quantiles, "negatives": negatives, "batch": batch or None,
        "poll_interval_s": poll_interval, "cancel_batches": cancel_batches or None,
    }  # fmt: skip
    run_many(["simulation"], ids, options, json_out=json_out, wandb=False, wandb_project="")


def _local_command(suite: str, doc: str) -> None:
    def command(
        ids: IdsArg,
        model: LocalModel = None,
        n_components: NComponents = None,
        n_activating: NActivating = None,
        n_nonactivating: NNon = None,
        max_example_tokens: MaxTokens = None,
        positives: Positives = None,
        n_quantiles: NQuantiles = None,
        negatives: Negatives = None,
        batch_size: LocalBatch = None,
        device: Device = None,
        harvest_run: HarvestRun = None,
        label_model: LabelModel = None,
        force: Force = False,
        json_out: JsonOut = False,
        base_model: BaseModelOpt = None,
    ) -> None:
        use_base_model(base_model)
        options = {
            "model": model, "n_components": n_components, "n_activating": n_activating,
            "n_nonactivating": n_nonactivating, "max_example_tokens": max_example_tokens,
            "batch_size": batch_size, "device": device, "harvest_run": harvest_run,
            "label_model": label_model, "force": force, "positives": positives,
            "n_quantiles": n_quantiles, "negatives": negatives,
        }  # fmt: skip
        run_many([suite], ids, options, json_out=json_out, wandb=False, wandb_project="")

    command.__doc__ = doc
    eval_app.command(suite)(handles_errors(command))


_local_command(
    "embedding",
    "Label retrieval: AUROC of label-window embedding similarity ('--model offline': baseline).",
)
_local_command(
    "surprisal",
    "Label informativeness: AUROC of a causal LM's loss decrease with the label as prefix.",
)
