"""Compare decomposition methods: fidelity and label quality, on the same tokens, in one table.

    python examples/compare_methods.py                         # transcoder:demo clt:demo spd:demo
    python examples/compare_methods.py transcoder:demo spd:demo --harvest-tokens 16384

For each decomposition: harvest (small), label the components with autointerp, then run the eval
suites: ``fidelity`` (splice the decomposition into its base model on held-out tokens: how much
of the loss does it recover, how much variance does it explain, how sparse is it) and
``detection`` / ``fuzzing`` (can a judge tell, from a component's label, which texts make it
fire / which tokens it fires on). Without an LLM key everything runs offline: labels come from the
deterministic baseline provider and the judge is the baseline judge, so the label-quality columns
then measure the token statistics behind those baselines, not an LLM's labels (the table says so).
Set e.g. ``OPENAI_API_KEY`` and pass ``--provider openai`` for real labels and judging.

Every result is also stored under ``$SPD_HOST_HOME`` (``spd-host eval ...`` reads the same files).
"""

from __future__ import annotations

import argparse
from typing import Any

import spd_host

DEMOS = ["transcoder:demo", "clt:demo", "spd:demo"]
FIDELITY_COLUMNS = ["CE score", "KL score", "EV", "L0", "alive", "labels"]


def compare(decomposition_id: str, args: argparse.Namespace) -> dict[str, Any]:
    """Harvest, label and evaluate one decomposition; return its row of the comparison table."""
    # Harvest: firing statistics and activating examples (what autointerp and the judges read).
    harvest = spd_host.HarvestConfig(
        n_tokens=args.harvest_tokens, batch_size=8, examples_per_component=10
    )
    spd_host.run_harvest(decomposition_id, harvest, progress=False)

    # Autointerp: one label per component that fired often enough to be described.
    report = spd_host.run_autointerp(
        decomposition_id,
        spd_host.AutointerpConfig(
            provider=args.provider, min_firing_count=args.min_firings, limit=args.label_limit
        ),
        progress=False,
    )

    # Fidelity, for the method's first (default) splice variant only, to keep it quick
    # (adapters that can be spliced implement spd_host.SupportsSplice and list their variants).
    adapter = spd_host.load_adapter(decomposition_id)
    variants = adapter.splice_variants if isinstance(adapter, spd_host.SupportsSplice) else ()
    fidelity = spd_host.run_suite(
        "fidelity",
        decomposition_id,
        n_tokens=args.eval_tokens,
        batch_size=8,
        per_site=False,
        variants=tuple(variants[:1]) or None,
    )
    row: dict[str, Any] = {"decomposition": decomposition_id, **fidelity.table_rows()[0]}
    row["labels"] = report.n_already_labelled + report.n_labelled

    # Label quality: the same seeded sample of components for every method.
    notes = set(fidelity.notes)
    for suite in args.judge_suites:
        result = spd_host.run_suite(
            suite,
            decomposition_id,
            provider=args.provider,
            n_components=args.judge_components,
            n_trials=args.judge_trials,
        )
        judged = result.table_rows()[0]
        row[suite] = judged["score"]
        row["judge"] = judged["judge"]
        notes.update(result.notes)
    row["notes"] = sorted(notes)
    return row


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def print_table(rows: list[dict[str, Any]], judge_suites: list[str]) -> None:
    header = ["decomposition", "variant", *FIDELITY_COLUMNS, *judge_suites]
    cells = [[fmt(r.get(c)) for c in header] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    judges = sorted({r["judge"] for r in rows if "judge" in r})
    if judges:
        print(f"\njudge: {', '.join(judges)} (chance = 0.5 for detection and fuzzing)")
    for note in sorted({n for r in rows for n in r["notes"]}):
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decompositions", nargs="*", default=DEMOS)
    parser.add_argument("--harvest-tokens", type=int, default=8192)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out fidelity tokens")
    parser.add_argument("--provider", default="offline", help="autointerp provider and judge")
    parser.add_argument("--min-firings", type=int, default=5, help="label only these components")
    parser.add_argument("--label-limit", type=int, default=None, help="label at most N components")
    parser.add_argument("--judge-components", type=int, default=20)
    parser.add_argument("--judge-trials", type=int, default=3)
    parser.add_argument(
        "--judge-suites",
        nargs="*",
        choices=["detection", "fuzzing"],
        default=["detection", "fuzzing"],
        help="label-quality suites to run (none: fidelity only)",
    )
    args = parser.parse_args(argv)

    rows = []
    for decomposition_id in args.decompositions:
        print(f"evaluating {decomposition_id} ...", flush=True)
        rows.append(compare(decomposition_id, args))
    print()
    print_table(rows, args.judge_suites)


if __name__ == "__main__":
    main()
