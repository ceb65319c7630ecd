"""The qwen36_moe site family on a transformers ``Qwen3_5MoeForCausalLM`` target.

Facts from param-decomp ``targets/qwen36_moe.py``: a layer has ONE token mixer (gated DeltaNet,
or gated full attention on every ``full_attention_interval``-th layer: ``(i + 1) % interval ==
0``) and an MoE MLP (routed experts, top-k of a softmax, renormalised; plus a shared expert).
Site names are decoder-relative HF module paths; the DeltaNet q/k/v are the row blocks of the
fused ``in_proj_qkv`` (``.q``/``.k``/``.v`` sub-paths), the ``experts_*`` sites the fused
all-expert matrices (``mlp.experts.{gate,up,down}_proj``; HF stores them as one
``gate_up_proj [E, 2*di, d]`` and ``down_proj [E, d, di]``). A kind's V/U stack slot ``s`` is the
``s``-th layer that has the kind. Expert kinds are expert-blocked: ``Vs [g, E, d_in_e, c]``,
``Us [g, E, c, d_out_e]``, flat component index ``e*c + j`` (expert-major).

Site inputs (the tensors ``x`` of ``x V``): the mixer projections read their module's input;
the MoE kinds read the MoE block input ``h`` (post-attention norm output). The routed expert
``e``'s gate/up read ``h`` on the tokens routed to ``e``; its down reads ``w_e * hidden_e``
(``hidden_e = silu(h Wg_e^T) * (h Wu_e^T)``: routing weights fold into the down site's input,
so unrouted experts' down activations are exactly zero). Component activations of expert
sites are reported for the routed experts only (zero elsewhere), as their CI is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spd_adapters.spd.param_decomp.moe_ci import Routing
from spd_host.errors import FormatError

SUFFIX = {
    "gdn_q": "linear_attn.in_proj_qkv.q",
    "gdn_k": "linear_attn.in_proj_qkv.k",
    "gdn_v": "linear_attn.in_proj_qkv.v",
    "gdn_z": "linear_attn.in_proj_z",
    "gdn_b": "linear_attn.in_proj_b",
    "gdn_a": "linear_attn.in_proj_a",
    "gdn_out": "linear_attn.out_proj",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_o": "self_attn.o_proj",
    "experts_gate": "mlp.experts.gate_proj",
    "experts_up": "mlp.experts.up_proj",
    "experts_down": "mlp.experts.down_proj",
    "shared_gate": "mlp.shared_expert.gate_proj",
    "shared_up": "mlp.shared_expert.up_proj",
    "shared_down": "mlp.shared_expert.down_proj",
}
EXPERT_KINDS = frozenset({"experts_gate", "experts_up", "experts_down"})
GDN_KINDS = frozenset(k for k in SUFFIX if k.startswith("gdn_"))
ATTN_KINDS = frozenset(k for k in SUFFIX if k.startswith("attn_"))
# The module (below ``layers.{i}.``) whose first forward argument is each kind's input.
_INPUT_MODULE = {
    **dict.fromkeys(
        ("gdn_q", "gdn_k", "gdn_v", "gdn_z", "gdn_b", "gdn_a"), "linear_attn.in_proj_qkv"
    ),
    "gdn_out": "linear_attn.out_proj",
    **dict.fromkeys(("attn_q", "attn_k", "attn_v"), "self_attn.q_proj"),
    "attn_o": "self_attn.o_proj",
    **dict.fromkeys(
        ("experts_gate", "experts_up", "experts_down", "shared_gate", "shared_up"), "mlp"
    ),
    "shared_down": "mlp.shared_expert.down_proj",
}


_MIXER_IN = frozenset({"gdn_q", "gdn_k", "gdn_v", "gdn_z", "gdn_b", "gdn_a"})


def site_io(layer: int, kind: str, address: str | None, path: str) -> tuple[str, tuple[str, ...]]:
    """Where a qwen36_moe site reads from / writes to (hook points of the registered
    ``qwen3_5_moe`` topology). Sites with a canonical address (full attention's ``q/k/v/o``, the
    DeltaNet ``out_proj`` = ``attn_fused.o``) follow the SPD rule; a site that is not a whole
    module with an address (the DeltaNet ``q/k/v`` row blocks, ``z/b/a``, the fused expert
    matrices, the shared expert) writes the output of the sublayer it feeds (``{i}.attn_out``
    or ``{i}.mlp_out``) and reads the sublayer's input where that is its input."""
    if address is not None:
        from spd_adapters.spd.adapter import _site_io

        return _site_io(address)
    if kind in _MIXER_IN:
        return f"{layer}.attn_in", (f"{layer}.attn_out",)
    reads = path if kind in ("experts_down", "shared_down") else f"{layer}.mlp_in"
    return reads, (f"{layer}.mlp_out",)


def site_name(layer: int, kind: str) -> str:
    return f"layers.{layer}.{SUFFIX[kind]}"


def layer_has(kind: str, layer: int, full_attention: frozenset[int]) -> bool:
    if kind in GDN_KINDS:
        return layer not in full_attention
    if kind in ATTN_KINDS:
        return layer in full_attention
    return True


def full_attention_layers(model: nn.Module, prefix: str, n_layer: int) -> frozenset[int]:
    """The layers whose mixer is full attention (they have ``self_attn``), read off the target."""
    names = {n for n, _ in model.named_modules()}
    return frozenset(i for i in range(n_layer) if f"{prefix}layers.{i}.self_attn" in names)


def input_module(layer: int, kind: str) -> str:
    return f"layers.{layer}.{_INPUT_MODULE[kind]}"


def _text_config(model: nn.Module) -> object:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "text_config", None) or cfg


@dataclass(frozen=True)
class SiteDims:
    """``d_in``/``d_out`` of a dense site, or of ONE expert block (``n_experts`` set)."""

    d_in: int
    d_out: int
    n_experts: int | None = None


def site_dims(model: nn.Module, prefix: str, layer: int, kind: str) -> SiteDims:
    base = f"{prefix}layers.{layer}."
    try:
        if kind in EXPERT_KINDS:
            experts = model.get_submodule(f"{base}mlp.experts")
            n_e, two_di, d = _param(experts, "gate_up_proj").shape
            di = two_di // 2
            return SiteDims(di, d, n_e) if kind == "experts_down" else SiteDims(d, di, n_e)
        if kind in ("gdn_q", "gdn_k", "gdn_v"):
            qkv = model.get_submodule(f"{base}linear_attn.in_proj_qkv")
            cfg = _text_config(model)
            key_dim = int(cfg.linear_num_key_heads * cfg.linear_key_head_dim)  # type: ignore[attr-defined]
            assert isinstance(qkv, nn.Linear)
            value_dim = qkv.out_features - 2 * key_dim
            return SiteDims(qkv.in_features, value_dim if kind == "gdn_v" else key_dim)
        lin = model.get_submodule(f"{prefix}{site_name(layer, kind)}")
    except AttributeError as err:
        raise FormatError(
            f"the target has no {site_name(layer, kind)!r} for a decomposed qwen36_moe site ({err})"
        ) from err
    if not isinstance(lin, nn.Linear):
        raise FormatError(f"decomposed site {site_name(layer, kind)!r} is not a Linear")
    return SiteDims(lin.in_features, lin.out_features)


def _param(module: nn.Module, name: str) -> Tensor:
    value = getattr(module, name, None)
    if not isinstance(value, Tensor):
        raise FormatError(
            f"{type(module).__name__} has no tensor {name!r}: not a Qwen3.5-MoE target"
        )
    return value


def n_experts(model: nn.Module, prefix: str) -> int:
    experts = model.get_submodule(f"{prefix}layers.0.mlp.experts")
    return int(_param(experts, "gate_up_proj").shape[0])


def route(h: Tensor, router_weight: Tensor, k: int) -> Routing:
    """HF ``Qwen3_5MoeTopKRouter``: fp32 softmax over all experts of ``h Wr^T``, top-k
    (descending), renormalised over the k."""
    probs = F.linear(h, router_weight).float().softmax(dim=-1)
    top, ids = torch.topk(probs, k, dim=-1)
    return Routing(ids=ids, weights=top / top.sum(dim=-1, keepdim=True))


def expert_site_input(h: Tensor, experts: nn.Module, routing: Routing) -> Tensor:
    """The routed down sites' input per slot: ``w_m * silu(h Wg_e^T) * (h Wu_e^T)``, ``e =
    ids_m`` -> ``[.., k, di]``."""
    gate_up = _param(experts, "gate_up_proj").float()
    di = gate_up.shape[1] // 2
    *lead, k = routing.ids.shape
    hf = h.reshape(-1, h.shape[-1]).float()
    ids = routing.ids.reshape(-1, k)
    out = hf.new_zeros(ids.shape[0], k, di)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        gu = hf[tok] @ gate_up[e].T
        out[tok, slot] = F.silu(gu[:, :di]) * gu[:, di:]
    return (out * routing.weights.reshape(-1, k, 1).float()).reshape(*lead, k, di)


def blocked_acts(x_slots: Tensor, V: Tensor, ids: Tensor) -> Tensor:
    """Routed slots' ``x_m @ V[ids_m]`` scattered expert-major into ``[.., E*c]``.
    ``x_slots [.., k, d_in]`` (one input per slot) and ``V [E, d_in, c]``."""
    *lead, k = ids.shape
    n_e, _, c = V.shape
    flat_x = x_slots.reshape(-1, k, x_slots.shape[-1])
    flat_ids = ids.reshape(-1, k)
    out = flat_x.new_zeros(flat_ids.shape[0], n_e, c)
    for e in torch.unique(flat_ids).tolist():
        tok, slot = torch.nonzero(flat_ids == e, as_tuple=True)
        out[tok, e] = flat_x[tok, slot] @ V[e]
    return out.reshape(*lead, n_e * c)
