"""spd-host harvest vs delphi's ``LatentCache`` on the same model, dictionaries and tokens.

delphi (EleutherAI, ``eai-delphi``) caches every non-zero latent activation of a run
(``LatentCache.run``: forward with hooks, encode, ``nonzero`` per batch, kept in memory, then
``save_splits`` to safetensors); everything else (examples, statistics) is computed later from
that cache. spd-host's harvest computes, in the same pass, far more: firing counts, exact
fixed-point means, max, histograms, input- and next-token tables, co-occurrence, top-K and
reservoir examples with context windows — and its memory is meant to stay flat in tokens,
where delphi's cache grows with every firing. The comparison is throughput and peak RSS.

Set-up of delphi's venv (never a project dependency; see ``requirements-delphi.txt``)::

    python3 -m venv /work/wt/_bench_venv            # no --system-site-packages
    /work/wt/_bench_venv/bin/pip install torch==2.13.0   # the CPU wheel, first
    /work/wt/_bench_venv/bin/pip install --no-deps eai-delphi==0.1.3
    /work/wt/_bench_venv/bin/pip install -r benchmarks/requirements-delphi.txt

(``SPD_HOST_DELPHI_PYTHON`` points at another interpreter.) Only ``delphi.latents.cache`` is
imported (``_delphi_child.py`` explains how), so faiss, vllm, sentence-transformers and the
rest of delphi's declared dependencies are not needed.

Phases per repeat, back to back, each in its own process: ``bare`` (forward + encode),
``harvest`` (spd-host, end to end), ``delphi`` (``LatentCache.run`` + ``save_splits``).
By default delphi gets ``AutoModel`` (GPT2Model, no LM head), as its own pipeline loads it;
``--delphi-model lm`` gives it the LM-head model spd-host needs for next-token statistics.
Writes ``harvest_delphi-<case>.json`` next to this file.

    python benchmarks/harvest_delphi.py --case gpt2-small --tokens 16384 --repeats 3
"""

from __future__ import annotations

from pathlib import Path

from _harness import fmt, machine, print_table, summarise, sweep, sweep_parser, write_json

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = sweep_parser(__doc__, cases=["gpt2-small", "gpt2-6x768", "tiny"], tokens="16384", repeats=3)
    p.add_argument("--no-bare", action="store_true", help="skip the forward + encode phase")
    p.add_argument("--delphi-model", choices=["base", "lm"], default="base")
    args = p.parse_args()
    import _fixtures

    case = _fixtures.build_case(args.case)
    assert case.decomposition_root is not None and case.model_dir is not None
    delphi_args = [
        "--decomposition",
        str(case.decomposition_root),
        "--model",
        str(case.model_dir),
        "--vocab",
        str(case.vocab),
        "--batch-size",
        str(case.batch_size),
        "--seq-len",
        str(case.seq_len),
        "--delphi-model",
        args.delphi_model,
    ]
    phases = (["bare"] if not args.no_bare else []) + ["harvest", "delphi"]
    counts = [int(x) for x in args.tokens.split(",")]
    info = machine()
    runs = sweep(
        args.case,
        counts,
        args.repeats,
        phases,
        threads=args.threads,
        extra={"delphi": delphi_args},
        rss_limit_gib=args.rss_limit_gib,
    )
    rows = summarise(runs, phases)
    for r in rows:  # the two tools must have seen the same firings
        fired = {
            ph: {
                x["total_firings"] for x in runs if x["tokens"] == r["tokens"] and x["phase"] == ph
            }
            for ph in phases
        }
        r["total_firings"] = {ph: sorted(v) for ph, v in fired.items()}
    print_table(
        f"{args.case}: spd-host harvest vs delphi LatentCache ({args.delphi_model} model), "
        f"median [min-max] of {args.repeats}",
        [
            "tokens",
            "spd-host tok/s",
            "delphi tok/s",
            "spd-host / delphi time",
            "spd-host peak RSS MiB",
            "delphi peak RSS MiB",
            "spd-host / delphi RSS",
            "firings (spd-host, delphi)",
        ],
        [
            [
                r["tokens"],
                fmt(r["harvest"]["tokens_per_s"], 0),
                fmt(r["delphi"]["tokens_per_s"], 0),
                fmt(r["harvest_over_delphi_seconds"]),
                fmt(r["harvest"]["peak_rss_mib"], 0),
                fmt(r["delphi"]["peak_rss_mib"], 0),
                fmt(r["harvest_over_delphi_rss"]),
                f"{r['total_firings']['harvest']}, {r['total_firings']['delphi']}",
            ]
            for r in rows
        ],
    )
    if "bare" in phases:
        print_table(
            "same runs: harvest / (forward + encode)",
            ["tokens", "bare tok/s", "overhead"],
            [[r["tokens"], fmt(r["bare"]["tokens_per_s"], 0), fmt(r["overhead"])] for r in rows],
        )
    write_json(
        args.json or HERE / f"harvest_delphi-{args.case}.json",
        {
            "case": args.case,
            "delphi_model": args.delphi_model,
            "machine": info,
            "summary": rows,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
