"""Where the harvest engine's time goes: cProfile of ``HarvestAccumulator.update`` alone.

Runs the decomposition's HarvestFn (as ``run_harvest`` calls it: sparse sites and next-token
top-k allowed) over ``--batches`` random batches first, so the profile covers only the
accumulation, then updates an accumulator with the first ``--warmup`` batches unprofiled (the
example banks fill up early; steady state is what a long harvest pays) and profiles the rest.

    SPD_HOST_HOME=/tmp/x python benchmarks/harvest_profile.py transcoder:demo --batches 20
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    from spd_host.adapter import HarvestOptions
    from spd_host.harvest import HarvestConfig
    from spd_host.harvest.accumulator import HarvestAccumulator, Layout
    from spd_host.plugins import get_host

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("decomposition_id")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--config", default="{}", help="extra HarvestConfig fields as JSON")
    p.add_argument("--lines", type=int, default=25)
    a = p.parse_args()
    torch.set_num_threads(1)
    host = get_host()
    adapter = host.load_adapter(a.decomposition_id)
    cfg = HarvestConfig(
        batch_size=a.batch_size, seq_len=a.seq_len, device=a.device, **json.loads(a.config)
    )
    opts = HarvestOptions(
        threshold=cfg.threshold, device=a.device, sparse=True, next_token_top_k=cfg.output_top_k
    )
    fn = host.harvest_fn(adapter, opts)
    V = len(adapter.load_tokenizer())
    gen = torch.Generator().manual_seed(0)
    tokens = [
        torch.randint(0, V, (a.batch_size, a.seq_len), generator=gen) for _ in range(a.batches)
    ]
    t0 = time.perf_counter()
    batches = [fn(t) for t in tokens]
    fn_s = (time.perf_counter() - t0) / a.batches
    acc = HarvestAccumulator(Layout.of(adapter.sites, adapter.activation_types), cfg, V)
    for g, b in enumerate(batches[: a.warmup]):
        acc.update(b, g)
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    for g, b in enumerate(batches[a.warmup :], start=a.warmup):
        acc.update(b, g)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    upd_s = (time.perf_counter() - t0) / max(1, a.batches - a.warmup)
    prof.disable()
    print(
        json.dumps(
            {"harvest_fn_s_per_batch": round(fn_s, 4), "update_s_per_batch": round(upd_s, 4)}
        )
    )
    pstats.Stats(prof).sort_stats("tottime").print_stats(a.lines)


if __name__ == "__main__":
    main()
