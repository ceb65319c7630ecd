"""A qwen36_moe decomposition bound to its transformers target, in the shape the harvest takes.

Like ``PdModel``: ``paths`` are the modules whose *input* is captured on a clean forward
(residual-stream taps, the mixer projections, each layer's MoE block, the shared experts' down
projections) and ``site_paths`` the decomposed sites' torch paths; ``causal_importance`` and
``component_acts`` map the captured inputs to ``[.., C]`` per site. Routing is recomputed from the
captured MoE input with the target's own router (the clean forward's routing, bit for bit the
arithmetic of HF's ``Qwen3_5MoeTopKRouter``); the CI function never routes for itself.

The fused expert sites are not modules, so the SPD splice (which replaces module outputs)
does not extend to them; ``moe_splice`` splices these runs (routing pinned, expert blocks).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from spd_adapters.spd.param_decomp import qwen36_moe as q
from spd_adapters.spd.param_decomp.moe_ci import Routing
from spd_adapters.spd.param_decomp.moe_tree import MoeDecomposition
from spd_adapters.spd.param_decomp.structure import SiteInfo, Structure
from spd_adapters.spd.param_decomp.target import TargetLayout


class PdMoeModel:
    def __init__(
        self,
        model: nn.Module,
        layout: TargetLayout,
        structure: Structure,
        dec: MoeDecomposition,
    ):
        self.layout = layout
        self.dec = dec
        self.ci_fn = dec.ci_fn
        self.site_of_path: dict[str, SiteInfo] = {
            layout.site_path(s.name): s for s in structure.sites
        }
        self.tap_paths = {t: layout.tap_path(t) for t in dec.ci_fn.input_taps}
        # Every layer has an MoE; all are routed (the CI's routing vectors, the MoE sites' inputs,
        # and the splice, which pins every layer's routing to the clean forward's).
        self.routed_layers = list(range(layout.n_layer))
        self._mlp = {
            layer: model.get_submodule(layout.site_path(f"layers.{layer}.mlp"))
            for layer in self.routed_layers
        }

    def _input_path(self, s: SiteInfo) -> str:
        return self.layout.site_path(q.input_module(s.layer, s.kind))

    def _mlp_path(self, layer: int) -> str:
        return self.layout.site_path(f"layers.{layer}.mlp")

    def mlp_path(self, layer: int) -> str:
        """torch path of layer ``layer``'s MoE block."""
        return self._mlp_path(layer)

    @property
    def moe_layers(self) -> list[int]:
        return self.routed_layers

    @property
    def paths(self) -> list[str]:
        out = {self._input_path(s) for s in self.site_of_path.values()}
        out |= set(self.tap_paths.values()) | {self._mlp_path(b) for b in self.routed_layers}
        return sorted(out)

    @property
    def site_paths(self) -> list[str]:
        return sorted(self.site_of_path)

    def to(self, device: torch.device | str) -> PdMoeModel:
        for d in (self.dec.V, self.dec.U):
            for k in d:
                d[k] = d[k].to(device)
        for n in self.ci_fn.nets:
            net = n.net
            net.in_w, net.in_b, net.inv_freq = (
                net.in_w.to(device),
                net.in_b.to(device),
                net.inv_freq.to(device),
            )
            for h in net.heads:
                h.w = h.w.to(device)
                h.b = None if h.b is None else h.b.to(device)
            for blk in net.blocks:
                for name in ("wq", "wk", "wv", "wo", "shared_gate", "shared_up", "shared_down"):
                    setattr(blk, name, getattr(blk, name).to(device))
                for name in ("expert_gate", "expert_up", "expert_down"):
                    setattr(blk, name, [t.to(device) for t in getattr(blk, name)])
                if blk.norm_scales is not None:
                    blk.norm_scales = (blk.norm_scales[0].to(device), blk.norm_scales[1].to(device))
        return self

    def routing(self, inputs: Mapping[str, Tensor]) -> dict[int, Routing]:
        """Each MoE layer's top-k ids and renormalised weights, from its captured input."""
        out = {}
        for layer, mlp in self._mlp.items():
            gate = mlp.get_submodule("gate")
            h = inputs[self._mlp_path(layer)].float()
            top_k = getattr(gate, "top_k", None)
            assert isinstance(top_k, int), "a Qwen3.5-MoE router carries top_k"
            out[layer] = q.route(h, q._param(gate, "weight").float(), top_k)
        return out

    def component_acts(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``x V`` per site path (expert sites: the routed experts' blocks, zero elsewhere)."""
        routes = self.routing(inputs)
        out: dict[str, Tensor] = {}
        for path, s in self.site_of_path.items():
            V = self.dec.V[s.name]
            x = inputs[self._input_path(s)].float()
            if s.kind in q.EXPERT_KINDS:
                r = routes[s.layer]
                if s.kind == "experts_down":
                    slots = q.expert_site_input(x, self._mlp[s.layer].get_submodule("experts"), r)
                else:
                    slots = x.unsqueeze(-2).expand(*x.shape[:-1], r.ids.shape[-1], x.shape[-1])
                out[path] = q.blocked_acts(slots, V, r.ids)
                continue
            if s.kind == "shared_down":  # HF runs the shared expert on the flattened tokens
                lead = inputs[self._mlp_path(s.layer)].shape[:-1]
                x = x.reshape(*lead, x.shape[-1])
            out[path] = x @ V
        return out

    def causal_importance(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        taps = {t: inputs[p] for t, p in self.tap_paths.items()}
        ci = self.ci_fn.causal_importance(taps, self.routing(inputs))
        by_name = {s.name: p for p, s in self.site_of_path.items()}
        return {by_name[site]: v for site, v in ci.items()}
