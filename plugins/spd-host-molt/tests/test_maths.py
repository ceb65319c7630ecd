"""MOLT maths against an independent, per-feature reference written from the published formula.

Reference: ``f_i = phi(x W_E[:, i] + b_E[i])`` (gate on ``h_i ||U_i V_i||_F`` when the decoder
norm is included), ``y = sum_i f_i (U_i V_i) x + b_D``, features ordered by ascending rank, with
dataset-wise scaling ``x * sqrt(d)/norm_in`` and ``y / (sqrt(d)/norm_out)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from molt_files import random_molt_tensors, write_molt
from spd_host_molt.format import read_config, read_weights
from spd_host_molt.maths import Molt

D = 12
RANKS = {4: 3, 1: 5, 2: 4}  # deliberately not sorted: features must be ordered 1, 2, 4


def reference(sd, x, *, act_fn, include_norm, top_k, norms=None, hook_in="", hook_out=""):
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    s_in = math.sqrt(D) / norms[hook_in] if norms else 1.0
    s_out = math.sqrt(D) / norms[hook_out] if norms else 1.0
    mats = []  # (U_i V_i) in feature order
    for r in sorted(RANKS):
        for j in range(RANKS[r]):
            mats.append(sd[f"U_matrices.{r}"][j] @ sd[f"V_matrices.{r}"][j])
    n = len(mats)
    out = torch.zeros(*x.shape[:-1], n, dtype=torch.float64)
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        xt = x[t] * s_in
        h = xt @ sd["W_E"] + sd["b_E"]
        norm = torch.tensor([torch.linalg.matrix_norm(m).item() for m in mats], dtype=torch.float64)
        g = h * norm if include_norm else h
        if act_fn == "relu":
            f = torch.clamp(g, min=0)
        elif act_fn == "jumprelu":
            thr = sd["activation_function.log_jumprelu_threshold"].exp()
            f = torch.where(g > thr, g, torch.zeros_like(g))
        else:
            g = torch.clamp(g, min=0)
            keep = sorted(range(n), key=lambda i: -g[i].item())[:top_k]
            f = torch.zeros_like(g)
            f[keep] = g[keep]
        if include_norm:
            f = f / norm
        out[t] = f
        yt = sum(f[i] * (mats[i] @ xt) for i in range(n))
        if "b_D" in sd:
            yt = yt + sd["b_D"]
        y[t] = yt / s_out
    return out, y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


@pytest.mark.parametrize(
    ("act_fn", "include_norm", "bias", "dataset_norms"),
    [
        ("relu", True, True, False),
        ("relu", False, False, False),
        ("jumprelu", True, True, False),
        ("jumprelu", False, True, True),
        ("topk", True, True, True),
    ],
)
def test_encode_decode_match_reference(
    tmp_path: Path, act_fn: str, include_norm: bool, bias: bool, dataset_norms: bool
) -> None:
    hook_in, hook_out = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    norms = {hook_in: 2.5, hook_out: 7.0} if dataset_norms else None
    sd = random_molt_tensors(
        D, RANKS, seed=3, decoder_bias=bias, jumprelu=act_fn == "jumprelu", norms=norms
    )
    if act_fn == "jumprelu":  # thresholds in the range of the gated pre-activations
        sd["activation_function.log_jumprelu_threshold"] = torch.full((12,), -3.0) + torch.rand(12)
    root = write_molt(
        tmp_path / "m",
        sd,
        d_model=D,
        ranks=RANKS,
        act_fn=act_fn,
        decoder_bias=bias,
        sparsity_include_decoder_norm=include_norm,
        norm_activation="dataset-wise" if dataset_norms else "inference",
        top_k=4,
    )
    cfg = read_config(root)
    molt = Molt(cfg, read_weights(root, cfg))
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(1)) * 3
    f, _ = molt.encode(x)
    y = molt.decode(f, x)
    f_ref, y_ref = reference(
        sd,
        x,
        act_fn=act_fn,
        include_norm=include_norm,
        top_k=4,
        norms=norms,
        hook_in=hook_in,
        hook_out=hook_out,
    )
    assert (f_ref > 0).any() and (f_ref == 0).any(), "the example must exercise the gate"
    assert rel_err(f, f_ref) < 1e-5
    assert rel_err(y, y_ref) < 1e-5
    assert torch.equal(f > 0, f_ref > 0)


def test_batched_shapes_match_flat(tmp_path: Path) -> None:
    sd = random_molt_tensors(D, RANKS, seed=5)
    root = write_molt(tmp_path / "m", sd, d_model=D, ranks=RANKS)
    cfg = read_config(root)
    molt = Molt(cfg, read_weights(root, cfg))
    x = torch.randn(2, 5, D)
    y = molt.reconstruct(x)
    assert y.shape == (2, 5, D)
    assert torch.allclose(y.reshape(10, D), molt.reconstruct(x.reshape(10, D)), atol=1e-6)
