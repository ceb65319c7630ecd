"""Splicing a qwen36_moe decomposition into its transformers ``Qwen3_5MoeForCausalLM`` target.

The masked forward follows param-decomp's ``targets/qwen36_moe.py`` (its ``_moe_forward`` and the
routed decomposed expert arm), in torch on HF's modules:

- **Routing is pinned.** A clean forward runs first (as for every SPD splice, its CI is the
  mask source); it also fixes each layer's top-k expert ids. In the masked forward every MoE
  layer keeps those ids, and its mixing weights are recomputed from the *masked* residual's
  router softmax gathered at them and renormalised (a forward hook on ``mlp.gate``). With
  unperturbed upstream this reproduces the clean routing exactly; nothing re-routes.
- **Dense sites** (attention / DeltaNet projections, the shared expert's ``gate/up/down``): the
  module's output becomes ``((x V) * m) U`` (these Linears have no bias). The DeltaNet
  ``q/k/v`` sites are row blocks ``[0, kd) / [kd, 2kd) / [2kd, 2kd + vd)`` of the fused
  ``in_proj_qkv`` output; only their rows are replaced.
- **Expert sites** (``mlp.experts.{gate,up,down}_proj``, expert-blocked ``V [E, d_in, c]``):
  per routed (token, slot ``m``) with expert ``e = ids_m`` and weight ``w_m``: ``g, u`` =
  ``((h V_e) * mask_m) U_e`` for a spliced gate/up (else ``h W_e^T``), the down input
  ``silu(g) * u * w_m`` (routing weight folded into the input, as param-decomp does), then the
  down site likewise, summed unweighted over the slots. ``mask_m`` is the site's flat
  ``[.., E*c]`` mask at columns ``e*c .. e*c + c``. Expert kinds not spliced run frozen on the
  same routing.
- Masks per variant as in ``spd_adapters.spd.splice`` (``ci_masked``, ``rounded_ci``
  (``torch.round``), ``all_ones``, ``zero_mask``, ``random``, ``stochastic`` = ``ci + (1 - ci) r``
  plus ``r' * (W x - V U x)`` with one uniform ``r'`` per position, per routed slot for experts).

HF runs the MoE block (router, experts, shared expert) on the flattened tokens ``[B*S, d]``;
masks ``[B, S, C]`` are flattened the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spd_adapters.spd.capture import capture_inputs
from spd_adapters.spd.param_decomp import qwen36_moe as q
from spd_adapters.spd.param_decomp.moe_model import PdMoeModel
from spd_adapters.spd.param_decomp.structure import SiteInfo
from spd_adapters.spd.splice import SPLICE_VARIANTS, CiCache, _first_tensor
from spd_host.errors import ConfigError

_NEEDS_CI = ("ci_masked", "rounded_ci", "stochastic")
_ROUTING_KEY = "\0routing."  # routing ids ride in the CI cache under keys no site can have


@dataclass(frozen=True)
class _Clean:
    ci: dict[str, Tensor]  # site path -> [B, S, C]
    ids: dict[int, Tensor]  # MoE layer -> [B*S, k]


def _mask(variant: str, ci: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    if variant == "all_ones":
        return torch.ones(shape, dtype=like.dtype, device=like.device)
    if variant == "zero_mask":
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    if variant == "random":
        return torch.rand(shape, dtype=like.dtype, device=like.device)
    assert ci is not None
    ci = ci.reshape(shape).to(like.dtype)
    if variant == "ci_masked":
        return ci
    if variant == "rounded_ci":
        return ci.round()
    return ci + (1 - ci) * torch.rand(shape, dtype=like.dtype, device=like.device)


def _masked(x: Tensor, V: Tensor, U: Tensor, m: Tensor) -> Tensor:
    return ((x @ V.to(x.dtype)) * m) @ U.to(x.dtype)


class _Plan:
    """Which modules a splice of ``site_paths`` hooks, and how."""

    def __init__(self, model: nn.Module, pd: PdMoeModel, site_paths: Sequence[str]):
        self.pd = pd
        self.sites: list[tuple[str, SiteInfo]] = [(p, pd.site_of_path[p]) for p in site_paths]
        self.expert_layers = sorted({s.layer for _, s in self.sites if s.kind in q.EXPERT_KINDS})
        self.rows: dict[str, slice] = {}
        for path, s in self.sites:
            if s.kind in ("gdn_q", "gdn_k", "gdn_v"):
                fused = model.get_submodule(path.rsplit(".", 1)[0])
                assert isinstance(fused, nn.Linear)
                key_dim = q.site_dims(model, pd.layout.prefix, s.layer, "gdn_q").d_out
                start = {"gdn_q": 0, "gdn_k": key_dim, "gdn_v": 2 * key_dim}[s.kind]
                stop = start + key_dim if s.kind != "gdn_v" else fused.out_features
                self.rows[path] = slice(start, stop)

    def module_of(self, path: str, s: SiteInfo) -> str:
        if s.kind in ("gdn_q", "gdn_k", "gdn_v"):
            return path.rsplit(".", 1)[0]
        return path


def _clean_pass(
    model: nn.Module, pd: PdMoeModel, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _Clean:
    with torch.no_grad(), capture_inputs(model, pd.paths) as inputs:
        model(*args, **kwargs)
    routes = pd.routing(inputs)
    ids = {layer: r.ids.reshape(-1, r.ids.shape[-1]) for layer, r in routes.items()}
    return _Clean(ci=pd.causal_importance(inputs), ids=ids)


@contextmanager
def moe_splice(
    model: nn.Module,
    pd: PdMoeModel,
    site_paths: Sequence[str],
    variant: str,
    *,
    ci_cache: CiCache | None = None,
) -> Iterator[None]:
    """Within the context, forwards of ``model`` run with ``site_paths`` (torch paths of
    decomposed sites) replaced by their masked components and every MoE layer's routing
    pinned to the clean forward's."""
    if variant not in SPLICE_VARIANTS:
        raise ConfigError(
            f"unknown SPD splice variant {variant!r}", hint=f"one of: {', '.join(SPLICE_VARIANTS)}"
        )
    plan = _Plan(model, pd, site_paths)
    cache = ci_cache if ci_cache is not None else CiCache()
    state: dict[str, Any] = {"clean": False, "run": None}

    def pre_forward(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if state["clean"]:
            return
        tokens = _first_tensor(args, kwargs)
        cached = cache.get(tokens, ("moe",)) if tokens is not None else None
        if cached is None:
            state["clean"] = True  # the nested clean forward: no pinning, no replacement
            try:
                clean = _clean_pass(model, pd, args, kwargs)
            finally:
                state["clean"] = False
            cached = {**clean.ci, **{f"{_ROUTING_KEY}{k}": v for k, v in clean.ids.items()}}
            if tokens is not None:
                cache.put(tokens, ("moe",), cached)
        state["run"] = cached

    def ci_of(path: str) -> Tensor | None:
        return state["run"][path] if variant in _NEEDS_CI else None

    def pin(layer: int) -> Any:
        def hook(_m: nn.Module, _args: Any, output: Any) -> Any:
            if state["clean"]:
                return None
            logits, _weights, _ids = output
            ids = state["run"][f"{_ROUTING_KEY}{layer}"]
            probs = F.softmax(logits, dtype=torch.float, dim=-1)
            top = probs.gather(-1, ids)
            return logits, (top / top.sum(-1, keepdim=True)).to(logits.dtype), ids

        return hook

    def dense(path: str, s: SiteInfo) -> Any:
        V, U = pd.dec.V[s.name], pd.dec.U[s.name]
        rows = plan.rows.get(path)

        def hook(_m: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
            if state["clean"]:
                return None
            x = args[0]
            m = _mask(variant, ci_of(path), (*x.shape[:-1], V.shape[-1]), x)
            out = _masked(x, V, U, m)
            own = output if rows is None else output[..., rows]
            if variant == "stochastic":
                r = torch.rand(out.shape[:-1], dtype=out.dtype, device=out.device)
                out = out + r.unsqueeze(-1) * (own - _masked(x, V, U, torch.ones_like(m)))
            if rows is None:
                return out.to(output.dtype)
            spliced = output.clone()
            spliced[..., rows] = out.to(output.dtype)
            return spliced

        return hook

    def experts(layer: int, kinds: dict[str, tuple[str, SiteInfo]]) -> Any:
        def hook(m: nn.Module, args: tuple[Any, ...], _output: Tensor) -> Tensor | None:
            if state["clean"]:
                return None
            h, ids, weights = args
            return _expert_forward(m, h, ids, weights, kinds, pd, variant, ci_of)

        return hook

    with ExitStack() as stack:
        stack.callback(model.register_forward_pre_hook(pre_forward, with_kwargs=True).remove)
        for layer in pd.moe_layers:
            gate = model.get_submodule(pd.mlp_path(layer) + ".gate")
            stack.callback(gate.register_forward_hook(pin(layer)).remove)
        by_layer: dict[int, dict[str, tuple[str, SiteInfo]]] = {}
        for path, s in plan.sites:
            if s.kind in q.EXPERT_KINDS:
                by_layer.setdefault(s.layer, {})[s.kind] = (path, s)
                continue
            module = model.get_submodule(plan.module_of(path, s))
            stack.callback(module.register_forward_hook(dense(path, s)).remove)
        for layer, kinds in by_layer.items():
            module = model.get_submodule(pd.mlp_path(layer) + ".experts")
            stack.callback(module.register_forward_hook(experts(layer, kinds)).remove)
        yield


def _expert_forward(
    experts: nn.Module,
    h: Tensor,
    ids: Tensor,
    weights: Tensor,
    kinds: dict[str, tuple[str, SiteInfo]],
    pd: PdMoeModel,
    variant: str,
    ci_of: Any,
) -> Tensor:
    """The routed experts with the spliced kinds through their masked expert blocks.
    ``h [N, d]``, ``ids``/``weights [N, k]`` (pinned ids, recomputed weights)."""
    gate_up = q._param(experts, "gate_up_proj")  # [E, 2 di, d]
    down = q._param(experts, "down_proj")  # [E, d, di]
    di = gate_up.shape[1] // 2
    n_e = gate_up.shape[0]
    masks: dict[str, Tensor] = {}
    for kind, (path, s) in kinds.items():
        c = pd.dec.V[s.name].shape[-1]
        masks[kind] = _mask(variant, ci_of(path), (h.shape[0], n_e * c), h)
    # one uniform per (token, slot) and site for the stochastic weight delta
    deltas = {
        kind: torch.rand(ids.shape, dtype=h.dtype, device=h.device)
        for kind in kinds
        if variant == "stochastic"
    }

    def site(kind: str, e: int, x: Tensor, tok: Tensor, slot: Tensor, frozen: Tensor) -> Tensor:
        spec = kinds.get(kind)
        if spec is None:
            return x @ frozen.T
        V, U = pd.dec.V[spec[1].name][e], pd.dec.U[spec[1].name][e]
        c = V.shape[-1]
        out = _masked(x, V, U, masks[kind][tok, e * c : (e + 1) * c])
        if kind in deltas:
            full = _masked(x, V, U, torch.ones(1, c, dtype=x.dtype, device=x.device))
            out = out + deltas[kind][tok, slot].unsqueeze(-1) * (x @ frozen.T - full)
        return out

    out = torch.zeros_like(h)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        x = h[tok]
        g = site("experts_gate", e, x, tok, slot, gate_up[e, :di])
        u = site("experts_up", e, x, tok, slot, gate_up[e, di:])
        hidden = F.silu(g) * u * weights[tok, slot].unsqueeze(-1).to(h.dtype)
        y = site("experts_down", e, hidden, tok, slot, down[e])
        out.index_add_(0, tok, y.to(out.dtype))
    return out
