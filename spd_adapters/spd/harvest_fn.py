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

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from spd_adapters._next_token import HarvestForward
from spd_adapters.spd.capture import capture_inputs
from spd_host.adapter import (
    DeferredNextTokenTopK,
    HarvestBatch,
    HarvestFn,
    HarvestOptions,
    NextTokenTopK,
)

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

    forward = spd_forward(model, paths, options)

    @torch.no_grad()
    def harvest(tokens: torch.Tensor) -> HarvestBatch:
        tokens_dev = tokens.to(device)
        inputs, logits, topk = forward(tokens_dev)
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
        return device_batch(tokens_dev, firings, acts, logits, topk)

    return harvest


def spd_forward(
    model: torch.nn.Module, paths: Sequence[str], options: HarvestOptions
) -> HarvestForward:
    """The base model's forward capturing the decomposed modules' inputs; the LM head a block
    of rows at a time when the host wants only the top-k (``spd_adapters._next_token``), with
    the top-k taken of float32 logits as this plugin always has."""
    return HarvestForward(
        model,
        lambda: capture_inputs(model, paths),
        next_token=options.next_token,
        top_k=options.next_token_top_k,
        float_logits=True,
        defer=options.defer_next_token,
    )


def device_batch(
    tokens: torch.Tensor,
    firings: dict[str, torch.Tensor],
    activations: dict[str, dict[str, torch.Tensor]],
    logits: torch.Tensor | None,
    topk: NextTokenTopK | DeferredNextTokenTopK | None,
) -> HarvestBatch:
    """The HarvestBatch of an SPD-style run, left on the device: the host accumulates there.

    Dense sites (the component activations are non-zero off the firings); next tokens as the
    top-k form when the host asked for it (``spd_forward``), else full float32 logits.
    """
    return HarvestBatch(
        tokens=tokens,
        firings=firings,
        activations=activations,
        next_token_logits=logits.float() if logits is not None else None,
        next_token_topk=topk,
    )
