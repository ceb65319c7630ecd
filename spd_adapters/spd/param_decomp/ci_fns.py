"""The JAX-era transformer CI functions of param-decomp, recomputed in torch from their weights.

Plain tensors (no ``nn.Module``), written from the maths of ``param_decomp/core/ci_fn``:

- every input tap is RMS-normalised without weight (``eps`` = float32 machine epsilon), the taps
  are concatenated, then ``x @ in_proj_w + in_proj_b`` (``in_proj_w [d_in_total, d_model]``);
- ``n_blocks`` pre-norm blocks: ``x += Attn(RMSNorm(x))``, ``x += FFN(RMSNorm(x))`` where the
  norms are weightless or carry a learned per-channel scale (``learned_norm_scale``);
  attention projections are stored ``[out, in]`` (``q = h @ wq.T``), MHA or grouped-query
  (query head ``i`` reads K/V head ``i // (n_heads / n_kv_heads)``), rotary position embedding
  (rotate-half convention, the checkpoint's ``inv_freq``, positions ``0..T-1``), softmax scale
  ``1/sqrt(head_dim)``, a bidirectional or causal mask; the FFN is ``gelu(h@w1+b1) @ w2 + b2``
  (exact erf GELU) or SwiGLU ``(silu(h@wg+bg) * (h@w1+b1)) @ w2 + b2``;
- one linear head per site: ``x @ W [d_model, C] + b`` -> the site's CI pre-activation;
- ``global_mlp`` (the tPD LM CI net): the raw taps concatenated, an exact-GELU MLP, split per site;
- optional component conditioning (``affine_clipped_component_activation``): with
  ``h = x_site @ V``, ``pre += s+ * clip(a+ h + b+, 0, 1) + s- * clip(a- (-h) + b-, 0, 1) + bias``.

The causal importance is the lower leaky hard sigmoid's forward value, ``clip(pre, 0, 1)`` (its
leak only shapes training gradients).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

RMS_EPS = float(torch.finfo(torch.float32).eps)


def rms_norm(x: Tensor, scale: Tensor | None, eps: float = RMS_EPS) -> Tensor:
    x = x.float()
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return y if scale is None else y * scale


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def attention_half(
    x: Tensor,
    w: tuple[Tensor, Tensor, Tensor, Tensor],
    norm_scale: Tensor | None,
    inv_freq: Tensor,
    n_heads: int,
    n_kv_heads: int,
    causal: bool,
) -> Tensor:
    """``x + Attn(RMSNorm(x))`` of one CI block (``w = (wq, wk, wv, wo)``, stored ``[out, in]``):
    RoPE (rotate-half), grouped K/V heads, ``1/sqrt(head_dim)``, optional causal mask."""
    wq, wk, wv, wo = w
    b, t, d = x.shape
    hd = d // n_heads
    h = rms_norm(x, norm_scale)

    def split(m: Tensor, n: int) -> Tensor:
        return (h @ m.T).view(b, t, n, hd).transpose(1, 2)  # [b, n, t, hd]

    q, k, v = split(wq, n_heads), split(wk, n_kv_heads), split(wv, n_kv_heads)
    angles = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    group = n_heads // n_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    if causal:
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    y = scores.softmax(dim=-1) @ v
    return x + y.transpose(1, 2).reshape(b, t, d) @ wo.T


@dataclass
class Block:
    """One CI-transformer block; ``gate`` present <=> SwiGLU, ``norm_scales`` <=> learned norms."""

    wq: Tensor
    wk: Tensor
    wv: Tensor
    wo: Tensor
    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    gate: tuple[Tensor, Tensor] | None
    norm_scales: tuple[Tensor, Tensor] | None

    def tensors(self) -> list[Tensor]:
        out = [self.wq, self.wk, self.wv, self.wo, self.w1, self.b1, self.w2, self.b2]
        out += list(self.gate or ()) + list(self.norm_scales or ())
        return out


@dataclass
class TransformerNet:
    """Input projection -> blocks -> one head per output site."""

    in_w: Tensor  # [d_in_total, d_model]
    in_b: Tensor  # [d_model]
    blocks: list[Block]
    head_ws: list[Tensor]  # [d_model, C_j]
    head_bs: list[Tensor]  # [C_j]
    inv_freq: Tensor  # [head_dim / 2]
    n_heads: int
    n_kv_heads: int
    causal: bool

    def _attention(self, x: Tensor, blk: Block) -> Tensor:
        return attention_half(
            x,
            (blk.wq, blk.wk, blk.wv, blk.wo),
            blk.norm_scales[0] if blk.norm_scales else None,
            self.inv_freq,
            self.n_heads,
            self.n_kv_heads,
            self.causal,
        )

    def _ffn(self, x: Tensor, blk: Block) -> Tensor:
        h = rms_norm(x, blk.norm_scales[1] if blk.norm_scales else None)
        up = h @ blk.w1 + blk.b1
        gate = blk.gate
        hidden = F.gelu(up) if gate is None else F.silu(h @ gate[0] + gate[1]) * up
        return x + hidden @ blk.w2 + blk.b2

    def __call__(self, taps: list[Tensor]) -> list[Tensor]:
        x = torch.cat([rms_norm(tap, None) for tap in taps], dim=-1)
        x = x @ self.in_w + self.in_b
        squeeze = x.ndim == 2
        if squeeze:
            x = x.unsqueeze(0)
        for blk in self.blocks:
            x = self._ffn(self._attention(x, blk), blk)
        if squeeze:
            x = x.squeeze(0)
        return [x @ w + b for w, b in zip(self.head_ws, self.head_bs, strict=True)]

    def tensors(self) -> list[Tensor]:
        out = [self.in_w, self.in_b, self.inv_freq, *self.head_ws, *self.head_bs]
        for blk in self.blocks:
            out += blk.tensors()
        return out


@dataclass
class MlpNet:
    """``global_mlp``: the RAW taps concatenated (no norm), ``Linear`` layers with exact GELU
    between them (none after the last), the output split per site in order."""

    weights: list[Tensor]  # [d_in, d_out]
    biases: list[Tensor]
    sizes: list[int]  # C per output site

    def __call__(self, taps: list[Tensor]) -> list[Tensor]:
        x = torch.cat([t.float() for t in taps], dim=-1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = x @ w + b
            if i < len(self.weights) - 1:
                x = F.gelu(x)
        return list(torch.split(x, self.sizes, dim=-1))

    def tensors(self) -> list[Tensor]:
        return [*self.weights, *self.biases]


@dataclass
class CiNet:
    """One network of a CI function: the taps it reads and the sites its heads score."""

    input_taps: tuple[str, ...]
    output_sites: tuple[str, ...]
    net: TransformerNet | MlpNet


@dataclass
class Arm:
    input_scale: Tensor
    input_bias: Tensor
    output_scale: Tensor

    def __call__(self, a: Tensor) -> Tensor:
        return self.output_scale * (self.input_scale * a + self.input_bias).clamp(0, 1)


@dataclass
class Readout:
    """Component conditioning of one site: both arms on ``h = x V`` and ``-h`` plus a bias."""

    positive: Arm
    negative: Arm
    bias: Tensor

    def __call__(self, h: Tensor) -> Tensor:
        return self.positive(h) + self.negative(-h) + self.bias

    def tensors(self) -> list[Tensor]:
        arms = (self.positive, self.negative)
        return [
            self.bias,
            *(t for a in arms for t in (a.input_scale, a.input_bias, a.output_scale)),
        ]


@dataclass
class PdCiFunction:
    """A whole CI function: its networks (one per chunk, or one global) + optional readouts."""

    fn_type: str
    nets: list[CiNet]
    readouts: dict[str, Readout] | None

    @property
    def input_taps(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for n in self.nets:
            seen.update(dict.fromkeys(n.input_taps))
        return tuple(seen)

    def pre_activations(
        self, taps: Mapping[str, Tensor], component_acts: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Per-site CI pre-activations ``[..., C]`` from the captured taps (and, when the fn is
        conditioned, each site's component activations ``x V``)."""
        out: dict[str, Tensor] = {}
        for n in self.nets:
            heads = n.net([taps[k].float() for k in n.input_taps])
            out.update(zip(n.output_sites, heads, strict=True))
        if self.readouts is not None:
            assert component_acts is not None, "a conditioned CI fn needs the component activations"
            for site, readout in self.readouts.items():
                out[site] = out[site] + readout(component_acts[site].float())
        return out

    def causal_importance(
        self, taps: Mapping[str, Tensor], component_acts: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        return {s: z.clamp(0, 1) for s, z in self.pre_activations(taps, component_acts).items()}

    def tensors(self) -> list[Tensor]:
        out = [t for n in self.nets for t in n.net.tensors()]
        for r in (self.readouts or {}).values():
            out += r.tensors()
        return out
