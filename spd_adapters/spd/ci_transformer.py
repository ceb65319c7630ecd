"""The sequence-level global CI functions of the ``spd`` dev branch, on plain tensors.

Both see every decomposed module's input at once and (when they attend) every position of the
sequence, later ones included: their causal importances are *not* causal per token.

``global_shared_transformer``
    per-site inputs in sorted module-path order (an embedding contributes its component
    activations ``V[token]``), each RMS-normalised without weight over its own width,
    concatenated, projected to ``d_model`` (``x W + b``), ``n_blocks`` pre-norm blocks
    ``x += Attn(rms(x)); x += MLP(rms(x))`` (weightless norms; bidirectional multi-head attention
    with half-split RoPE, ``softmax(q k^T / sqrt(d_head)) v``, bias-free ``nn.Linear``
    projections; MLP ``Linear-GELU-...-Linear`` back to ``d_model``), a linear head to the sum
    of C, split per site in the same order.

``global_reverse_residual``
    ``block_groups`` in the configured order, each with its modules in match order; a residual
    ``r = 0`` of width ``d_resid_ci_fn``; per block: ``r += Linear(concat(raw inputs))``; for
    every block but the last, ``r += Attn(RMSNorm(r))`` (if ``transition_attn_config``) and then
    ``r += Transition(RMSNorm(r))`` (``Linear``, or ``Linear-GELU-Linear`` with
    ``transition_hidden_dim``); then the block's CI is ``Reader(RMSNorm(r))`` (an MLP to the
    block's sum of C). The reader reads the residual *after* the transition: that is what the
    reference's forward does (its class docstring lists the reader first). These RMSNorms carry a
    learned weight (``nn.RMSNorm``); all norms use ``eps = finfo(dtype).eps`` (torch's default).

GELU is the exact (erf) form throughout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from spd_adapters.spd.model import Components, DenseLayer, run_mlp
from spd_host.errors import ConfigError


def move_tensors(obj: Any, device: torch.device | str) -> None:
    """Move every tensor held by a (nested) dataclass / list / dict in place."""
    items: list[tuple[Any, Any, Any]] = []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(obj, f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
        for owner, name, value in items:
            if isinstance(value, Tensor):
                setattr(owner, name, value.to(device))
            else:
                move_tensors(value, device)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            if isinstance(value, Tensor):
                obj[i] = value.to(device)
            else:
                move_tensors(value, device)
    elif isinstance(obj, dict):
        for k, value in obj.items():
            if isinstance(value, Tensor):
                obj[k] = value.to(device)
            else:
                move_tensors(value, device)


def rms_norm(x: Tensor, weight: Tensor | None = None) -> Tensor:
    """RMSNorm over the last axis with torch's default eps (``finfo(dtype).eps``)."""
    return F.rms_norm(x, (x.shape[-1],), weight)


@dataclass
class Attention:
    """Bidirectional multi-head self-attention with RoPE (``nn.Linear`` weights ``[out, in]``)."""

    Wq: Tensor
    Wk: Tensor
    Wv: Tensor
    Wo: Tensor
    inv_freq: Tensor  # [d_head / 2], the checkpoint's persistent RoPE buffer
    n_heads: int
    max_len: int

    def _rope(self, x: Tensor) -> Tensor:
        # x [..., heads, seq, d_head]; rotate-half convention on the two halves of each head
        seq = x.shape[-2]
        pos = torch.arange(seq, device=x.device, dtype=self.inv_freq.dtype)
        ang = pos[:, None] * self.inv_freq[None, :]
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def __call__(self, x: Tensor) -> Tensor:
        *batch, seq, d = x.shape
        if seq > self.max_len:
            raise ConfigError(
                f"sequence length {seq} exceeds the CI function's attention max_len {self.max_len}",
                hint=f"harvest/evaluate with --seq-len {self.max_len} or less (the run's RoPE limit)",
            )
        dh = d // self.n_heads

        def heads(t: Tensor) -> Tensor:
            return t.view(*batch, seq, self.n_heads, dh).transpose(-3, -2)

        q, k, v = heads(x @ self.Wq.T), heads(x @ self.Wk.T), heads(x @ self.Wv.T)
        q, k = self._rope(q), self._rope(k)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        return out.transpose(-3, -2).reshape(*batch, seq, d) @ self.Wo.T


def _site_inputs(
    order: Sequence[str], inputs: Mapping[str, Tensor], components: Mapping[str, Components]
) -> list[Tensor]:
    """Per site: the module input, or for an embedding its component activations ``V[token]``."""
    out = []
    for path in order:
        comp = components[path]
        x = inputs[path]
        out.append(comp.component_acts(x) if comp.kind == "embedding" else x.to(comp.V.dtype))
    return out


@dataclass
class TransformerBlock:
    attn: Attention
    mlp: list[DenseLayer]

    def __call__(self, x: Tensor) -> Tensor:
        x = x + self.attn(rms_norm(x))
        return x + run_mlp(self.mlp, rms_norm(x))


@dataclass
class SharedTransformerCiFn:
    """``global_shared_transformer`` (see the module docstring)."""

    order: list[str]  # sorted module paths
    sizes: list[int]  # C per module, same order
    input_projector: DenseLayer
    blocks: list[TransformerBlock]
    output_head: DenseLayer
    causal: bool = False

    def pre_sigmoid(
        self, inputs: Mapping[str, Tensor], components: Mapping[str, Components]
    ) -> dict[str, Tensor]:
        parts = [rms_norm(t) for t in _site_inputs(self.order, inputs, components)]
        x = self.input_projector(torch.cat(parts, dim=-1))
        squeeze = x.ndim < 3  # no sequence axis (toy tasks): one position
        if squeeze:
            x = x.unsqueeze(-2)
        for block in self.blocks:
            x = block(x)
        out = self.output_head(x)
        if squeeze:
            out = out.squeeze(-2)
        return dict(zip(self.order, torch.split(out, self.sizes, dim=-1), strict=True))

    def to(self, device: torch.device | str) -> None:
        move_tensors(self, device)


@dataclass
class ResidualBlock:
    """One block group of ``global_reverse_residual``."""

    name: str
    modules: list[str]  # in match order
    sizes: list[int]
    projector: DenseLayer
    reader: list[DenseLayer]
    reader_norm: Tensor
    transition: list[DenseLayer] | None  # None for the last block
    transition_norm: Tensor | None
    attn: Attention | None
    attn_norm: Tensor | None


@dataclass
class ReverseResidualCiFn:
    """``global_reverse_residual`` (see the module docstring)."""

    d_resid: int
    blocks: list[ResidualBlock]
    causal: bool = True

    def pre_sigmoid(
        self, inputs: Mapping[str, Tensor], components: Mapping[str, Components]
    ) -> dict[str, Tensor]:
        r: Tensor | None = None
        out: dict[str, Tensor] = {}
        for block in self.blocks:
            x = torch.cat(_site_inputs(block.modules, inputs, components), dim=-1)
            proj = block.projector(x)
            r = proj if r is None else r + proj  # r starts at zero
            if block.transition is not None:
                assert block.transition_norm is not None
                if block.attn is not None:
                    r = r + block.attn(rms_norm(r, block.attn_norm))
                # a one-layer transition is a plain Linear; two layers have a GELU between
                r = r + run_mlp(block.transition, rms_norm(r, block.transition_norm))
            ci = run_mlp(block.reader, rms_norm(r, block.reader_norm))
            out.update(zip(block.modules, torch.split(ci, block.sizes, dim=-1), strict=True))
        return out

    def to(self, device: torch.device | str) -> None:
        move_tensors(self, device)
