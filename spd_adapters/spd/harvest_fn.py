"""The SPD HarvestFn: one forward of the base model per batch -> CI and component activations.

Activation types, per site (= decomposed module), each ``[B, S, C]``:

- ``causal_importance`` (primary): the CI function's output through the run's sigmoid, always
  the *noiseless* value. Runs trained with ``sampling: binomial`` add uniform noise to the
  pre-activation in training; harvest must be reproducible, so it is left out here.
- ``component_activation``: ``(x V)_c * ||U_c||``, the size of the component's contribution to
  the module's output (for an embedding, ``V[token, c] * ||U_c||``).

A component fires where its causal importance > ``options.threshold``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from spd_adapters.spd.capture import capture_inputs, logits_of
from spd_host.adapter import HarvestBatch, HarvestFn, HarvestOptions, next_token_topk_of

if TYPE_CHECKING:
    from spd_adapters.spd.adapter import SpdAdapter

ACTIVATION_TYPES = ("causal_importance", "component_activation")


def make_harvest_fn(adapter: SpdAdapter, options: HarvestOptions) -> HarvestFn:
    model = adapter.load_base_model()
    spd = adapter.spd_model()
    device = torch.device(options.device)
    model.to(device)
    spd.to(device)
    site_of = adapter.site_names_by_path()
    paths = spd.paths

    @torch.no_grad()
    def harvest(tokens: torch.Tensor) -> HarvestBatch:
        tokens_dev = tokens.to(device)
        with capture_inputs(model, paths) as inputs:
            out = model(tokens_dev)
        ci = spd.causal_importance(inputs)
        firings: dict[str, torch.Tensor] = {}
        acts: dict[str, dict[str, torch.Tensor]] = {}
        for path in paths:
            comp = spd.components[path]
            a = comp.component_acts(inputs[path]) * comp.u_norms()
            site = site_of[path]
            c = ci[path].float()
            firings[site] = c > options.threshold
            acts[site] = {"causal_importance": c, "component_activation": a.float()}
        return device_batch(tokens_dev, firings, acts, out, options)

    return harvest


def device_batch(
    tokens: torch.Tensor,
    firings: dict[str, torch.Tensor],
    activations: dict[str, dict[str, torch.Tensor]],
    model_output: object,
    options: HarvestOptions,
) -> HarvestBatch:
    """The HarvestBatch of an SPD-style run, left on the device: the host accumulates there.

    Dense sites (the component activations are non-zero off the firings); next tokens as the
    top-k form when the host asks for it, else full logits.
    """
    logits = logits_of(model_output).float() if options.next_token else None
    top_k = options.next_token_top_k
    return HarvestBatch(
        tokens=tokens,
        firings=firings,
        activations=activations,
        next_token_logits=logits if top_k is None else None,
        next_token_topk=next_token_topk_of(logits, top_k)
        if logits is not None and top_k is not None
        else None,
    )
