"""Architecture specs: where the canonical pieces live inside one family of HF causal LMs.

A spec is data (relative module paths) plus a structural test. Detection never looks at class
names: a spec claims a model when its block list exists with the declared sub-modules, the
forbidden sub-modules are absent, and the projections have 2-D weights. That is why one spec
("llama") covers Llama, Mistral, Qwen2, Qwen3 and Gemma: their blocks have the same shape.

Plugins teach the host a new family by registering an :class:`ArchitectureSpec` through the
``register_architectures`` hook; registered specs are tried before the built-ins.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from spd_host.errors import TopologyError

_ATTN_ROLE_SETS = ({"q", "k", "v", "o"}, {"qkv", "o"})


def _check_attn_roles(name: str, attn_proj: Mapping[str, str]) -> None:
    if set(attn_proj) not in _ATTN_ROLE_SETS:
        raise TopologyError(
            f"architecture spec {name!r}: attn_proj roles {sorted(attn_proj)} are not q,k,v,o or qkv,o"
        )


def attn_kind_of(attn_proj: Mapping[str, str]) -> str:
    """The address kind of one token mixer's projections: ``attn_fused`` or ``attn``."""
    return "attn_fused" if "qkv" in attn_proj else "attn"


@dataclass(frozen=True)
class MixerVariant:
    """An alternative token mixer, for hybrid architectures whose blocks do not all share one
    attention module (Qwen3.5's gated-DeltaNet layers between full-attention layers).

    A block without the spec's own ``attn`` module (or whose projections do not fit it) uses
    the first variant it has; its hook points ``attn_in``/``attn_out`` are that module's input and
    output, and its addresses follow the variant's roles (``attn`` or ``attn_fused``).
    """

    attn: str
    attn_proj: Mapping[str, str]

    @property
    def attn_kind(self) -> str:
        return attn_kind_of(self.attn_proj)


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where the canonical modules of one architecture family live.

    ``blocks``: candidate paths of the ``nn.ModuleList`` of transformer blocks (first match wins).
    ``attn`` / ``mlp``: the attention and MLP modules, relative to a block.
    ``attn_proj``: role -> path relative to ``attn``; roles ``q,k,v,o`` or ``qkv,o`` (fused).
    ``mlp_proj``: role -> path relative to ``mlp``; roles ``up,down`` (plain), ``gate,up,down``
    (GLU) or ``gate_up,down`` (fused GLU); empty for a mixture-of-experts MLP whose experts are
    not single projections (no MLP addresses and no ``mlp_hidden`` hook point then).
    ``attn_variants``: alternative token mixers of hybrid architectures (see
    :class:`MixerVariant`); a block uses ``attn`` when it has it, else the first variant.
    ``norms``: role -> path relative to the block; roles ``attn_pre`` (norm feeding attention),
    ``attn_post`` (norm applied to the attention output before the residual add), ``mlp_pre``,
    ``mlp_post``. A missing role means the architecture has no such norm.
    ``attn_residual`` / ``mlp_residual``: module (relative to the block) whose output is exactly
    what is added to the residual stream, when it differs from ``attn_post``/``mlp_post`` or the
    module itself (GPT-NeoX's dropouts).
    ``parallel``: attention and MLP both read the block input (no ``resid_mid``); a bool or a
    function of the model config.
    ``forbidden``: block-relative paths whose presence rules this spec out.
    ``matches``: optional extra structural test ``model -> bool``.
    """

    name: str
    blocks: tuple[str, ...]
    attn: str
    mlp: str
    attn_proj: Mapping[str, str]
    mlp_proj: Mapping[str, str]
    norms: Mapping[str, str] = field(default_factory=dict)
    embed: tuple[str, ...] = ()
    output: tuple[str, ...] = ()
    final_norm: tuple[str, ...] = ()
    attn_residual: str | None = None
    mlp_residual: str | None = None
    parallel: bool | Callable[[Any], bool] = False
    forbidden: tuple[str, ...] = ()
    matches: Callable[[torch.nn.Module], bool] | None = None
    description: str = ""
    attn_variants: tuple[MixerVariant, ...] = ()

    def __post_init__(self) -> None:
        _check_attn_roles(self.name, self.attn_proj)
        for variant in self.attn_variants:
            _check_attn_roles(self.name, variant.attn_proj)
        mlp_roles = set(self.mlp_proj)
        if mlp_roles not in (set(), {"up", "down"}, {"gate", "up", "down"}, {"gate_up", "down"}):
            raise TopologyError(
                f"architecture spec {self.name!r}: mlp_proj roles {sorted(mlp_roles)} are not up,down / gate,up,down / gate_up,down (or none, for an MoE)"
            )
        bad = set(self.norms) - {"attn_pre", "attn_post", "mlp_pre", "mlp_post"}
        if bad:
            raise TopologyError(
                f"architecture spec {self.name!r}: unknown norm roles {sorted(bad)}"
            )

    @property
    def attn_kind(self) -> str:
        return attn_kind_of(self.attn_proj)

    @property
    def mixers(self) -> tuple[MixerVariant, ...]:
        """The token mixers a block may have, in the order they are tried."""
        return (MixerVariant(self.attn, self.attn_proj), *self.attn_variants)

    @property
    def mlp_kind(self) -> str | None:
        """``mlp`` / ``glu`` / ``glu_fused``; None for an MoE without canonical projections."""
        if not self.mlp_proj:
            return None
        if "gate_up" in self.mlp_proj:
            return "glu_fused"
        return "glu" if "gate" in self.mlp_proj else "mlp"

    def is_parallel(self, config: Any) -> bool:
        return bool(self.parallel(config) if callable(self.parallel) else self.parallel)


_LLAMA_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_LLAMA_MLP = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

GPT2 = ArchitectureSpec(
    name="gpt2",
    blocks=("transformer.h",),
    attn="attn",
    mlp="mlp",
    attn_proj={"qkv": "c_attn", "o": "c_proj"},
    mlp_proj={"up": "c_fc", "down": "c_proj"},
    norms={"attn_pre": "ln_1", "mlp_pre": "ln_2"},
    embed=("transformer.wte",),
    output=("lm_head",),
    final_norm=("transformer.ln_f",),
    description="GPT-2: pre-norm LayerNorm, fused c_attn (Conv1D, weight [in, out]), plain GELU MLP",
)

GPT_NEOX = ArchitectureSpec(
    name="gpt_neox",
    blocks=("gpt_neox.layers",),
    attn="attention",
    mlp="mlp",
    attn_proj={"qkv": "query_key_value", "o": "dense"},
    mlp_proj={"up": "dense_h_to_4h", "down": "dense_4h_to_h"},
    norms={"attn_pre": "input_layernorm", "mlp_pre": "post_attention_layernorm"},
    embed=("gpt_neox.embed_in",),
    output=("embed_out", "lm_head"),
    final_norm=("gpt_neox.final_layer_norm",),
    attn_residual="post_attention_dropout",
    mlp_residual="post_mlp_dropout",
    parallel=lambda config: bool(getattr(config, "use_parallel_residual", True)),
    description="GPT-NeoX/Pythia: fused query_key_value (head-interleaved), parallel attention+MLP "
    "when config.use_parallel_residual",
)

LLAMA = ArchitectureSpec(
    name="llama",
    blocks=("model.layers",),
    attn="self_attn",
    mlp="mlp",
    attn_proj=_LLAMA_ATTN,
    mlp_proj=_LLAMA_MLP,
    norms={"attn_pre": "input_layernorm", "mlp_pre": "post_attention_layernorm"},
    embed=("model.embed_tokens",),
    output=("lm_head",),
    final_norm=("model.norm",),
    forbidden=("pre_feedforward_layernorm", "post_feedforward_layernorm", "mlp.gate_up_proj"),
    description="Llama family (Llama, Mistral, Qwen2, Qwen3, Gemma): pre-norm RMSNorm, separate "
    "q/k/v/o, gated MLP; HF's 'post_attention_layernorm' is the norm *before* the MLP",
)

GEMMA2 = ArchitectureSpec(
    name="gemma2",
    blocks=("model.layers",),
    attn="self_attn",
    mlp="mlp",
    attn_proj=_LLAMA_ATTN,
    mlp_proj=_LLAMA_MLP,
    norms={
        "attn_pre": "input_layernorm",
        "attn_post": "post_attention_layernorm",
        "mlp_pre": "pre_feedforward_layernorm",
        "mlp_post": "post_feedforward_layernorm",
    },
    embed=("model.embed_tokens",),
    output=("lm_head",),
    final_norm=("model.norm",),
    description="Gemma 2/3 sandwich norms: RMSNorm before and after both attention and MLP",
)

OLMO2 = ArchitectureSpec(
    name="olmo2",
    blocks=("model.layers",),
    attn="self_attn",
    mlp="mlp",
    attn_proj=_LLAMA_ATTN,
    mlp_proj=_LLAMA_MLP,
    norms={"attn_post": "post_attention_layernorm", "mlp_post": "post_feedforward_layernorm"},
    embed=("model.embed_tokens",),
    output=("lm_head",),
    final_norm=("model.norm",),
    forbidden=("input_layernorm", "pre_feedforward_layernorm"),
    description="OLMo 2: post-norm only (RMSNorm on the attention and MLP outputs, none before)",
)

PHI3 = ArchitectureSpec(
    name="phi3",
    blocks=("model.layers",),
    attn="self_attn",
    mlp="mlp",
    attn_proj={"qkv": "qkv_proj", "o": "o_proj"},
    mlp_proj={"gate_up": "gate_up_proj", "down": "down_proj"},
    norms={"attn_pre": "input_layernorm", "mlp_pre": "post_attention_layernorm"},
    embed=("model.embed_tokens",),
    output=("lm_head",),
    final_norm=("model.norm",),
    attn_residual="resid_attn_dropout",
    mlp_residual="resid_mlp_dropout",
    forbidden=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    description="Phi-3: fused qkv_proj and gate_up_proj (gate first, then up), pre-norm RMSNorm",
)

#: most specific first: a spec with forbidden paths never shadows a more specific one
BUILTIN_SPECS: tuple[ArchitectureSpec, ...] = (GPT2, GPT_NEOX, GEMMA2, OLMO2, PHI3, LLAMA)
