"""Per-batch time and per-table memory of ``HarvestAccumulator.update`` at 1,000,000 components.

The synthetic-1m plugin (``_harness.synthetic_adapter``, sparse activity + next-token top-k)
draws each batch, then one accumulator is updated batch by batch. Per batch it prints the
update's seconds, the process RSS after it and the highest RSS seen *inside* it (a sampling
thread, every 5 ms: torch allocations are invisible to tracemalloc), and the bytes held by
each part of the state: the input / output token tables (stored pairs and raw buffer), the
co-occurrence table, the per-component arrays and the two example banks (rows written).
``--profile`` adds a cProfile of the updates after ``--warmup`` batches.

    python benchmarks/harvest_scale_trace.py --batches 10 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import threading
import time
from pathlib import Path
from typing import Any

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


class PeakSampler:
    """The highest RSS seen between ``reset`` calls (a daemon thread sampling every 5 ms)."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def reset(self) -> int:
        p, self.peak = self.peak, rss_bytes()
        return p


def table_bytes(t: Any) -> dict[str, int]:
    if hasattr(t, "table"):
        return {"dense": t.table.numel() * t.table.element_size()}
    buf = sum(
        k.numel() * 8 + (0 if v is None else v.numel() * v.element_size())
        for k, v in zip(t._buf_keys, t._buf_values, strict=True)
    )
    return {"pairs": int(t.keys.numel()), "table": t.nbytes() - buf, "buffer": buf}


def state_bytes(acc: Any) -> dict[str, Any]:
    per_comp = sum(
        x.numel() * x.element_size()
        for x in (
            acc.firing_count,
            acc.max_firing,
            acc.hist,
            acc.output_kept_mass,
            acc.cooc_count,
            acc.sum_all.hi,
            acc.sum_all.lo,
            acc.sum_all.fine,
            acc.sum_firing.hi,
            acc.sum_firing.lo,
            acc.sum_firing.fine,
        )
    )
    banks = 0
    for bank in (acc.reservoir, acc.top):
        used = bank.nbytes()  # compact layout: slots of the alive rows, pool and heap in use
        banks += bank.n_rows * used["row"] + used["pool"] + used["heap"]
        banks += bank.row_of.numel() * 8
    return {
        "input": table_bytes(acc.input_pairs),
        "output": table_bytes(acc.output_pairs),
        "cooc": table_bytes(acc.cooc),
        "per_component": per_comp,
        "banks_written": banks,
        "alive": int((acc.firing_count > 0).sum()),
    }


def main() -> None:
    from _harness import synthetic_adapter

    from spd_host.harvest import HarvestConfig
    from spd_host.harvest.accumulator import HarvestAccumulator, Layout

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--lines", type=int, default=30)
    p.add_argument("--config", default="{}", help="extra HarvestConfig fields as JSON")
    p.add_argument(
        "--save-state", default=None, help="torch.save acc.state() here (banks as checksums)"
    )
    p.add_argument("--buffer-limit", type=int, default=None, help="sparse tables' buffer_limit")
    a = p.parse_args()
    torch.set_num_threads(1)
    ad = synthetic_adapter()
    cfg = HarvestConfig(batch_size=16, seq_len=128, **json.loads(a.config))
    ad.fn_state["top_k"] = cfg.output_top_k  # type: ignore[attr-defined]
    acc = HarvestAccumulator(Layout.of(ad.sites, ad.activation_types), cfg, 50_000)
    if a.buffer_limit:
        for t in (acc.input_pairs, acc.output_pairs, acc.cooc):
            t.buffer_limit = a.buffer_limit
    sampler = PeakSampler()
    prof = cProfile.Profile() if a.profile else None
    gen = torch.Generator().manual_seed(0)
    upd_total = 0.0
    for i in range(a.batches):
        tokens = torch.randint(0, 50_000, (16, 128), generator=gen)
        t0 = time.perf_counter()
        batch = ad.fn(tokens)
        fn_s = time.perf_counter() - t0
        sampler.reset()
        if prof is not None and i == a.warmup:
            prof.enable()
        t0 = time.perf_counter()
        acc.update(batch, i)
        upd = time.perf_counter() - t0
        if i >= a.warmup:
            upd_total += upd
        peak = sampler.reset()
        del batch
        row = {
            "batch": i,
            "fn_s": round(fn_s, 3),
            "update_s": round(upd, 3),
            "rss_gib": round(rss_bytes() / 2**30, 3),
            "peak_in_update_gib": round(peak / 2**30, 3),
            **state_bytes(acc),
        }
        print(json.dumps(row), flush=True)
    if prof is not None:
        prof.disable()
    n = max(1, a.batches - a.warmup)
    print(json.dumps({"update_s_per_batch_after_warmup": round(upd_total / n, 3)}))
    t0 = time.perf_counter()
    tensors, _ = acc.state()
    print(
        json.dumps({"state_s": round(time.perf_counter() - t0, 3), "rss_gib": rss_bytes() / 2**30})
    )
    if a.save_state:  # the banks (GBs) as a checksum per array
        small = {k: v for k, v in tensors.items() if not k.startswith(("reservoir.", "top."))}
        for k, v in tensors.items():
            if k.startswith(("reservoir.", "top.")):
                small[k + ".sum"] = v.reshape(-1).view(torch.uint8).to(torch.int64).sum()
        torch.save(small, a.save_state)
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.lines)


if __name__ == "__main__":
    main()
