"""The param-decomp HarvestFn: one forward of the target per batch -> CI and component activations.

Per site ``[B, S, C]``: ``causal_importance`` (primary; ``clip(pre, 0, 1)``, the value the
trainer's masks use) and ``component_activation`` = ``x V`` (param-decomp's own definition,
``ComponentStacks.component_activations``). A component fires where CI > ``options.threshold``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from spd_adapters.spd.harvest_fn import device_batch, spd_forward
from spd_host.adapter import HarvestBatch, HarvestFn, HarvestOptions

if TYPE_CHECKING:
    from spd_adapters.spd.param_decomp.adapter import PdAdapter

ACTIVATION_TYPES = ("causal_importance", "component_activation")


def make_pd_harvest_fn(adapter: PdAdapter, options: HarvestOptions) -> HarvestFn:
    model = adapter.load_base_model()
    pd = adapter.pd_model()
    device = torch.device(options.device)
    model.to(device)
    pd.to(device)
    site_of = adapter.site_names_by_path()

    forward = spd_forward(model, pd.paths, options)

    @torch.no_grad()
    def harvest(tokens: torch.Tensor) -> HarvestBatch:
        tokens_dev = tokens.to(device)
        inputs, logits, topk = forward(tokens_dev)
        ci = pd.causal_importance(inputs)
        acts = pd.component_acts(inputs)
        firings: dict[str, torch.Tensor] = {}
        activations: dict[str, dict[str, torch.Tensor]] = {}
        for path in pd.site_paths:
            site = site_of[path]
            c = ci[path].float()
            firings[site] = c > options.threshold
            activations[site] = {
                "causal_importance": c,
                "component_activation": acts[path].float(),
            }
        return device_batch(tokens_dev, firings, activations, logits, topk)

    return harvest
