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


# ----------------------------------------------------------- sequence-level global CI functions
# Written from the dev branch's maths with explicit per-head / per-frequency loops:
# RMSNorm x / sqrt(mean(x^2) + eps) (* w), eps = float32 machine epsilon (torch's default);
# RoPE rotates coordinate i with i + d_head/2 by the angle pos * inv_freq[i];
# attention softmax(q k^T / sqrt(d_head)) v over all positions (no mask).
EPS32 = torch.finfo(torch.float32).eps
G = "ci_fn._global_ci_fn."


def rms(x: Tensor, w: Tensor | None = None) -> Tensor:
    y = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + EPS32)
    return y if w is None else y * w


def _lin(sd: dict[str, Tensor], key: str, x: Tensor) -> Tensor:
    return x @ sd[f"{G}{key}.W"] + sd[f"{G}{key}.b"]


def _seq_mlp(sd: dict[str, Tensor], key: str, x: Tensor) -> Tensor:
    n = 0
    while f"{G}{key}.{2 * n}.W" in sd:
        n += 1
    for k in range(n):
        x = _lin(sd, f"{key}.{2 * k}", x)
        if k < n - 1:
            x = gelu(x)
    return x


def _rotate(v: Tensor, inv_freq: Tensor) -> Tensor:
    """v [B, S, d_head] -> RoPE-rotated, position = index along S."""
    half = v.shape[-1] // 2
    out = torch.empty_like(v)
    pos = torch.arange(v.shape[1], dtype=torch.float32)
    for i in range(half):
        ang = pos * inv_freq[i]
        c, s = torch.cos(ang)[None, :], torch.sin(ang)[None, :]
        a, b = v[..., i], v[..., i + half]
        out[..., i] = a * c - b * s
        out[..., i + half] = b * c + a * s
    return out


def attention(sd: dict[str, Tensor], key: str, x: Tensor, n_heads: int) -> Tensor:
    """Bidirectional MHA with RoPE; x [B, S, d]; nn.Linear weights (y = x W^T)."""
    q, k, v = (x @ sd[f"{G}{key}.{n}_proj.weight"].T for n in ("q", "k", "v"))
    inv_freq = sd[f"{G}{key}.rope.inv_freq"]
    d = x.shape[-1]
    dh = d // n_heads
    heads = []
    for h in range(n_heads):
        sl = slice(h * dh, (h + 1) * dh)
        qh, kh = _rotate(q[..., sl], inv_freq), _rotate(k[..., sl], inv_freq)
        scores = torch.einsum("bid,bjd->bij", qh, kh) / math.sqrt(dh)
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        p = p / p.sum(dim=-1, keepdim=True)
        heads.append(torch.einsum("bij,bjd->bid", p, v[..., sl]))
    return torch.cat(heads, dim=-1) @ sd[f"{G}{key}.out_proj.weight"].T


def _split(out: Tensor, order: list[str], sizes: dict[str, int]) -> dict[str, Tensor]:
    res, start = {}, 0
    for p in order:
        res[p] = out[..., start : start + sizes[p]]
        start += sizes[p]
    return res


def pre_sigmoid_shared_transformer(
    sd: dict[str, Tensor], acts: dict[str, Tensor], sizes: dict[str, int], st: dict
) -> dict[str, Tensor]:
    """``acts``: per site its CI input (embedding: V[token]); sites in sorted order."""
    order = sorted(acts)
    x = _lin(sd, "_input_projector", torch.cat([rms(acts[p]) for p in order], dim=-1))
    for i in range(st["n_blocks"]):
        x = x + attention(sd, f"_blocks.{i}.attn", rms(x), st["attn_config"]["n_heads"])
        x = x + _seq_mlp(sd, f"_blocks.{i}.mlp", rms(x))
    return _split(_lin(sd, "_output_head", x), order, sizes)


def pre_sigmoid_reverse_residual(
    sd: dict[str, Tensor],
    acts: dict[str, Tensor],
    sizes: dict[str, int],
    blocks: list[tuple[str, list[str]]],
    ci: dict,
) -> dict[str, Tensor]:
    first = next(iter(acts.values()))
    r = torch.zeros(*first.shape[:-1], ci["d_resid_ci_fn"])
    out: dict[str, Tensor] = {}
    for idx, (name, mods) in enumerate(blocks):
        b = name.replace(".", "-")
        r = r + _lin(sd, f"_inp_projectors.{b}", torch.cat([acts[m] for m in mods], dim=-1))
        if idx < len(blocks) - 1:
            attn = ci.get("transition_attn_config")
            if attn is not None:
                normed = rms(r, sd[f"{G}_attn_norms.{b}.weight"])
                r = r + attention(sd, f"_attn_transitions.{b}", normed, attn["n_heads"])
            normed = rms(r, sd[f"{G}_transition_norms.{b}.weight"])
            if ci.get("transition_hidden_dim") is None:
                r = r + _lin(sd, f"_transitions.{b}", normed)
            else:
                r = r + _seq_mlp(sd, f"_transitions.{b}", normed)
        # the reader reads the residual after this block's transition
        z = _seq_mlp(sd, f"_readers.{b}", rms(r, sd[f"{G}_reader_norms.{b}.weight"]))
        out.update(_split(z, mods, sizes))
    return out
