"""Bare (forward + encode) vs end-to-end harvest on a real shipped decomposition.

    SPD_HOST_HOME=/tmp/somewhere python benchmarks/harvest_real_demo.py transcoder:demo --n-tokens 20000

Prints JSON: bare and harvest seconds and tokens/s over the same batches, overhead, peak RSS and
the result's size on disk. The harvest writes to a fresh temporary directory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    from spd_host.adapter import HarvestOptions
    from spd_host.harvest import HarvestConfig, run_harvest
    from spd_host.harvest.runner import dataset_batches, resolve_config
    from spd_host.plugins import get_host

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("decomposition_id")
    p.add_argument("--n-tokens", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    host = get_host()
    adapter = host.load_adapter(args.decomposition_id)
    config = resolve_config(adapter, HarvestConfig(n_tokens=args.n_tokens))
    fn = host.harvest_fn(adapter, HarvestOptions(threshold=config.threshold, device=config.device))
    batches = list(dataset_batches(adapter, config)(0, 1, 0))
    fn(batches[0])  # warm-up
    t0 = time.perf_counter()
    for t in batches:
        fn(t)
    bare = time.perf_counter() - t0
    n = sum(int(t.numel()) for t in batches)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run_harvest(args.decomposition_id, config, out=Path(tmp) / "run", progress=False)
        total = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in (Path(tmp) / "run").rglob("*") if f.is_file())
    print(
        json.dumps(
            {
                "decomposition": args.decomposition_id,
                "tokens": n,
                "bare_seconds": round(bare, 3),
                "harvest_seconds": round(total, 3),
                "bare_tokens_per_s": round(n / bare),
                "harvest_tokens_per_s": round(n / total),
                "overhead": round(total / bare - 1, 3),
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "result_bytes_on_disk": disk,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
