"""Write Goodfire / nn_decompositions checkpoints exactly as their trainer does, and compute
what those checkpoints mean with formulas written here, independently of spd_adapters.

Layout (nn_decompositions ``logs.save_checkpoint``): ``config.json`` = ``asdict(cfg)`` with
every value that is not a JSON scalar written as ``str(value)`` (``dtype`` ->
``"torch.float32"``, a CLT's ``layers`` -> ``"[0, 1, 2]"``), ``encoder.pt`` =
``torch.save(module.state_dict())``. Key order follows parameter registration order.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

# EncoderConfig's fields and defaults, in declaration order (nn_decompositions/config.py).
ENCODER_DEFAULTS: dict[str, Any] = {
    "input_size": None,
    "output_size": None,
    "dict_size": 12288,
    "encoder_type": "topk",
    "seed": 49,
    "batch_size": 4096,
    "lr": 3e-4,
    "num_tokens": int(1e9),
    "l1_coeff": 0.0,
    "beta1": 0.9,
    "beta2": 0.99,
    "max_grad_norm": 1.0,
    "device": "cuda:0",
    "dtype": torch.float32,
    "n_batches_to_dead": 50,
    "input_unit_norm": False,
    "pre_enc_bias": False,
    "top_k": 32,
    "top_k_aux": 512,
    "aux_penalty": 1 / 32,
    "bandwidth": 0.001,
    "run_name": None,
    "wandb_project": "encoders",
    "perf_log_freq": 1000,
    "checkpoint_freq": "final",
    "n_eval_seqs": 8,
}

# CLTConfig's fields and defaults, in declaration order.
CLT_DEFAULTS: dict[str, Any] = {
    "layers": [],
    "input_size": 768,
    "output_size": 768,
    "dict_size": 12288,
    "encoder_type": "topk",
    "seed": 49,
    "batch_size": 4096,
    "lr": 3e-4,
    "num_tokens": int(1e9),
    "l1_coeff": 0.0,
    "beta1": 0.9,
    "beta2": 0.99,
    "max_grad_norm": 1.0,
    "device": "cuda:0",
    "dtype": torch.float32,
    "n_batches_to_dead": 50,
    "top_k": 32,
    "top_k_aux": 512,
    "aux_penalty": 1 / 32,
    "bandwidth": 0.001,
    "wandb_project": "cross_layer_transcoders",
    "perf_log_freq": 1000,
    "checkpoint_freq": "final",
    "n_eval_seqs": 8,
}


def _json_safe(cfg: dict[str, Any]) -> str:
    out = {
        k: v if isinstance(v, int | float | str | bool | type(None)) else str(v)
        for k, v in cfg.items()
    }
    return json.dumps(out, indent=4)


def write_transcoder(
    root: Path,
    *,
    gen: torch.Generator,
    input_size: int = 8,
    output_size: int = 8,
    dict_size: int = 32,
    encoder_type: str = "batchtopk",
    top_k: int = 4,
    **overrides: Any,
) -> dict[str, Tensor]:
    """A BatchTopKTranscoder-style checkpoint; returns the state dict written."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        **ENCODER_DEFAULTS,
        "input_size": input_size,
        "output_size": output_size,
        "dict_size": dict_size,
        "encoder_type": encoder_type,
        "top_k": top_k,
        **overrides,
    }
    (root / "config.json").write_text(_json_safe(cfg))
    sd: dict[str, Tensor] = OrderedDict(
        b_dec=torch.randn(output_size, generator=gen) * 0.1,
        b_enc=torch.randn(dict_size, generator=gen) * 0.5,
        W_enc=torch.randn(input_size, dict_size, generator=gen) / input_size**0.5,
        W_dec=torch.randn(dict_size, output_size, generator=gen) / dict_size**0.5,
    )
    if encoder_type == "jumprelu":
        sd["jumprelu.log_threshold"] = torch.randn(dict_size, generator=gen) * 0.5 - 1.0
    torch.save(sd, root / "encoder.pt")
    return dict(sd)


def write_clt(
    root: Path,
    *,
    gen: torch.Generator,
    layers: list[int],
    input_size: int = 8,
    output_size: int = 8,
    dict_size: int = 16,
    encoder_type: str = "batchtopk",
    top_k: int = 3,
    **overrides: Any,
) -> dict[str, Tensor]:
    """A CrossLayerTranscoder-style checkpoint (ParameterList keys by position)."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        **CLT_DEFAULTS,
        "layers": layers,
        "input_size": input_size,
        "output_size": output_size,
        "dict_size": dict_size,
        "encoder_type": encoder_type,
        "top_k": top_k,
        **overrides,
    }
    (root / "config.json").write_text(_json_safe(cfg))
    n = len(layers)
    sd: dict[str, Tensor] = OrderedDict()
    for p in range(n):
        sd[f"W_enc.{p}"] = torch.randn(input_size, dict_size, generator=gen) / input_size**0.5
    for p in range(n):
        sd[f"b_enc.{p}"] = torch.randn(dict_size, generator=gen) * 0.5
    for p in range(n):
        sd[f"W_dec.{p}"] = torch.randn(n - p, dict_size, output_size, generator=gen) * 0.3
    for p in range(n):
        sd[f"b_dec.{p}"] = torch.randn(output_size, generator=gen) * 0.1
    if encoder_type == "jumprelu":
        for p in range(n):
            sd[f"jumprelu_log_thresholds.{p}"] = torch.randn(dict_size, generator=gen) * 0.5 - 1
    torch.save(sd, root / "encoder.pt")
    return dict(sd)


def write_harvest_config(
    path: Path, base_model: str, artifacts: dict[str, str] | str, **extra: Any
) -> Path:
    """Goodfire's TranscoderHarvestConfig (dict of module paths) or CLTHarvestConfig (one path)."""
    if isinstance(artifacts, dict):
        doc = {
            "type": "TranscoderHarvestConfig",
            "base_model_path": base_model,
            "artifact_paths": artifacts,
        }
    else:
        doc = {
            "type": "CLTHarvestConfig",
            "base_model_path": base_model,
            "artifact_path": artifacts,
        }
    path.write_text(yaml.safe_dump({**doc, **extra}))
    return path


# ----------------------------------------------------------------------------- references


def keep_top(dense: Tensor, n_keep: int) -> Tensor:
    """Zero all but the ``n_keep`` largest entries of ``dense`` (by sorting, not topk)."""
    flat = dense.reshape(-1)
    order = torch.argsort(flat, descending=True)
    mask = torch.zeros_like(flat)
    mask[order[:n_keep]] = 1
    return (flat * mask).reshape(dense.shape)


def unit_norm(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d = x.shape[-1]
    mean = x.sum(-1, keepdim=True) / d
    std = (((x - mean) ** 2).sum(-1, keepdim=True) / (d - 1)).sqrt()
    return (x - mean) / (std + 1e-5), mean, std


def transcoder_reference(
    sd: dict[str, Tensor],
    x: Tensor,
    *,
    encoder_type: str,
    k: int,
    mode: str = "batch_topk",
    pre_enc_bias: bool = False,
    input_unit_norm: bool = False,
    target: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(acts [N, n], output [N, d_out]) for tokens ``x [N, d_in]``, in float64."""
    s = {k_: v.double() for k_, v in sd.items()}
    x = x.double()
    if input_unit_norm:
        x = unit_norm(x)[0]
    if pre_enc_bias and s["W_enc"].shape[0] == s["W_dec"].shape[1]:
        x = x - s["b_dec"]
    dense = (x @ s["W_enc"] + s["b_enc"]).clamp_min(0)
    if encoder_type == "batchtopk" and mode == "batch_topk":
        acts = keep_top(dense, k * x.shape[0])
    elif encoder_type in ("batchtopk", "topk"):
        acts = torch.stack([keep_top(row, k) for row in dense])
    elif encoder_type == "jumprelu":
        acts = dense * (dense > s["jumprelu.log_threshold"].exp())
    else:
        acts = dense
    out = acts @ s["W_dec"] + s["b_dec"]
    if input_unit_norm:
        assert target is not None
        _, mean, std = unit_norm(target.double())
        out = out * std + mean
    return acts, out


def clt_reference(
    sd: dict[str, Tensor], xs: list[Tensor], *, encoder_type: str, k: int, mode: str = "batch_topk"
) -> tuple[list[Tensor], list[Tensor]]:
    """Per-position acts and per-target outputs for inputs ``xs[p] [N, d]``, in float64."""
    s = {k_: v.double() for k_, v in sd.items()}
    acts = []
    for p, x in enumerate(xs):
        dense = (x.double() @ s[f"W_enc.{p}"] + s[f"b_enc.{p}"]).clamp_min(0)
        if encoder_type == "batchtopk" and mode == "batch_topk":
            acts.append(keep_top(dense, k * x.shape[0]))
        elif encoder_type in ("batchtopk", "topk"):
            acts.append(torch.stack([keep_top(row, k) for row in dense]))
        elif encoder_type == "jumprelu":
            acts.append(dense * (dense > s[f"jumprelu_log_thresholds.{p}"].exp()))
        else:
            acts.append(dense)
    outs = []
    for q in range(len(xs)):
        y = s[f"b_dec.{q}"].expand(xs[0].shape[0], -1).clone()
        for p in range(q + 1):
            y = y + acts[p] @ s[f"W_dec.{p}"][q - p]
        outs.append(y)
    return acts, outs
