"""Wall time of ``eval fidelity`` on the three shipped demos (issue #13: "well under a minute").

    PYTHONPATH=src:. python benchmarks/eval_bench.py [--n-tokens 8192] [--ids transcoder:demo ...]
        [--convention spd-host] [--threads N] [--profile spd:demo]

Runs the suite in-process exactly as ``spd-host eval fidelity ID ...`` does (same config
defaults), one ID after the other, and prints one line per ID plus the total. ``--threads``
forces torch's CPU thread count (the engine's default is 1 for small models); ``--profile ID``
also prints the top of a cProfile of that ID. Only options that existed before the speed-up
are passed unless asked for, so the same script times an older checkout (PYTHONPATH=<old>/src).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from typing import Any

DEMOS = ["transcoder:demo", "clt:demo", "spd:demo"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids", nargs="*", default=DEMOS)
    ap.add_argument("--n-tokens", type=int, default=None)
    ap.add_argument("--convention", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", default=None)
    args = ap.parse_args()

    import torch

    from spd_host.evals.configs import FidelityConfig
    from spd_host.evals.fidelity import run_fidelity
    from spd_host.evals.runner import common_data_options
    from spd_host.plugins import get_host

    options: dict[str, Any] = {"use_harvest": False}
    if args.n_tokens:
        options["n_tokens"] = args.n_tokens
    if args.convention:
        options["convention"] = args.convention
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        if "cpu_threads" in FidelityConfig.model_fields:
            options["cpu_threads"] = args.threads
    options = {k: v for k, v in common_data_options(args.ids, options).items() if v is not None}
    config = FidelityConfig(**options)
    host = get_host()
    total = 0.0
    print(f"torch threads at start: {torch.get_num_threads()}; config: {options}")
    for did in args.ids:
        adapter = host.load_adapter(did)
        adapter.load_base_model()  # loading weights is not the eval
        prof = cProfile.Profile() if did == args.profile else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        res = run_fidelity(adapter, config)
        if prof:
            prof.disable()
        dt = time.perf_counter() - t0
        total += dt
        print(
            f"{did:18s} {dt:7.2f} s  tokens={res.n_tokens} seq_len={res.seq_len} "
            f"variants={len(res.variants)} scopes={len({r.scope for r in res.loss})}"
        )
        if prof:
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
            print(out.getvalue())
    print(f"{'total':18s} {total:7.2f} s")


if __name__ == "__main__":
    main()
