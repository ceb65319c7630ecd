"""Harvest overhead over the bare forward + encode: ``harvest / (forward + encode)``.

Cases (``--case``):

- ``demo``: the shipped ``transcoder:demo`` (4 x 128 GPT-2, vocab 2,048, 4 x 512 circuit-tracer
  transcoders), batches of 16 x 128.
- ``gpt2-small``: a GPT-2-small-sized model (12 x 768, vocab 50,257, random init from
  ``GPT2Config``, saved as a Hugging Face directory) with a 32,768-latent TopK SAE (k = 32) on
  ``blocks.6.hook_resid_post`` and a 32,768-latent JumpReLU transcoder at layer 8, both in
  SAELens layout and read by the transcoder plugin (``_fixtures.py``); batches of 8 x 256.

Tokens are the same pre-tokenised batches in both phases (Zipf-distributed ids, ``_tokens.py``).
For each ``--tokens`` count and each of ``--repeats`` repeats, ``bare`` then ``harvest`` run
back to back, each in its own process (peak RSS per phase via ``os.wait4``); the ratio is taken
per repeat and reported as median [min-max] over repeats, with the cost per token at each
count (flat = no term that grows with tokens seen). See ``_harness.py`` for what each phase
times. Prints markdown tables and writes ``harvest_overhead-<case>.json`` next to this file.

    python benchmarks/harvest_overhead.py --case demo --tokens 200000,2000000 --repeats 3
    python benchmarks/harvest_overhead.py --case gpt2-small --tokens 16384,65536 --repeats 3

Cost estimate on one shared core: gpt2-small forward + encode runs at ~150 tokens/s, so
200k tokens take ~20 min per phase; ``demo`` at ~9,000 tokens/s.
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
        __doc__, cases=["demo", "gpt2-small", "tiny"], tokens="200000,2000000", repeats=3
    )
    p.add_argument(
        "--profile", action="store_true", help="one extra profiled harvest at the smallest count"
    )
    p.add_argument(
        "--harvest-config",
        default=None,
        help="extra HarvestConfig fields for the harvest phase, as JSON (e.g. '{\"pipeline\": false}')",
    )
    args = p.parse_args()
    counts = [int(x) for x in args.tokens.split(",")]
    phases = ["bare", "harvest"]
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
        profile = profiled_harvest("harvest_overhead", args.case, counts[0], args.threads)
    print_table(
        f"{args.case}: harvest / (forward + encode), median [min-max] of {args.repeats}",
        [
            "tokens",
            "bare tok/s",
            "harvest tok/s",
            "overhead",
            "overhead excl. model load",
            "bare µs/tok",
            "harvest µs/tok",
            "bare peak RSS MiB",
            "harvest peak RSS MiB",
        ],
        [
            [
                r["tokens"],
                fmt(r["bare"]["tokens_per_s"], 0),
                fmt(r["harvest"]["tokens_per_s"], 0),
                fmt(r["overhead"]),
                fmt(r["overhead_excl_load"]),
                fmt(r["bare"]["us_per_token"], 0),
                fmt(r["harvest"]["us_per_token"], 0),
                fmt(r["bare"]["peak_rss_mib"], 0),
                fmt(r["harvest"]["peak_rss_mib"], 0),
            ]
            for r in rows
        ],
    )
    write_json(
        args.json or HERE / f"harvest_overhead-{args.case}.json",
        {
            "case": args.case,
            "machine": info,
            "summary": rows,
            "runs": runs,
            "profile_file": profile,
        },
    )


if __name__ == "__main__":
    main()
