"""Harvest throughput, peak memory and overhead over the bare (forward + encode) cost.

Scenarios (each runs in its own process so peak RSS is its own):

- ``demo``: a GPT-2 of the demo's size (4 layers, d_model 128, random weights built from a
  transformers config; the trained demo is not needed to time it) with a ReLU transcoder of
  ``--demo-components`` features per layer, biased so that a few dozen fire per token.
- ``synthetic``: a 1,000,000-component decomposition (8 sites x 125,000) over a 50,000-token
  vocabulary, with Zipf-distributed component popularity and ``--l0`` firings per site per token.

For each: bare time (HarvestFn only, same batches), harvest time (``run_harvest`` end to end:
validation, accumulation, checkpoints, final write), overhead = harvest / bare - 1, peak RSS,
and a cProfile of a second ``run_harvest`` end to end (``--profile``).

    python benchmarks/harvest_bench.py                  # both scenarios
    python benchmarks/harvest_bench.py --scenario demo --n-batches 40 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from spd_host.adapter import (  # noqa: E402
    DecompositionDefaults,
    HarvestBatch,
    HarvestOptions,
    MethodInfo,
    Site,
)
from spd_host.hookspecs import hookimpl  # noqa: E402

METHOD = MethodInfo(name="bench", description="benchmark decomposition")


@dataclass
class BenchAdapter:
    sites: list[Site]
    activation_types: tuple[str, ...]
    fn: Callable[[torch.Tensor], HarvestBatch]
    decomposition_id: str = "bench:demo"
    method: MethodInfo = METHOD
    base_model_name: str = "bench"
    defaults: DecompositionDefaults = field(default_factory=DecompositionDefaults)

    def load_base_model(self) -> Any:
        return None

    def load_tokenizer(self) -> Any:
        return None


class BenchPlugin:
    def __init__(self, adapter: BenchAdapter) -> None:
        self.adapter = adapter

    @hookimpl
    def register_methods(self, register: Callable[[MethodInfo], None]) -> None:
        register(METHOD)

    @hookimpl
    def load_decomposition(self, decomposition_id: Any) -> Any:
        return self.adapter

    @hookimpl
    def harvest_fn(self, adapter: Any, options: HarvestOptions) -> Any:
        return self.adapter.fn


# -- scenarios --------------------------------------------------------------------------------
def demo_scenario(args: argparse.Namespace) -> tuple[BenchAdapter, int, int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    V, L, d, C = args.demo_vocab, 4, 128, args.demo_components
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=V, n_positions=256, n_embd=d, n_layer=L, n_head=4)
    ).eval()
    enc = [torch.randn(d, C) / d**0.5 for _ in range(L)]
    bias = [torch.full((C,), -2.2) for _ in range(L)]  # ~1-2% of features fire
    captured: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.transformer.h):
        block.mlp.register_forward_hook(lambda m, inp, out, i=i: captured.__setitem__(i, inp[0]))

    @torch.no_grad()
    def fn(tokens: torch.Tensor) -> HarvestBatch:
        # random weights give near-uniform next-token distributions; sharpen them to the
        # entropy range of a trained model so the output-token table is realistic
        logits = model(tokens).logits * 8
        firings, acts = {}, {}
        for i in range(L):
            x = captured[i]
            a = torch.relu(x @ enc[i] + bias[i])
            firings[f"{i}.mlp"] = a > 0
            acts[f"{i}.mlp"] = {"act": a}
        return HarvestBatch(
            tokens=tokens, firings=firings, activations=acts, next_token_logits=logits
        )

    sites = [
        Site(name=f"{i}.mlp", n_components=C, reads_from=f"{i}.mlp_in", writes_to=(f"{i}.mlp_out",))
        for i in range(L)
    ]
    return BenchAdapter(sites, ("act",), fn), V, 128


def synthetic_scenario(args: argparse.Namespace) -> tuple[BenchAdapter, int, int]:
    n_sites, C, V, S, l0 = 8, 125_000, 50_000, 128, args.l0
    popularity = 1.0 / torch.arange(1, C + 1, dtype=torch.float64) ** 0.8  # Zipf-like
    perms = [torch.randperm(C, generator=torch.Generator().manual_seed(s)) for s in range(n_sites)]
    U = torch.randn(64, V, generator=torch.Generator().manual_seed(99)) * 1.5  # peaked

    @torch.no_grad()
    def fn(tokens: torch.Tensor) -> HarvestBatch:
        B, S_ = tokens.shape
        N = B * S_
        g = torch.Generator().manual_seed(int(tokens[0, 0]) * 7919 + int(tokens[0, 1]))
        firings, acts = {}, {}
        for s in range(n_sites):
            idx = torch.multinomial(popularity, N * l0, replacement=True, generator=g).view(N, l0)
            idx = perms[s][idx]
            a = torch.zeros(N, C)
            a.scatter_(1, idx, torch.rand(N, l0, generator=g) * 3 + 0.01)
            a = a.view(B, S_, C)
            firings[f"{s}.mlp"] = a > 0
            acts[f"{s}.mlp"] = {"act": a}
        h = torch.randn(N, 64, generator=g)
        return HarvestBatch(
            tokens=tokens,
            firings=firings,
            activations=acts,
            next_token_logits=(h @ U).view(B, S_, V),
        )

    sites = [
        Site(name=f"{s}.mlp", n_components=C, reads_from=f"{s}.mlp_in", writes_to=(f"{s}.mlp_out",))
        for s in range(n_sites)
    ]
    return BenchAdapter(sites, ("act",), fn), V, S


def token_source(V: int, S: int, B: int) -> Callable[[int, int, int], Iterator[torch.Tensor]]:
    def source(rank: int, world: int, start: int) -> Iterator[torch.Tensor]:
        i = start
        while True:
            g = rank + i * world
            yield torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(g))
            i += 1

    return source


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    from spd_host.harvest import HarvestConfig, run_harvest
    from spd_host.plugins import temporary_plugins

    torch.set_num_threads(args.threads)
    adapter, V, S = demo_scenario(args) if args.scenario == "demo" else synthetic_scenario(args)
    B = args.batch_size
    source = token_source(V, S, B)
    batches = [t for _, t in zip(range(args.n_batches), source(0, 1, 0), strict=False)]
    # warm-up, then the bare cost: HarvestFn alone on the same batches
    adapter.fn(batches[0])
    t0 = time.perf_counter()
    for t in batches:
        adapter.fn(t)
    bare = time.perf_counter() - t0
    rss_bare = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_tokens = args.n_batches * B * S
    config = HarvestConfig(
        n_tokens=n_tokens,
        batch_size=B,
        seq_len=S,
        examples_per_component=args.k,
        context_tokens=args.context,
        checkpoint_every=args.checkpoint_every,
        cooccurrence=not args.no_cooc,
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        temporary_plugins(("bench", BenchPlugin(adapter)), entry_points=False),
    ):
        t0 = time.perf_counter()
        repo = run_harvest(
            "bench:demo", config, out=Path(tmp) / "run", batches=source, progress=False
        )
        total = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        assert repo is not None
        alive = int((repo._tensor("firing_count") > 0).sum())
        disk = sum(p.stat().st_size for p in (Path(tmp) / "run").rglob("*") if p.is_file())
        profile = ""
        if args.profile:
            # a second, profiled run end to end (accumulation, checkpoints, final write)
            pr = cProfile.Profile()
            pr.enable()
            run_harvest(
                "bench:demo", config, out=Path(tmp) / "prof", batches=source, progress=False
            )
            pr.disable()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(args.profile_lines)
            profile = buf.getvalue()
    return {
        "scenario": args.scenario,
        "components": sum(s.n_components for s in adapter.sites),
        "vocab": V,
        "tokens": n_tokens,
        "batch": [B, S],
        "alive_components": alive,
        "bare_seconds": round(bare, 3),
        "harvest_seconds": round(total, 3),
        "bare_tokens_per_s": round(n_tokens / bare),
        "harvest_tokens_per_s": round(n_tokens / total),
        "overhead": round(total / bare - 1, 3),
        "peak_rss_mib_bare": round(rss_bare),
        "peak_rss_mib": round(peak),
        "result_bytes_on_disk": disk,
        "threads": args.threads,
        "profile": profile,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scenario", choices=["demo", "synthetic", "all"], default="all")
    p.add_argument("--n-batches", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--context", type=int, default=8)
    p.add_argument("--l0", type=int, default=32, help="synthetic: firings per site per token")
    p.add_argument("--demo-components", type=int, default=4096)
    p.add_argument("--demo-vocab", type=int, default=8192)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--no-cooc", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-lines", type=int, default=20)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args)))
        return
    scenarios = ["demo", "synthetic"] if args.scenario == "all" else [args.scenario]
    for sc in scenarios:
        defaults = {"demo": (30, 16), "synthetic": (12, 2)}[sc]
        cmd = [sys.executable, __file__, "--child", "--scenario", sc]
        cmd += [
            "--n-batches",
            str(args.n_batches or defaults[0]),
            "--batch-size",
            str(args.batch_size or defaults[1]),
        ]
        for flag in (
            "threads",
            "k",
            "context",
            "l0",
            "demo_components",
            "demo_vocab",
            "checkpoint_every",
            "profile_lines",
        ):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        cmd += ["--no-cooc"] * args.no_cooc + ["--profile"] * args.profile
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        prof = res.pop("profile")
        print(json.dumps(res, indent=1))
        if prof:
            print(prof)


if __name__ == "__main__":
    main()
