"""Benchmark models and dictionaries, written to disk in the formats the real ecosystem uses.

- The base model: a GPT-2 of the requested depth at GPT-2-small width (d_model 768, 12 heads,
  vocab 50,257), random init from ``transformers.GPT2Config`` and saved with
  ``save_pretrained`` (safetensors), so ``spd_host.models.load_base_model`` and delphi both
  load it as a local Hugging Face model directory. ``ln_f.weight`` is scaled by 8 so the
  next-token distributions have the entropy range of a trained model instead of being near
  uniform (the output-token tables then look like a real run's); the embeddings stay tied.
- Dictionaries: SAELens >= 6 layout, one folder per dictionary with ``cfg.json`` (architecture,
  ``d_in``, ``d_sae``, ``metadata.{model_name, hook_name, hook_name_out}``) and
  ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_out]``,
  ``b_dec``, ``threshold`` for JumpReLU) — read by ``spd_adapters.transcoder.formats``.
  TopK SAEs keep k = 32 per token; the JumpReLU transcoder's thresholds are set so about 60
  of its 32,768 features fire per token on the (unit-variance) pre-MLP LayerNorm output.

Everything is cached under ``--fixtures`` (default /tmp/spd_host_bench_fixtures): a directory
that holds ``.done`` is reused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_ROOT = Path(os.environ.get("SPD_HOST_BENCH_FIXTURES", "/tmp/spd_host_bench_fixtures"))
GPT2_VOCAB = 50_257


@dataclass(frozen=True)
class DictSpec:
    """One dictionary to write: a TopK SAE on a residual stream or a JumpReLU transcoder."""

    kind: str  # "topk_sae" | "jumprelu_transcoder"
    layer: int
    n: int = 32_768
    k: int = 32


def gpt2_dir(
    root: Path,
    n_layer: int,
    *,
    d_model: int = 768,
    n_head: int = 12,
    vocab: int = GPT2_VOCAB,
    seed: int = 0,
) -> Path:
    """A saved random-init GPT2LMHeadModel directory (config.json + model.safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = root / f"gpt2-{n_layer}x{d_model}-v{vocab}"
    if (out / ".done").exists():
        return out
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_embd=d_model, n_head=n_head, vocab_size=vocab, n_positions=1024
    )
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(8.0)
    model.save_pretrained(out)
    (out / ".done").write_text("ok")
    return out


def _write_saelens(
    folder: Path,
    *,
    arch: str,
    d_in: int,
    d_out: int,
    n: int,
    model: Path,
    hook_in: str,
    hook_out: str | None,
    k: int | None,
    tensors: dict[str, torch.Tensor],
) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    is_tc = "transcoder" in arch
    meta: dict[str, object] = {
        "model_name": str(model),
        "hook_name": hook_in,
        "dataset_path": "synthetic-zipf",
        "context_size": 256,
    }
    if hook_out is not None:
        meta["hook_name_out"] = hook_out
    cfg: dict[str, object] = {
        "architecture": arch,
        "d_in": d_in,
        "d_sae": n,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not is_tc,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
    }
    if is_tc:
        cfg["d_out"] = d_out
    if k is not None:
        cfg["k"] = k
        cfg["rescale_acts_by_decoder_norm"] = False
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=1))
    save_file(
        {name: t.contiguous() for name, t in tensors.items()},
        str(folder / "sae_weights.safetensors"),
    )


def decomposition_dir(
    root: Path, model: Path, dicts: list[DictSpec], *, d_model: int = 768, seed: int = 1
) -> Path:
    """A SAELens release directory: one sub-folder per dictionary (the transcoder plugin reads it)."""
    name = "-".join(f"{d.kind}{d.layer}n{d.n}" for d in dicts)
    out = root / f"dec-{model.name}-{name}"
    if (out / ".done").exists():
        return out
    gen = torch.Generator().manual_seed(seed)
    for d in dicts:
        W_enc = torch.randn(d_model, d.n, generator=gen) / math.sqrt(d_model)
        W_dec = torch.randn(d.n, d_model, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        b_dec = torch.randn(d_model, generator=gen) * 0.01
        if d.kind == "topk_sae":
            _write_saelens(
                out / f"blocks.{d.layer}.hook_resid_post",
                arch="topk",
                d_in=d_model,
                d_out=d_model,
                n=d.n,
                model=model,
                hook_in=f"blocks.{d.layer}.hook_resid_post",
                hook_out=None,
                k=d.k,
                tensors={"W_enc": W_enc, "b_enc": torch.zeros(d.n), "W_dec": W_dec, "b_dec": b_dec},
            )
        elif d.kind == "jumprelu_transcoder":
            # pre ~ N(0, 1) per feature on LayerNorm output; P(pre > 2.9) ~ 0.19%: ~60 of 32k fire
            thr = 2.9 + 0.2 * torch.rand(d.n, generator=gen)
            _write_saelens(
                out / f"blocks.{d.layer}.ln2_to_mlp_out",
                arch="jumprelu_transcoder",
                d_in=d_model,
                d_out=d_model,
                n=d.n,
                model=model,
                hook_in=f"blocks.{d.layer}.ln2.hook_normalized",
                hook_out=f"blocks.{d.layer}.hook_mlp_out",
                k=None,
                tensors={
                    "W_enc": W_enc,
                    "b_enc": torch.zeros(d.n),
                    "W_dec": W_dec,
                    "b_dec": b_dec,
                    "threshold": thr,
                },
            )
        else:
            raise ValueError(f"unknown dictionary kind {d.kind!r}")
    (out / ".done").write_text("ok")
    return out


@dataclass(frozen=True)
class Case:
    """A benchmark case: which decomposition, its vocabulary and batch shape."""

    name: str
    decomposition_id: str
    vocab: int
    batch_size: int
    seq_len: int
    decomposition_root: Path | None = None  # SAELens directory (for delphi)
    model_dir: Path | None = None


def build_case(name: str, root: Path = DEFAULT_ROOT, *, tiny: bool = False) -> Case:
    """Write (or reuse) the files of a named case and return how to harvest it.

    ``tiny`` (or the case ``tiny``) swaps in a 2 x 64 GPT-2 (vocab 1,024) with 512-latent
    dictionaries of the same kinds, for checking the scripts themselves in seconds.
    """
    if name == "demo":
        return Case(name, "transcoder:demo", 2048, 16, 128)
    if name == "gpt2-small":  # 12 x 768, 32k TopK SAE (layer 6) + 32k JumpReLU transcoder (layer 8)
        layers, dicts = 12, [DictSpec("topk_sae", 6), DictSpec("jumprelu_transcoder", 8)]
    elif name == "gpt2-6x768":  # 6 x 768, two 32k TopK SAEs (layers 2 and 4)
        layers, dicts = 6, [DictSpec("topk_sae", 2), DictSpec("topk_sae", 4)]
    elif name == "gpu":  # sized for one GPU: 12 x 768, 131k TopK SAE (k=64) + 32k JumpReLU
        layers, dicts = (
            12,
            [DictSpec("topk_sae", 6, n=131_072, k=64), DictSpec("jumprelu_transcoder", 8)],
        )
    elif name == "tiny":
        layers, dicts = 2, [DictSpec("topk_sae", 0), DictSpec("jumprelu_transcoder", 1)]
    else:
        raise ValueError(f"unknown case {name!r}")
    if tiny or name == "tiny":
        model = gpt2_dir(root, 2, d_model=64, n_head=4, vocab=1024)
        dicts = [DictSpec(d.kind, min(d.layer, 1), n=512, k=8) for d in dicts]
        dec = decomposition_dir(root, model, dicts, d_model=64)
        return Case(name, f"transcoder:{dec}", 1024, 4, 32, dec, model)
    model = gpt2_dir(root, layers)
    dec = decomposition_dir(root, model, dicts)
    bs, seq = (16, 1024) if name == "gpu" else (8, 256)
    return Case(name, f"transcoder:{dec}", GPT2_VOCAB, bs, seq, dec, model)
