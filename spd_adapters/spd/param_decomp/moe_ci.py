"""param-decomp's ``moe_chunkwise_transformer`` CI function, recomputed in torch from its weights.

Written from the maths of ``param_decomp/core/ci_fn`` (``MoEChunkwiseTransformerCIFn``): one
chunk per target stage (``R`` consecutive target MoE layers), each chunk:

- input: every input tap RMS-normalised without weight (``eps`` = float32 machine epsilon),
  then one dense routing vector per covered layer, ``k * sum_m onehot(ids_m) * w_m`` (``[.., E]``,
  scaled by the fixed top-k so a routed entry is O(1)); concatenated, ``x @ in_proj_w + in_proj_b``;
- ``n_blocks`` pre-norm blocks: ``x += Attn(RMSNorm(x))`` (as the dense chunkwise fn), then with
  ``h = RMSNorm(x)``: ``x += (1/R) sum_r sum_m w_{r,m} E_{r,ids_{r,m}}(h) + S(h)`` where the CI
  expert ``E_{r,e}(h) = (silu(h G_{r,e}) * (h U_{r,e})) D_{r,e}`` (bank ``r`` = covered layer
  ``r``, dispatched by THAT layer's captured routing) and ``S`` the dense SwiGLU shared expert;
  no FFN biases;
- heads, one per chunk site: a shared (dense) site ``x @ w + b -> [.., C]``; an expert site of
  layer ``r`` reads the last block's bank-``r`` expert hidden state of each routed slot ``m``,
  ``silu(h G_{r,e}) * (h U_{r,e})`` with ``e = ids_{r,m}``, times its head block ``W[e]
  [expert_ffn, c]`` -> the ``c`` pre-activations of components ``e*c .. e*c+c-1`` (narrow
  emission). Components of experts the token was not routed to have CI exactly 0.

CI is the lower leaky hard sigmoid's forward value ``clip(pre, 0, 1)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from spd_adapters.spd.param_decomp.ci_fns import attention_half, rms_norm


@dataclass
class Routing:
    """One target MoE layer's routing: top-k expert ids ``[.., k]`` and renormalised weights."""

    ids: Tensor
    weights: Tensor


@dataclass
class MoeBlock:
    """One MoE CI block; banks are one ``[E, ., .]`` tensor per covered target layer."""

    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor
    expert_gate: list[Tensor]  # [E, d_model, expert_ffn]
    expert_up: list[Tensor]  # [E, d_model, expert_ffn]
    expert_down: list[Tensor]  # [E, expert_ffn, d_model]
    shared_gate: Tensor  # [d_model, shared_ffn]
    shared_up: Tensor
    shared_down: Tensor  # [shared_ffn, d_model]
    norm_scales: tuple[Tensor, Tensor] | None

    def tensors(self) -> list[Tensor]:
        out = [self.wq, self.wk, self.wv, self.wo, self.shared_gate, self.shared_up]
        out += [self.shared_down, *self.expert_gate, *self.expert_up, *self.expert_down]
        return out + list(self.norm_scales or ())


@dataclass
class MoeHead:
    """A dense head (``w [d_model, C]``, ``b [C]``) or an expert head (``w [E, expert_ffn, c]``
    reading router ``router``'s expert hidden states; no bias)."""

    w: Tensor
    b: Tensor | None
    router: int | None


def _expert_hidden(h: Tensor, gate: Tensor, up: Tensor, ids: Tensor) -> Tensor:
    """``silu(h G[e]) * (h U[e])`` for each routed slot: ``h [T, d]``, ``ids [T, k]`` ->
    ``[T, k, ffn]``. Loops over the experts actually routed (the jobs), never gathers weights
    per token."""
    T, k = ids.shape
    out = h.new_zeros(T, k, gate.shape[-1])
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        x = h[tok]
        out[tok, slot] = F.silu(x @ gate[e]) * (x @ up[e])
    return out


def _per_expert(hidden: Tensor, w: Tensor, ids: Tensor) -> Tensor:
    """``hidden[t, m] @ w[ids[t, m]]``: ``[T, k, f]`` x ``[E, f, o]`` -> ``[T, k, o]``."""
    T, k = ids.shape
    out = hidden.new_zeros(T, k, w.shape[-1])
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        out[tok, slot] = hidden[tok, slot] @ w[e]
    return out


def scatter_narrow(values: Tensor, ids: Tensor, n_experts: int) -> Tensor:
    """Narrow ``[.., k*c]`` (slot-major) -> the site's flat ``[.., E*c]`` (expert-major), zeros
    for unrouted experts."""
    *lead, k = ids.shape
    c = values.shape[-1] // k
    full = values.new_zeros(*lead, n_experts, c)
    full.scatter_(-2, ids.unsqueeze(-1).expand(*lead, k, c), values.view(*lead, k, c))
    return full.reshape(*lead, n_experts * c)


@dataclass
class MoeChunkNet:
    """One MoE chunk: its taps + routings -> per-site narrow or dense pre-activations."""

    in_w: Tensor  # [d_in_total, d_model]
    in_b: Tensor
    blocks: list[MoeBlock]
    heads: list[MoeHead]
    inv_freq: Tensor
    n_heads: int
    n_kv_heads: int
    causal: bool
    n_experts: int

    def __call__(self, taps: list[Tensor], routing: list[Routing]) -> list[Tensor]:
        """Per head: ``[.., C]`` for a dense head, the narrow ``[.., k*c]`` for an expert head."""
        lead = taps[0].shape[:-1]
        parts = [rms_norm(t, None) for t in taps]
        for r in routing:
            k = r.ids.shape[-1]
            dense = r.weights.new_zeros(*r.ids.shape[:-1], self.n_experts)
            parts.append(dense.scatter_add(-1, r.ids, r.weights.float()) * k)
        x = torch.cat(parts, dim=-1) @ self.in_w + self.in_b
        x = x.reshape(-1, *x.shape[-2:]) if x.ndim > 2 else x.unsqueeze(0)
        ids = [r.ids.reshape(-1, r.ids.shape[-1]) for r in routing]
        weights = [r.weights.reshape(-1, r.weights.shape[-1]).float() for r in routing]
        hidden: list[Tensor] = []
        for blk in self.blocks:
            x = attention_half(
                x,
                (blk.wq, blk.wk, blk.wv, blk.wo),
                blk.norm_scales[0] if blk.norm_scales else None,
                self.inv_freq,
                self.n_heads,
                self.n_kv_heads,
                self.causal,
            )
            h3 = rms_norm(x, blk.norm_scales[1] if blk.norm_scales else None)
            h = h3.reshape(-1, h3.shape[-1])
            routed = torch.zeros_like(h)
            hidden = []
            for bank, (gate, up, down) in enumerate(
                zip(blk.expert_gate, blk.expert_up, blk.expert_down, strict=True)
            ):
                hid = _expert_hidden(h, gate, up, ids[bank])
                y = _per_expert(hid, down, ids[bank])  # [T, k, d_model]
                routed = routed + (y * weights[bank].unsqueeze(-1)).sum(dim=1)
                hidden.append(hid)
            shared = (F.silu(h @ blk.shared_gate) * (h @ blk.shared_up)) @ blk.shared_down
            x = x + (routed / len(routing) + shared).view_as(x)
        x_flat = x.reshape(-1, x.shape[-1])
        out = []
        for head in self.heads:
            if head.router is None:
                assert head.b is not None
                y = x_flat @ head.w + head.b
            else:
                y = _per_expert(hidden[head.router], head.w, ids[head.router]).flatten(1)
            out.append(y.reshape(*lead, y.shape[-1]))
        return out

    def tensors(self) -> list[Tensor]:
        out = [self.in_w, self.in_b, self.inv_freq]
        out += [t for h in self.heads for t in (h.w, h.b) if t is not None]
        for blk in self.blocks:
            out += blk.tensors()
        return out


@dataclass
class MoeCiNet:
    """One chunk's wiring: the taps it reads, the target layers whose routing it dispatches on
    (bank order), and its output sites (head order) with each expert site's router index."""

    input_taps: tuple[str, ...]
    routing_layers: tuple[int, ...]
    output_sites: tuple[str, ...]
    net: MoeChunkNet


@dataclass
class MoeCiFunction:
    """The whole ``moe_chunkwise_transformer``: its chunks."""

    nets: list[MoeCiNet]
    n_experts: int
    fn_type: str = "moe_chunkwise_transformer"
    readouts: None = None

    @property
    def input_taps(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for n in self.nets:
            seen.update(dict.fromkeys(n.input_taps))
        return tuple(seen)

    @property
    def routing_layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for n in self.nets for layer in n.routing_layers}))

    def causal_importance(
        self, taps: Mapping[str, Tensor], routing: Mapping[int, Routing]
    ) -> dict[str, Tensor]:
        """Per-site CI ``[.., C]`` (expert sites: zero outside the routed experts)."""
        out: dict[str, Tensor] = {}
        for n in self.nets:
            routes = [routing[layer] for layer in n.routing_layers]
            heads = n.net([taps[k].float() for k in n.input_taps], routes)
            for site, head, pre in zip(n.output_sites, n.net.heads, heads, strict=True):
                ci = pre.clamp(0, 1)
                if head.router is not None:
                    ci = scatter_narrow(ci, routes[head.router].ids, self.n_experts)
                out[site] = ci
        return out

    def tensors(self) -> list[Tensor]:
        return [t for n in self.nets for t in n.net.tensors()]
