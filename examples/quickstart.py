"""Quickstart: harvest a decomposition and read its strongest components through the library API.

    python examples/quickstart.py                      # transcoder:demo, 4096 tokens
    python examples/quickstart.py spd:demo             # any decomposition ID
    python examples/quickstart.py clt:demo --n-tokens 2048 --top 3

Results are stored under ``$SPD_HOST_HOME`` (default ``~/.spd-host``); running it again with the
same settings reuses the finished harvest instead of recomputing it.
Only names from ``spd_host.__all__`` are used.
"""

from __future__ import annotations

import argparse

import spd_host


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decomposition", nargs="?", default="transcoder:demo")
    parser.add_argument("--n-tokens", type=int, default=4096, help="tokens to harvest")
    parser.add_argument("--top", type=int, default=3, help="components to show")
    parser.add_argument("--by", choices=["density", "max"], default="max")
    args = parser.parse_args(argv)

    # 1. Load the decomposition: the ID names the method and where its weights are.
    adapter = spd_host.load_adapter(args.decomposition)
    print(f"decomposition {adapter.decomposition_id}: {len(adapter.sites)} sites")
    for site in adapter.sites:
        print(f"  {site.name}: {site.n_components} components")

    # 2. Harvest: one pass over the tokens collects, per component, firing statistics, the
    #    strongest and a random sample of activating examples, token and co-occurrence counts.
    config = spd_host.HarvestConfig(
        n_tokens=args.n_tokens, batch_size=8, examples_per_component=5, cooccurrence_fraction=1.0
    )
    repo = spd_host.run_harvest(args.decomposition, config, progress=False)
    assert repo is not None  # a single-process harvest always finishes with a repo
    print(f"harvested {repo.n_tokens} tokens into {repo.path}")

    # 3. Rank components: by firing density, or by their largest activation (the first
    #    activation type the method reports, e.g. a transcoder's feature activation).
    def strength(s: spd_host.ComponentSummary) -> float:
        if args.by == "density":
            return s.density
        return max((v for v in s.max_firing.values() if v is not None), default=0.0)

    alive = [s for s in repo.summary() if s.firing_count > 0]
    print(f"{len(alive)} components fired at least once")
    strongest = sorted(alive, key=strength, reverse=True)[: args.top]

    # 4. Read each one: examples (firing tokens [[marked]], the example's centre <<marked>>),
    #    the tokens it reads and predicts, and the components that fire with it.
    for s in strongest:
        detail = repo.component(s.key)
        print(f"\n== {s.key}  density={s.density:.4f}  max={strength(s):.3f}  ({args.by})")
        for example in detail.top_examples[:3]:
            print(f"  {example.score:8.3f}  {repo.render_example(example)!r}")
        for kind in ("input", "output"):
            stats = repo.token_stats(s.key, kind, top=5)
            tokens = repo.token_scores_as_text(stats.top_pmi)
            print(f"  top {kind} tokens (PMI): " + ", ".join(f"{t!r} {v:.2f}" for t, v in tokens))
        partners = repo.correlated(s.key, metric="jaccard", top=3)
        print("  fires with: " + (", ".join(f"{k} ({v:.2f})" for k, v in partners) or "-"))


if __name__ == "__main__":
    main()
