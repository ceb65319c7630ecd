"""The delphi phase: ``LatentCache.run`` + ``save_splits`` in the delphi venv (no spd-host import).

Run by ``harvest_delphi.py`` with the venv of ``requirements-delphi.txt``. The encoders are the
SAELens maths written out here (TopK SAE: ``topk((x - b_dec) @ W_enc + b_enc)`` then ReLU;
JumpReLU transcoder: ``pre * (pre > threshold)`` with ``pre = x @ W_enc + b_enc``), scattered
into the dense ``[B, S, n]`` latents that ``LatentCache`` expects from
``hookpoint_to_sparse_encode``. Hook points: delphi hooks module *outputs* (``transcode=False``),
so the SAE on ``blocks.L.hook_resid_post`` is module ``h.L`` and the transcoder reading
``blocks.L.ln2.hook_normalized`` is module ``h.L.ln_2``. delphi itself loads ``AutoModel`` (no
LM head); ``--delphi-model lm`` gives it the same ``GPT2LMHeadModel`` forward as spd-host.

``delphi/latents/__init__.py`` also imports the example constructors (faiss,
sentence-transformers); only ``delphi.latents.cache`` is needed, so the package module is
registered bare before importing it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch


def _import_cache() -> types.ModuleType:
    import delphi

    pkg = types.ModuleType("delphi.latents")
    pkg.__path__ = [str(Path(delphi.__file__).parent / "latents")]
    sys.modules["delphi.latents"] = pkg
    return importlib.import_module("delphi.latents.cache")


def _encoder(folder: Path):
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(str(folder / "sae_weights.safetensors"))
    arch, hook = cfg["architecture"], cfg["metadata"]["hook_name"]
    layer = int(hook.split(".")[1])
    W, b, b_dec = t["W_enc"], t["b_enc"], t["b_dec"]
    if arch == "topk":
        k = int(cfg["k"])

        def enc(x: torch.Tensor) -> torch.Tensor:
            pre = (x - b_dec) @ W + b
            v, i = pre.topk(k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, i, v.relu())

        return f"h.{layer}", enc
    if arch == "jumprelu_transcoder":
        thr = t["threshold"]

        def enc(x: torch.Tensor) -> torch.Tensor:
            pre = x @ W + b
            return pre * (pre > thr)

        return f"h.{layer}.ln_2", enc
    raise ValueError(f"{folder}: architecture {arch!r} not handled by the benchmark")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--phase", default="delphi")
    p.add_argument("--case", required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--decomposition", required=True, help="the SAELens directory")
    p.add_argument("--model", required=True, help="the base model directory")
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--delphi-model", choices=["base", "lm"], default="base")
    p.add_argument("--splits", type=int, default=5)
    p.add_argument("--tmp", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import _tokens

    cache_mod = _import_cache()
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModel if args.delphi_model == "base" else AutoModelForCausalLM
    model = cls.from_pretrained(args.model).eval()
    prefix = "" if args.delphi_model == "base" else "transformer."
    encoders = dict(_encoder(d) for d in sorted(Path(args.decomposition).iterdir()) if d.is_dir())
    encoders = {prefix + k: v for k, v in encoders.items()}
    B, S = args.batch_size, args.seq_len
    n_batches = max(1, args.tokens // (B * S))
    tokens = torch.cat(_tokens.make_batches(args.vocab, B, S, n_batches))
    n = n_batches * B * S
    with torch.no_grad():  # warm-up batch, untimed (as in the bare phase)
        model(tokens[:B])
    cache = cache_mod.LatentCache(model, encoders, batch_size=B)
    import logging

    logging.getLogger("delphi").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    cache.run(n, tokens)
    run_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        t1 = time.perf_counter()
        cache.save_splits(n_splits=args.splits, save_dir=Path(tmp))
        save_s = time.perf_counter() - t1
        disk = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    fired = sum(int(v.sum()) for v in cache.hookpoint_firing_counts.values())
    print(
        json.dumps(
            {
                "case": args.case,
                "phase": "delphi",
                "tokens": n,
                "batch": [B, S],
                "threads": args.threads,
                "delphi_model": args.delphi_model,
                "seconds": round(run_s + save_s, 3),
                "run_seconds": round(run_s, 3),
                "save_seconds": round(save_s, 3),
                "total_firings": fired,
                "result_bytes_on_disk": disk,
                "tokens_per_s": round(n / (run_s + save_s), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
