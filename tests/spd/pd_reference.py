"""An independent float64 numpy implementation of param-decomp's transformer CI functions.

Written from the formulas (``param_decomp/core/ci_fn/implementations/transformer/layers.py``)
without the plugin's code: explicit per-head loops, pairwise rotary rotation, stable softmax.
Taps are read from the HF model with the test's own hooks (block *outputs*, norm outputs).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from tests.spd.pd_run_writer import RunSpec, input_taps, site_name, sites_of

EPS = float(np.finfo(np.float32).eps)
_erf = np.vectorize(math.erf)


def taps_and_site_inputs(model: Any, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """Every tap the CI may read, from hooks on the HF Llama: block outputs, norm outputs,
    projection inputs."""
    got: dict[str, torch.Tensor] = {}
    hooks = []
    layers = model.model.layers
    hooks.append(
        model.model.embed_tokens.register_forward_hook(
            lambda m, a, o: got.__setitem__("resid.0", o)
        )
    )
    for b, layer in enumerate(layers):
        hooks += [
            layer.register_forward_hook(
                lambda m, a, o, b=b: got.__setitem__(
                    f"resid.{b + 1}", o[0] if isinstance(o, tuple) else o
                )
            ),
            layer.input_layernorm.register_forward_hook(
                lambda m, a, o, b=b: got.__setitem__(f"attn_in.{b}", o)
            ),
            layer.post_attention_layernorm.register_forward_hook(
                lambda m, a, o, b=b: got.__setitem__(f"mlp_in.{b}", o)
            ),
            layer.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, b=b: got.__setitem__(f"attn_out.{b}", a[0])
            ),
            layer.mlp.down_proj.register_forward_pre_hook(
                lambda m, a, b=b: got.__setitem__(f"mlp_hidden.{b}", a[0])
            ),
        ]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return {k: v.detach().double().numpy() for k, v in got.items()}


def simple_taps(model: Any, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """The same taps on a LlamaSimpleMLP-named model (``wte``, ``h.{i}.rms_1/attn/rms_2/mlp``)."""
    got: dict[str, torch.Tensor] = {}
    hooks = [model.wte.register_forward_hook(lambda m, a, o: got.__setitem__("resid.0", o))]
    for b, blk in enumerate(model.h):
        hooks += [
            blk.register_forward_hook(lambda m, a, o, b=b: got.__setitem__(f"resid.{b + 1}", o)),
            blk.rms_1.register_forward_hook(
                lambda m, a, o, b=b: got.__setitem__(f"attn_in.{b}", o)
            ),
            blk.rms_2.register_forward_hook(lambda m, a, o, b=b: got.__setitem__(f"mlp_in.{b}", o)),
            blk.attn.o_proj.register_forward_pre_hook(
                lambda m, a, b=b: got.__setitem__(f"attn_out.{b}", a[0])
            ),
            blk.mlp.down_proj.register_forward_pre_hook(
                lambda m, a, b=b: got.__setitem__(f"mlp_hidden.{b}", a[0])
            ),
        ]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return {k: v.detach().double().numpy() for k, v in got.items()}


_INPUT_TAP = {
    **dict.fromkeys(("q", "k", "v", "q_proj", "k_proj", "v_proj"), "attn_in"),
    **dict.fromkeys(("o", "o_proj"), "attn_out"),
    **dict.fromkeys(("gate", "up", "c_fc"), "mlp_in"),
    **dict.fromkeys(("down", "down_proj"), "mlp_hidden"),
}


def site_input_tap(layer: int, kind: str) -> str:
    return f"{_INPUT_TAP[kind]}.{layer}"


def _rms(x: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)
    return y if scale is None else y * scale


def _rope(x: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """x [T, hd]: rotate pair (i, i + hd/2) by angle t * inv_freq[i]."""
    T, hd = x.shape
    half = hd // 2
    out = np.empty_like(x)
    for t in range(T):
        for i in range(half):
            a = t * float(inv_freq[i])
            c, s = math.cos(a), math.sin(a)
            out[t, i] = x[t, i] * c - x[t, i + half] * s
            out[t, i + half] = x[t, i + half] * c + x[t, i] * s
    return out


def _transformer(
    x: np.ndarray, blocks: list[dict[str, Any]], ci: dict[str, Any], inv_freq: np.ndarray
) -> np.ndarray:
    """x [B, T, d] after the input projection -> after every block."""
    nh = ci["attention"]["n_heads"]
    nkv = ci["attention"].get("n_kv_heads", nh)
    causal = ci["attention"].get("mask") == "causal"
    B, T, d = x.shape
    hd = d // nh
    for blk in blocks:
        ns = blk["norm_scales"]
        h = _rms(x, None if ns is None else ns[0])
        q, k, v = h @ blk["wq"].T, h @ blk["wk"].T, h @ blk["wv"].T
        y = np.zeros((B, T, d))
        for bi in range(B):
            for head in range(nh):
                kvh = head // (nh // nkv)
                qh = _rope(q[bi, :, head * hd : (head + 1) * hd], inv_freq)
                kh = _rope(k[bi, :, kvh * hd : (kvh + 1) * hd], inv_freq)
                vh = v[bi, :, kvh * hd : (kvh + 1) * hd]
                s = qh @ kh.T / math.sqrt(hd)
                if causal:
                    s = np.where(np.tril(np.ones((T, T))) > 0, s, -np.inf)
                s = np.exp(s - s.max(-1, keepdims=True))
                y[bi, :, head * hd : (head + 1) * hd] = (s / s.sum(-1, keepdims=True)) @ vh
        x = x + y @ blk["wo"].T
        h = _rms(x, None if ns is None else ns[1])
        up = h @ blk["w1"] + blk["b1"]
        if blk["gate"] is None:
            hidden = 0.5 * up * (1 + _erf(up / math.sqrt(2)))
        else:
            g = h @ blk["gate"][0] + blk["gate"][1]
            hidden = g / (1 + np.exp(-g)) * up
        x = x + hidden @ blk["w2"] + blk["b2"]
    return x


def _f64(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _f64(v) for k, v in tree.items()}
    if isinstance(tree, tuple | list):
        return type(tree)(_f64(v) for v in tree)
    return None if tree is None else np.asarray(tree, dtype=np.float64)


def reference_ci(
    spec: RunSpec, p: dict[str, Any], taps: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(CI, component activations x V) per site name, from the params and the HF taps."""
    ci = spec.ci
    p = {k: v if k in ("VU", "groups") else _f64(v) for k, v in p.items()}
    inv_freq = p.get("inv_freq")
    acts = {
        site_name(layer, kind, spec.family): taps[site_input_tap(layer, kind)]
        @ p["VU"][(layer, kind)][0].astype(np.float64)
        for layer, kind in sites_of(spec)
    }
    kinds = spec.kinds
    fam = spec.family
    pre: dict[str, np.ndarray] = {}
    if ci["type"] == "global_mlp":
        x = np.concatenate(
            [taps[t] for t in input_taps(ci, list(spec.layers), spec.kinds)], -1
        )  # raw
        weights, biases = p["mlp"]
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            x = x @ w + b
            if i < len(weights) - 1:
                x = 0.5 * x * (1 + _erf(x / math.sqrt(2)))
        start = 0
        for layer, k in sites_of(spec):
            pre[site_name(layer, k, fam)] = x[..., start : start + spec.cs[k]]
            start += spec.cs[k]
    elif ci["type"] == "chunkwise_transformer":
        for c, group in enumerate(p["groups"]):
            x = np.concatenate([_rms(taps[t]) for t in input_taps(ci, group, spec.kinds)], -1)
            x = x @ p["in_w"][c] + p["in_b"][c]
            blocks = [
                {
                    k: (
                        None
                        if v is None
                        else (tuple(a[c] for a in v) if isinstance(v, tuple) else v[c])
                    )
                    for k, v in b.items()
                }
                for b in p["blocks"]
            ]
            x = _transformer(x, blocks, ci, inv_freq)
            slots = [(layer, k) for layer in group for k in kinds]
            for j, (layer, k) in enumerate(slots):
                pre[site_name(layer, k, fam)] = x @ p["out_ws"][j][c] + p["out_bs"][j][c]
    else:
        x = np.concatenate(
            [_rms(taps[t]) for t in input_taps(ci, list(spec.layers), spec.kinds)], -1
        )
        x = x @ p["in_w"] + p["in_b"]
        n = ci["n_blocks"]
        b = p["blocks"]
        blocks = [
            {
                k: (
                    None
                    if v is None
                    else (tuple(a[i] for a in v) if isinstance(v, tuple) else v[i])
                )
                for k, v in b.items()
            }
            for i in range(n)
        ]
        x = _transformer(x, blocks, ci, inv_freq)
        for k in kinds:
            W, bias = p["heads"][k]
            for s_idx, layer in enumerate(spec.layers):
                pre[site_name(layer, k, fam)] = x @ W[s_idx] + bias[s_idx]
    if "readouts" in p:
        for (layer, kind), r in p["readouts"].items():
            name = site_name(layer, kind, fam)
            h = acts[name]
            (ap, bp, sp), (an, bn, sn) = r["positive"], r["negative"]
            pre[name] = (
                pre[name]
                + sp * np.clip(ap * h + bp, 0, 1)
                + sn * np.clip(an * (-h) + bn, 0, 1)
                + r["bias"]
            )
    return {k: np.clip(v, 0, 1) for k, v in pre.items()}, acts
