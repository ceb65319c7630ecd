"""Goodfire's small decoder LMs (``LlamaSimple``, ``LlamaSimpleMLP``, ``GPT2Simple``) in torch.

Written here from the maths, with Goodfire's module tree so that their state-dict keys load
as they are and SPD ``module_info`` patterns (``h.*.mlp.down_proj``) name the same modules:

- ``wte`` (token embedding, its weight *is* ``lm_head.weight``), ``wpe`` (GPT2Simple only:
  learned positions), ``h.{i}`` blocks, ``ln_f`` final norm, ``lm_head`` (no bias).
- Llama blocks: ``rms_1`` -> ``attn`` -> residual, ``rms_2`` -> ``mlp`` -> residual. RMSNorm in
  float32: ``w * x / sqrt(mean(x^2) + eps)``. Attention ``q_proj/k_proj/v_proj/o_proj`` (or the
  fused ``c_attn`` = ``[q | k | v]`` without grouped-query attention), RoPE over the whole head,
  key/value head ``j`` serving query heads ``j*r .. j*r + r - 1``, causal softmax attention
  scaled by ``1/sqrt(head_dim)``. ``LlamaSimple``: ``down(silu(gate(x)) * up(x))``;
  ``LlamaSimpleMLP``: ``down_proj(gelu_tanh(c_fc(x)))``.
- GPT2Simple blocks: ``ln_1``/``ln_2`` LayerNorm with bias (biased variance, eps 1e-5), separate
  biased ``q/k/v/o_proj``, no RoPE, ``down_proj(gelu_tanh(c_fc(x)))`` with biases.

``forward(idx, targets=None, return_logits=True)`` returns ``(logits, loss)`` as Goodfire's
models do (SPD runs read it with ``pretrained_model_output_attr: idx_0``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spd_adapters.spd.targets.configs import (
    GPT2SimpleConfig,
    LlamaSimpleConfig,
    LlamaSimpleMLPConfig,
    TargetConfig,
)

LlamaFamily = LlamaSimpleConfig | LlamaSimpleMLPConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, the weight applied after casting back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class BiasedLayerNorm(nn.Module):
    """LayerNorm with weight and bias; variance is the biased (population) one."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        centred = x - x.mean(-1, keepdim=True)
        scale = (x.var(-1, keepdim=True, unbiased=False) + self.eps).sqrt()
        return centred / scale * self.weight + self.bias


class TanhGELU(nn.Module):
    """GELU, tanh approximation: ``x/2 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``."""

    def forward(self, x: Tensor) -> Tensor:
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
        return 0.5 * x * (1.0 + torch.tanh(inner))


def rope_tables(head_dim: int, n_ctx: int, base: float, adjacent: bool) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` of shape ``[n_ctx, head_dim]``; angle ``p / base^(j / (head_dim/2))``.

    Frequency ``j`` covers dimensions ``j`` and ``j + head_dim/2`` (half split), or ``2j`` and
    ``2j + 1`` with ``adjacent``.
    """
    half = head_dim // 2
    wavelength = base ** (torch.arange(half, dtype=torch.float32) / half)
    per_dim = wavelength.repeat_interleave(2) if adjacent else wavelength.repeat(2)
    angles = torch.arange(n_ctx, dtype=torch.float32)[:, None] / per_dim[None, :]
    return angles.cos(), angles.sin()


def _rotate(x: Tensor, adjacent: bool) -> Tensor:
    """The 90-degree partner of each dimension pair: ``(a, b) -> (-b, a)``."""
    if adjacent:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, fused: bool, sinks: Tensor | None = None
) -> Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v over ``[B, H, T, d]`` (SDPA when ``fused``).

    ``sinks`` ``[H]``: one extra logit per head in every softmax row whose value vector is zero
    (it only takes probability mass away from the real keys).
    """
    if fused and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    if sinks is None:
        return scores.softmax(-1) @ v
    sink = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:-1], 1)
    return torch.cat((scores, sink), dim=-1).softmax(-1)[..., :-1] @ v


class RotaryAttention(nn.Module):
    """Causal self-attention of the Llama variants (RoPE, optional grouped-query heads)."""

    rotary_cos: Tensor
    rotary_sin: Tensor

    def __init__(self, config: LlamaFamily) -> None:
        super().__init__()
        d, hd = config.n_embd, config.head_dim
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.kv_heads, hd
        self.grouped = config.use_grouped_query_attention
        self.adjacent = config.rotary_adjacent_pairs
        self.fused_kernel = config.flash_attention
        self.n_ctx = config.n_ctx
        bias = config.attn_bias
        if self.grouped:
            self.q_proj = nn.Linear(d, d, bias=bias)
            self.k_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
            self.v_proj = nn.Linear(d, self.n_kv * hd, bias=bias)
        else:
            self.c_attn = nn.Linear(d, 3 * d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)
        self.sinks: nn.Parameter | None = None
        if getattr(config, "attention_sinks", False):
            self.sinks = nn.Parameter(torch.zeros(config.n_head))
        cos, sin = rope_tables(hd, config.n_ctx, config.rotary_base, self.adjacent)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        if self.grouped:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.c_attn(x).split(d, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        pos = torch.arange(T, device=x.device).clamp(max=self.n_ctx - 1)
        cos = self.rotary_cos[pos].to(q.dtype)
        sin = self.rotary_sin[pos].to(q.dtype)
        q = q * cos + _rotate(q, self.adjacent) * sin
        k = k * cos + _rotate(k, self.adjacent) * sin
        if self.n_kv != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        y = causal_attention(q, k, v, self.fused_kernel, self.sinks)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, d))


class SwiGLU(nn.Module):
    def __init__(self, config: LlamaSimpleConfig) -> None:
        super().__init__()
        d, di, bias = config.n_embd, config.n_intermediate, config.mlp_bias
        self.gate_proj = nn.Linear(d, di, bias=bias)
        self.up_proj = nn.Linear(d, di, bias=bias)
        self.down_proj = nn.Linear(di, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    def __init__(self, d: int, di: int, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, di, bias=bias)
        self.gelu = TanhGELU()
        self.down_proj = nn.Linear(di, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.gelu(self.c_fc(x)))


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaFamily) -> None:
        super().__init__()
        self.rms_1 = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.attn = RotaryAttention(config)
        self.rms_2 = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp: nn.Module = (
            SwiGLU(config)
            if isinstance(config, LlamaSimpleConfig)
            else GeluMLP(config.n_embd, config.n_intermediate, config.mlp_bias)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.rms_1(x))
        return x + self.mlp(self.rms_2(x))


class PlainAttention(nn.Module):
    """GPT2Simple's causal multi-head attention: biased q/k/v/o projections, no RoPE."""

    def __init__(self, config: GPT2SimpleConfig) -> None:
        super().__init__()
        d = config.n_embd
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.fused_kernel = config.flash_attention
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = (
            p(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = causal_attention(q, k, v, self.fused_kernel)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, d))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2SimpleConfig) -> None:
        super().__init__()
        self.ln_1 = BiasedLayerNorm(config.n_embd, config.layer_norm_eps)
        self.attn = PlainAttention(config)
        self.ln_2 = BiasedLayerNorm(config.n_embd, config.layer_norm_eps)
        self.mlp = GeluMLP(config.n_embd, config.d_mlp, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _TiedLM(nn.Module):
    """Shared parts: tied embedding/unembedding, block stack, final norm, ``(logits, loss)``."""

    config: TargetConfig
    wte: nn.Embedding
    h: nn.ModuleList
    ln_f: nn.Module
    lm_head: nn.Linear

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", True))

    def _tie(self) -> None:
        self.lm_head = nn.Linear(self.config.n_embd, self.config.vocab_size, bias=False)
        if self.tied:
            self.wte.weight = self.lm_head.weight

    def _embed(self, idx: Tensor) -> Tensor:
        return self.wte(idx)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, return_logits: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        T = idx.shape[1]
        if self.config.block_size < T:
            raise ValueError(
                f"{type(self).__name__} accepts at most block_size={self.config.block_size} "
                f"tokens, got {T}"
            )
        x = self._embed(idx)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.long().reshape(-1), ignore_index=-1
            )
        return (logits if return_logits else None), loss

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


class LlamaSimple(_TiedLM):
    def __init__(self, config: LlamaSimpleConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd, config.rms_norm_eps)
        self._tie()


class LlamaSimpleMLP(_TiedLM):
    def __init__(self, config: LlamaSimpleMLPConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(LlamaBlock(config) for _ in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd, config.rms_norm_eps)
        self._tie()


class GPT2Simple(_TiedLM):
    def __init__(self, config: GPT2SimpleConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.n_layer))
        self.ln_f = BiasedLayerNorm(config.n_embd, config.layer_norm_eps)
        self._tie()

    def _embed(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.wte(idx) + self.wpe(pos)


MODEL_CLASSES: dict[str, type[_TiedLM]] = {
    "LlamaSimple": LlamaSimple,
    "LlamaSimpleMLP": LlamaSimpleMLP,
    "GPT2Simple": GPT2Simple,
}


def build_model(config: TargetConfig) -> nn.Module:
    """An untrained model of ``config.model_type`` (weights come from a checkpoint)."""
    cls = MODEL_CLASSES[config.model_type]
    return cls(config)  # type: ignore[arg-type]
