"""``model_config.yaml`` of Goodfire's pretrain runs: one pydantic model per ``model_type``.

The field names and defaults are those the ``spd.pretrain`` trainer dumps (``model.model_dump``).
Unknown fields are refused, as Goodfire's own configs refuse them: a field we do not model could
change the maths. A few fields are accepted beyond the torch configs because the successor
(``param_decomp``) writes them: for GPT2Simple ``n_intermediate`` (must be ``4 * n_embd``) and
``layer_norm_eps``; for LlamaSimpleMLP ``tie_word_embeddings`` and ``attention_sinks``.

Quirks kept on purpose (they are what Goodfire's torch models compute):

- Llama variants ignore ``rotary_dim``: the rotary width is always the head dimension.
- ``use_grouped_query_attention: false`` means one fused ``attn.c_attn`` ``[q | k | v]``
  projection with ``n_head`` key/value heads (``n_key_value_heads`` is then unused).
- RoPE tables cover ``n_ctx`` positions; later positions reuse the last angle (clamped).
- A sequence may not exceed ``block_size`` tokens.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator


class _ModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    flash_attention: bool = True

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def max_position_embeddings(self) -> int:
        """The longest sequence the model accepts (read by ``spd_host.data.check_seq_len``)."""
        return self.block_size

    @model_validator(mode="after")
    def _heads_divide(self) -> _ModelConfig:
        if self.n_head <= 0 or self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        return self


class _LlamaFamilyConfig(_ModelConfig):
    """Fields shared by ``LlamaSimple`` (SwiGLU) and ``LlamaSimpleMLP`` (GELU MLP)."""

    mlp_bias: bool = False
    attn_bias: bool = False
    rotary_adjacent_pairs: bool = False
    rotary_dim: int = 768 // 12  # recorded, but unused by the model (head_dim is used)
    rotary_base: int = 10000
    n_ctx: int = 1024
    n_key_value_heads: int = 12 // 4
    use_grouped_query_attention: bool = True
    rms_norm_eps: float = 1e-6

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (all heads without grouped-query attention)."""
        return self.n_key_value_heads if self.use_grouped_query_attention else self.n_head

    @model_validator(mode="after")
    def _kv_heads_divide(self) -> _LlamaFamilyConfig:
        if self.use_grouped_query_attention and (
            self.n_key_value_heads <= 0 or self.n_head % self.n_key_value_heads
        ):
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of n_key_value_heads "
                f"({self.n_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dimension {self.head_dim} must be even for RoPE")
        return self


class LlamaSimpleConfig(_LlamaFamilyConfig):
    model_type: Literal["LlamaSimple"] = "LlamaSimple"
    n_intermediate: int = 768 * 4 * 2 // 3


class LlamaSimpleMLPConfig(_LlamaFamilyConfig):
    model_type: Literal["LlamaSimpleMLP"] = "LlamaSimpleMLP"
    n_intermediate: int = 768 * 4
    #: param-decomp's newer LlamaSimpleMLP targets: an untied ``lm_head.weight``, and one learned
    #: attention-sink logit per query head (``h.{i}.attn.sinks``, a softmax slot with zero value)
    tie_word_embeddings: bool = True
    attention_sinks: bool = False


class GPT2SimpleConfig(_ModelConfig):
    model_type: Literal["GPT2Simple"] = "GPT2Simple"
    n_intermediate: int | None = None
    layer_norm_eps: float = 1e-5

    @property
    def d_mlp(self) -> int:
        return 4 * self.n_embd

    @model_validator(mode="after")
    def _fixed_mlp_width(self) -> GPT2SimpleConfig:
        if self.n_intermediate is not None and self.n_intermediate != 4 * self.n_embd:
            raise ValueError(
                f"GPT2Simple's MLP width is 4 * n_embd = {4 * self.n_embd}, "
                f"got n_intermediate {self.n_intermediate}"
            )
        return self


TargetConfig = LlamaSimpleConfig | LlamaSimpleMLPConfig | GPT2SimpleConfig

CONFIG_CLASSES: dict[str, type[TargetConfig]] = {
    "LlamaSimple": LlamaSimpleConfig,
    "LlamaSimpleMLP": LlamaSimpleMLPConfig,
    "GPT2Simple": GPT2SimpleConfig,
}
