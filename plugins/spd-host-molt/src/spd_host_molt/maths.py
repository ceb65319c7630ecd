"""MOLT forward maths: encoder, per-rank-group transforms, and the (de)normalisation around them.

- pre-activation ``h = x @ W_E + b_E`` (``x`` in the MOLT's normalised input space);
- activation ``f = phi(h)``; when ``sparsity_include_decoder_norm`` the gate is decided on
  ``h * ||U_i V_i||_F`` and the value divided back (Llamascopium's convention; identical to
  ``relu(h)`` for ReLU, different for JumpReLU thresholds and top-k ranking);
- output ``y = sum_i f_i U_i (V_i x) + b_D``, computed per rank group without forming
  ``U_i V_i`` (``[n_r, d, d]`` would not fit for real widths).

With ``norm_activation == "dataset-wise"`` the input is scaled by ``sqrt(d)/norm_in`` before
encoding and the output divided by ``sqrt(d)/norm_out`` afterwards, so ``y`` is in the base
model's units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spd_host_molt.format import MoltConfig, MoltWeights


@dataclass
class Molt:
    """A loaded MOLT, ready to encode and reconstruct (float32, on one device)."""

    cfg: MoltConfig
    w: MoltWeights

    def __post_init__(self) -> None:
        self.decoder_norm = transform_norms(self.w)

    def to(self, device: torch.device | str) -> Molt:
        w = self.w
        moved = MoltWeights(
            W_E=w.W_E.to(device),
            b_E=w.b_E.to(device),
            U={r: u.to(device) for r, u in w.U.items()},
            V={r: v.to(device) for r, v in w.V.items()},
            b_D=None if w.b_D is None else w.b_D.to(device),
            jumprelu_threshold=None
            if w.jumprelu_threshold is None
            else w.jumprelu_threshold.to(device),
            norm_in=w.norm_in,
            norm_out=w.norm_out,
        )
        return Molt(self.cfg, moved)

    # -- scaling --------------------------------------------------------------------------------
    def in_scale(self) -> float:
        if self.w.norm_in is None:
            return 1.0
        return math.sqrt(self.cfg.d_model) / self.w.norm_in

    def out_scale(self) -> float:
        if self.w.norm_out is None:
            return 1.0
        return math.sqrt(self.cfg.d_model) / self.w.norm_out

    # -- forward --------------------------------------------------------------------------------
    def pre_activation(self, x_norm: torch.Tensor) -> torch.Tensor:
        return x_norm @ self.w.W_E + self.w.b_E

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        scale = self.decoder_norm if self.cfg.sparsity_include_decoder_norm else None
        g = h * scale if scale is not None else h
        act = self.cfg.act_fn
        if act == "relu":
            out = torch.relu(g)
        elif act == "jumprelu":
            assert self.w.jumprelu_threshold is not None
            out = g * (g > self.w.jumprelu_threshold)
        else:  # topk: keep the k largest non-negative gated values per token
            g = torch.relu(g)
            k = min(self.cfg.top_k, g.shape[-1])
            vals, idx = g.topk(k, dim=-1)
            out = torch.zeros_like(g).scatter(-1, idx, vals)
        return out / scale if scale is not None else out

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` in base-model units ``[..., d]`` -> (activations, pre-activations) ``[..., n]``."""
        h = self.pre_activation(x.float() * self.in_scale())
        return self.activate(h), h

    def decode(self, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``sum_i f_i U_i V_i x + b_D`` in base-model units; ``x`` is the un-normalised input."""
        x_norm = x.float() * self.in_scale()
        y = torch.zeros_like(x_norm)
        start = 0
        for r in sorted(self.w.U):
            U, V = self.w.U[r], self.w.V[r]
            n_r = U.shape[0]
            f_r = f[..., start : start + n_r]
            start += n_r
            vx = torch.einsum("...d,nrd->...nr", x_norm, V)  # [..., n_r, r]
            y = y + torch.einsum("...nr,ndr->...d", vx * f_r.unsqueeze(-1), U)
        if self.w.b_D is not None:
            y = y + self.w.b_D
        return y / self.out_scale()

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        f, _ = self.encode(x)
        return self.decode(f, x)


def transform_norms(w: MoltWeights) -> torch.Tensor:
    """``||U_i V_i||_F`` for every feature, in feature order, without forming ``U_i V_i``.

    ``||U V||_F^2 = tr(V^T U^T U V) = sum((U^T U) * (V V^T))`` with both Gram matrices ``r x r``.
    """
    norms = []
    for r in sorted(w.U):
        gu = w.U[r].transpose(1, 2) @ w.U[r]  # [n_r, r, r]
        gv = w.V[r] @ w.V[r].transpose(1, 2)  # [n_r, r, r]
        norms.append((gu * gv).sum(dim=(1, 2)).clamp_min(0).sqrt())
    return torch.cat(norms)
