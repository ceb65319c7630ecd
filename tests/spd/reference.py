"""An independent implementation of SPD's causal-importance and component-activation formulas.

Written from the maths with explicit per-component loops (no code shared with the plugin):

- component activation ``a_c = sum_i x_i V[i, c]`` (embedding: ``V[token, c]``), reported as
  ``a_c * ||U_c||``;
- ``mlp``: per component c, a scalar MLP on ``a_c``; ``vector_mlp``: per component c, an MLP on
  ``x``; ``shared_mlp``: one MLP x -> C; ``global_shared_mlp``: one MLP on the concatenation of
  all sites' inputs in sorted path order (embeddings: their component activations) -> split;
  GELU (erf form) between layers, none after the last;
- then the sigmoid (forward value).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def sigmoid(kind: str, z: Tensor) -> Tensor:
    if kind in ("hard", "leaky_hard", "lower_leaky_hard"):
        return torch.minimum(torch.maximum(z, torch.zeros_like(z)), torch.ones_like(z))
    if kind == "normal":
        return 1.0 / (1.0 + torch.exp(-z))
    if kind == "upper_leaky_hard":
        inside = torch.minimum(torch.maximum(z, torch.zeros_like(z)), torch.ones_like(z))
        return torch.where(z > 1, 1 + 0.01 * (z - 1), inside)
    if kind == "swish_hard":
        # 0.5 + [d(u - 0.5) - s(u)] + [s(u + 0.5) - d(u)], u = z - 0.5, s(t) = t*sig(10t), d(t) = t*sig(-10t)
        u = z - 0.5

        def s(t: Tensor) -> Tensor:
            return t / (1 + torch.exp(-10 * t))

        def d(t: Tensor) -> Tensor:
            return t / (1 + torch.exp(10 * t))

        return 0.5 + (d(u - 0.5) - s(u)) + (s(u + 0.5) - d(u))
    raise ValueError(kind)


def _layers(sd: dict[str, Tensor], prefix: str) -> list[tuple[Tensor, Tensor]]:
    out = []
    i = 0
    while f"{prefix}layers.{i}.W" in sd:
        out.append((sd[f"{prefix}layers.{i}.W"], sd[f"{prefix}layers.{i}.b"]))
        i += 2
    return out


def _mlp(layers: list[tuple[Tensor, Tensor]], h: Tensor) -> Tensor:
    for k, (W, b) in enumerate(layers):
        h = h @ W + b
        if k < len(layers) - 1:
            h = gelu(h)
    return h


def component_acts(sd: dict[str, Tensor], path: str, x: Tensor, embedding: bool) -> Tensor:
    V = sd[f"_components.{path.replace('.', '-')}.V"]
    if embedding:
        return V[x]
    return torch.einsum("...i,ic->...c", x.float(), V)


def reported_component_activation(
    sd: dict[str, Tensor], path: str, x: Tensor, embedding: bool
) -> Tensor:
    U = sd[f"_components.{path.replace('.', '-')}.U"]
    norms = torch.sqrt((U**2).sum(dim=1))
    return component_acts(sd, path, x, embedding) * norms


def pre_sigmoid_layerwise(
    sd: dict[str, Tensor], fn_type: str, path: str, x: Tensor, embedding: bool
) -> Tensor:
    prefix = f"ci_fn._ci_fns.{path.replace('.', '-')}."
    layers = _layers(sd, prefix)
    if fn_type == "shared_mlp":
        return _mlp(layers, x.float())
    C = sd[f"_components.{path.replace('.', '-')}.V"].shape[1]
    a = component_acts(sd, path, x, embedding)
    outs = []
    for c in range(C):
        per_c = [(W[c], b[c]) for W, b in layers]
        h = a[..., c : c + 1] if fn_type == "mlp" else x.float()
        outs.append(_mlp(per_c, h)[..., 0])
    return torch.stack(outs, dim=-1)


def pre_sigmoid_global(
    sd: dict[str, Tensor], inputs: dict[str, Tensor], embeddings: set[str]
) -> dict[str, Tensor]:
    order = sorted(inputs)
    parts = [
        component_acts(sd, p, inputs[p], True) if p in embeddings else inputs[p].float()
        for p in order
    ]
    out = _mlp(_layers(sd, "ci_fn._global_ci_fn."), torch.cat(parts, dim=-1))
    res, start = {}, 0
    for p in order:
        C = sd[f"_components.{p.replace('.', '-')}.V"].shape[1]
        res[p] = out[..., start : start + C]
        start += C
    return res
