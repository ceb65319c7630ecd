"""Topology specs for Goodfire's target models (registered through ``register_architectures``).

All three keep their blocks in a top-level ``h`` list with ``attn`` / ``mlp`` sub-modules, so the
specs differ only in the projections and norms they require; each forbids what tells it apart
from the others, so detection stays structural (class names are never consulted). The fused
``attn.c_attn`` of Llama variants trained without grouped-query attention is ``[q | k | v]``
along the output dimension. No Hugging Face model fits them: GPT-2's bare ``GPT2Model`` also has
a top-level ``h``, but its ``c_attn``/``c_proj`` lack the ``o_proj``/``down_proj`` these need.
"""

from __future__ import annotations

from spd_host.topology import ArchitectureSpec

_QKVO = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_FUSED = {"qkv": "c_attn", "o": "o_proj"}
_RMS = {"attn_pre": "rms_1", "mlp_pre": "rms_2"}
_SWIGLU = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
_GELU = {"up": "c_fc", "down": "down_proj"}


def _spec(
    name: str,
    attn_proj: dict[str, str],
    mlp_proj: dict[str, str],
    *,
    norms: dict[str, str],
    forbidden: tuple[str, ...],
    description: str,
) -> ArchitectureSpec:
    return ArchitectureSpec(
        name=name,
        blocks=("h",),
        attn="attn",
        mlp="mlp",
        attn_proj=attn_proj,
        mlp_proj=mlp_proj,
        norms=norms,
        embed=("wte",),
        output=("lm_head",),
        final_norm=("ln_f",),
        forbidden=forbidden,
        description=description,
    )


LLAMA_SIMPLE = _spec(
    "goodfire_llama_simple",
    _QKVO,
    _SWIGLU,
    norms=_RMS,
    forbidden=("attn.c_attn", "mlp.c_fc"),
    description="Goodfire LlamaSimple: RMSNorm rms_1/rms_2, RoPE GQA attention, SwiGLU MLP",
)
LLAMA_SIMPLE_FUSED = _spec(
    "goodfire_llama_simple_fused",
    _FUSED,
    _SWIGLU,
    norms=_RMS,
    forbidden=("attn.q_proj", "mlp.c_fc"),
    description="Goodfire LlamaSimple without GQA: one fused c_attn [q | k | v]",
)
LLAMA_SIMPLE_MLP = _spec(
    "goodfire_llama_simple_mlp",
    _QKVO,
    _GELU,
    norms=_RMS,
    forbidden=("attn.c_attn", "mlp.gate_proj"),
    description="Goodfire LlamaSimpleMLP: RMSNorm rms_1/rms_2, RoPE GQA attention, GELU c_fc/down_proj",
)
LLAMA_SIMPLE_MLP_FUSED = _spec(
    "goodfire_llama_simple_mlp_fused",
    _FUSED,
    _GELU,
    norms=_RMS,
    forbidden=("attn.q_proj", "mlp.gate_proj"),
    description="Goodfire LlamaSimpleMLP without GQA: one fused c_attn [q | k | v]",
)
GPT2_SIMPLE = _spec(
    "goodfire_gpt2_simple",
    _QKVO,
    _GELU,
    norms={"attn_pre": "ln_1", "mlp_pre": "ln_2"},
    forbidden=("attn.c_attn", "mlp.gate_proj", "rms_1"),
    description="Goodfire GPT2Simple: biased LayerNorm ln_1/ln_2, learned positions (wpe), "
    "separate biased q/k/v/o_proj, GELU c_fc/down_proj",
)

SPECS: tuple[ArchitectureSpec, ...] = (
    LLAMA_SIMPLE,
    LLAMA_SIMPLE_FUSED,
    LLAMA_SIMPLE_MLP,
    LLAMA_SIMPLE_MLP_FUSED,
    GPT2_SIMPLE,
)
