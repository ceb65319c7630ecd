"""The topology of transformers' Qwen3.5-MoE decoder (``Qwen3_5MoeForCausalLM``), registered
through ``register_architectures`` so qwen36_moe runs get canonical site names, hook points and
``eval fidelity``.

Structure (transformers ``modeling_qwen3_5_moe``): blocks ``model.layers`` (``model.language_model
.layers`` in the image-text composite); each block has ONE token mixer, full attention
``self_attn.{q,k,v,o}_proj`` (``q_proj`` emits query and gate) on every
``full_attention_interval``-th layer and the gated DeltaNet ``linear_attn`` elsewhere, whose fused
``in_proj_qkv`` (``[q | k | v]`` rows) and ``out_proj`` are ``attn_fused.{qkv,o}``; then a sparse
MoE block ``mlp`` (router ``gate``, fused experts ``experts.{gate_up_proj, down_proj}``, a shared
expert and its sigmoid gate) with no single up/down projection, so there are no MLP addresses
and no ``mlp_hidden``. Norms ``input_layernorm`` / ``post_attention_layernorm`` (zero-centred
RMSNorms) before the mixer and the MoE block.
"""

from __future__ import annotations

from torch import Tensor, nn

from spd_host.topology import ArchitectureSpec, MixerVariant


def _is_shared_expert_moe(model: nn.Module) -> bool:
    """Every block's ``mlp`` is a routed MoE with fused 3-D expert weights and a shared expert."""
    found = False
    for name, module in model.named_modules():
        if not name.endswith(".mlp") or ".layers." not in name:
            continue
        experts = getattr(module, "experts", None)
        gate_up = getattr(experts, "gate_up_proj", None)
        if not (isinstance(gate_up, Tensor) and gate_up.dim() == 3):
            return False
        if getattr(module, "shared_expert", None) is None or getattr(module, "gate", None) is None:
            return False
        found = True
    return found


QWEN3_5_MOE = ArchitectureSpec(
    name="qwen3_5_moe",
    blocks=("model.layers", "model.language_model.layers"),
    attn="self_attn",
    attn_proj={"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},
    attn_variants=(MixerVariant("linear_attn", {"qkv": "in_proj_qkv", "o": "out_proj"}),),
    mlp="mlp",
    mlp_proj={},
    norms={"attn_pre": "input_layernorm", "mlp_pre": "post_attention_layernorm"},
    embed=("model.embed_tokens", "model.language_model.embed_tokens"),
    output=("lm_head",),
    final_norm=("model.norm", "model.language_model.norm"),
    matches=_is_shared_expert_moe,
    description="Qwen3.5-MoE: hybrid token mixers (gated DeltaNet linear_attn, fused in_proj_qkv, "
    "on most layers; gated full attention self_attn every full_attention_interval-th layer), "
    "routed top-k MoE with fused experts plus a gated shared expert (no MLP projections)",
)
