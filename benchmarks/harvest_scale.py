"""Harvest at scale: throughput, peak RSS, and whether memory stays flat as tokens grow.

Cases (``--case``):

- ``synthetic-1m``: 1,000,000 components (8 sites x 125,000) over a 50,000-token vocabulary,
  32 distinct firings per site per token drawn from a Zipf-like popularity, through a toy
  plugin without a model (``_harness.synthetic_adapter``). It hands activity to the host in
  the sparse form when the host's contract has one (``SparseActivity``; batches of 16 x 128)
  and densely otherwise (batches of 2 x 128, the dense tensors being 0.5 GB per sequence),
  and next-token top-k when the host asks for it. Targets: >= 740 tokens/s, peak RSS <= 8 GiB.
- ``gpt2-6x768``: a 6 x 768 GPT-2 (vocab 50,257) with two 32,768-latent TopK SAEs (layers 2
  and 4, SAELens layout). Target: peak RSS <= 4 GB, flat from 100k to 1M tokens.

Each ``--tokens`` count runs ``--repeats`` times (phases ``bare`` then ``harvest``, each in its
own process; ``--no-bare`` skips the bare phase). Flat memory means the harvest's peak RSS
at the larger count is the same as at the smaller one; the table shows both and the
per-token growth between them. Writes ``harvest_scale-<case>.json`` next to this file.

    python benchmarks/harvest_scale.py --case synthetic-1m --tokens 102400,204800 --repeats 1
    python benchmarks/harvest_scale.py --case gpt2-6x768 --tokens 100000,1000000 --no-bare
"""

from __future__ import annotations

from pathlib import Path

from _harness import (
    fmt,
    machine,
    print_table,
    profiled_harvest,
    summarise,
    sweep,
    sweep_parser,
    write_json,
)

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = sweep_parser(
        __doc__, cases=["synthetic-1m", "gpt2-6x768", "tiny"], tokens="102400,204800", repeats=1
    )
    p.add_argument("--no-bare", action="store_true")
    p.add_argument(
        "--harvest-config",
        default=None,
        help="extra HarvestConfig fields for the harvest phase, as JSON "
        "(e.g. '{\"background_merge\": false}')",
    )
    p.add_argument(
        "--profile", action="store_true", help="one extra profiled harvest at the smallest count"
    )
    args = p.parse_args()
    counts = [int(x) for x in args.tokens.split(",")]
    phases = (["bare"] if not args.no_bare else []) + ["harvest"]
    info = machine()
    runs = sweep(
        args.case,
        counts,
        args.repeats,
        phases,
        threads=args.threads,
        extra={"harvest": ["--config", args.harvest_config]} if args.harvest_config else None,
        rss_limit_gib=args.rss_limit_gib,
    )
    rows = summarise(runs, phases)
    profile = None
    if args.profile:
        profile = profiled_harvest("harvest_scale", args.case, counts[0], args.threads)
    table = []
    for r in rows:
        h = r["harvest"]
        alive = sorted(
            {
                x["alive_components"]
                for x in runs
                if x["tokens"] == r["tokens"] and x["phase"] == "harvest"
            }
        )
        disk = sorted(
            {
                x["result_bytes_on_disk"]
                for x in runs
                if x["tokens"] == r["tokens"] and x["phase"] == "harvest"
            }
        )
        table.append(
            [
                r["tokens"],
                fmt(h["tokens_per_s"], 0),
                fmt(h["peak_rss_mib"], 0),
                fmt(r["overhead"]) if "overhead" in r else "-",
                fmt(r["bare"]["tokens_per_s"], 0) if "bare" in r else "-",
                ", ".join(map(str, alive)),
                ", ".join(f"{d / 2**20:.0f}" for d in disk),
            ]
        )
    print_table(
        f"{args.case}: median [min-max] of {args.repeats}",
        [
            "tokens",
            "harvest tok/s",
            "harvest peak RSS MiB",
            "harvest / bare",
            "bare tok/s",
            "alive components",
            "result MiB on disk",
        ],
        table,
    )
    growth = None
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        d_rss = b["harvest"]["peak_rss_mib"]["median"] - a["harvest"]["peak_rss_mib"]["median"]
        growth = {
            "from_tokens": a["tokens"],
            "to_tokens": b["tokens"],
            "rss_growth_mib": round(d_rss, 1),
            "rss_growth_bytes_per_token": round(d_rss * 2**20 / (b["tokens"] - a["tokens"]), 1),
        }
        print(
            f"\npeak RSS growth {a['tokens']} -> {b['tokens']} tokens: {d_rss:+.0f} MiB "
            f"({growth['rss_growth_bytes_per_token']:+.1f} bytes per token)"
        )
    write_json(
        args.json or HERE / f"harvest_scale-{args.case}.json",
        {
            "case": args.case,
            "machine": info,
            "summary": rows,
            "rss_growth": growth,
            "runs": runs,
            "profile_file": profile,
        },
    )


if __name__ == "__main__":
    main()
