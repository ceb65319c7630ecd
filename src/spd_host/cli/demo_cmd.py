"""``spd-host demo``: the whole pipeline on the bundled demo, offline, in a few minutes.

It is the README's first command: harvest ``transcoder:demo``, label its components with the
offline baseline explainer (never a paid API, even when a key is set), and compare the fidelity
of all three demo decompositions. Each step resumes: re-running it skips finished work.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.rule import Rule

from spd_host.cli.common import console, handles_errors

DEMO_IDS = ("transcoder:demo", "clt:demo", "spd:demo")


@handles_errors
def demo(
    decomposition_id: Annotated[
        str, typer.Option("--id", help="Which demo decomposition to harvest and label.")
    ] = "transcoder:demo",
    n_tokens: Annotated[int, typer.Option(help="Tokens to harvest.")] = 20_000,
    eval_tokens: Annotated[
        int, typer.Option(help="Held-out tokens for the fidelity eval.")
    ] = 4_096,
) -> None:
    """Run harvest -> autointerp (offline baseline) -> fidelity eval on the bundled demo."""
    from spd_host.autointerp import AutointerpConfig, run_autointerp
    from spd_host.cli.harvest_cmd import print_summary
    from spd_host.evals import run_suite
    from spd_host.evals.runner import common_data_options
    from spd_host.evals.tables import comparison_table, print_table
    from spd_host.harvest import HarvestConfig, run_harvest, summarize

    console.print(Rule(f"1/3 harvest {decomposition_id}"))
    repo = run_harvest(decomposition_id, HarvestConfig(n_tokens=n_tokens))
    assert repo is not None  # single process: the repo is always returned
    print_summary(summarize(repo))

    console.print(Rule(f"2/3 autointerp {decomposition_id} (offline PMI baseline)"))
    run_autointerp(decomposition_id, AutointerpConfig(provider="offline"), console=console)

    console.print(Rule("3/3 fidelity of the three demo decompositions"))
    ids = list(DEMO_IDS)
    options = common_data_options(ids, {"n_tokens": eval_tokens})
    results = [run_suite("fidelity", did, **options) for did in ids]
    print_table(console, comparison_table(results))

    strongest = max(repo.summary(), key=lambda c: c.firing_count)
    console.print(
        "\nnext: "
        f"[bold]spd-host show {decomposition_id} {strongest.key}[/] (a label with its evidence), "
        "[bold]spd-host eval list[/], [bold]spd-host --help[/]"
    )
