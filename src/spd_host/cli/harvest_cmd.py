"""``spd-host harvest <id> ...`` and ``spd-host harvest merge ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from spd_host.cli.common import (
    BaseModelOpt,
    PrependBosOpt,
    console,
    err_console,
    handles_errors,
    print_json,
    use_base_model,
)


class _DefaultRunGroup(TyperGroup):
    """``harvest <id>`` runs a harvest; ``harvest merge ...`` merges shards."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


harvest_app = typer.Typer(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 80},
    rich_markup_mode=None,
    cls=_DefaultRunGroup,
    help="Collect per-component statistics over a token dataset (`harvest <id>`), or merge shards.",
    no_args_is_help=True,
)


def print_summary(doc: dict[str, Any]) -> None:
    secs = doc.get("seconds")
    timing = f", {secs:.1f} s" if isinstance(secs, float) else ""
    table = Table(title=f"harvest of {doc['decomposition_id']}: {doc['n_tokens']:,} tokens{timing}")
    for col in ("site", "components", "alive", "dead", "median density", "median density (alive)"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for s in doc["sites"]:
        table.add_row(
            s["site"],
            str(s["components"]),
            str(s["alive"]),
            str(s["dead"]),
            f"{s['median_density']:.2e}",
            f"{s['median_density_alive']:.2e}",
        )
    console.print(table)
    console.print(f"results: {doc['path']}")


@harvest_app.command("run")
@handles_errors
def run(
    decomposition_id: Annotated[str, typer.Argument(help="e.g. transcoder:demo")],
    dataset: Annotated[
        str | None,
        typer.Option(help="'demo', a .txt/.jsonl file, a saved dataset dir, or a Hub dataset"),
    ] = None,
    n_tokens: Annotated[int, typer.Option(help="Tokens to harvest (all ranks together)")] = 200_000,
    seq_len: Annotated[
        int | None, typer.Option(help="Sequence length (default: the decomposition's)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch")] = 16,
    examples_per_component: Annotated[
        int, typer.Option(help="Reservoir size and top-K examples")
    ] = 20,
    context_tokens: Annotated[int, typer.Option(help="Tokens on each side of a firing")] = 8,
    threshold: Annotated[float, typer.Option(help="Firing threshold passed to the method")] = 0.0,
    seed: Annotated[int, typer.Option()] = 0,
    output_top_k: Annotated[
        int, typer.Option(help="Next-token probabilities kept per position")
    ] = 16,
    cooccurrence: Annotated[bool, typer.Option(help="Count component co-occurrence")] = True,
    checkpoint_every: Annotated[int, typer.Option(help="Batches between checkpoints")] = 50,
    device: Annotated[str, typer.Option()] = "cpu",
    out: Annotated[
        Path | None, typer.Option(help="Sub-run directory (default under SPD_HOST_HOME)")
    ] = None,
    rank: Annotated[
        int | None, typer.Option(help="Shard index (default: RANK or SLURM_PROCID)")
    ] = None,
    world_size: Annotated[
        int | None, typer.Option(help="Shards (default: WORLD_SIZE or SLURM_NTASKS)")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    text_column: Annotated[
        str | None,
        typer.Option(help="Text column of a .jsonl/Hub dataset (default: the recorded one)"),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Recompute even if this harvest is finished")
    ] = False,
    prepend_bos: PrependBosOpt = None,
    base_model: BaseModelOpt = None,
) -> None:
    """Harvest a decomposition: statistics, examples, token stats and co-occurrence per component."""
    use_base_model(base_model)
    from spd_host.cli.options import build, finite, writable_dir
    from spd_host.harvest import HarvestConfig, run_harvest, summarize
    from spd_host.harvest.runner import resolve_rank

    finite("--threshold", threshold)
    out = writable_dir(out)
    config = build(
        HarvestConfig,
        dict(
            dataset=dataset,
            dataset_column=text_column,
            seq_len=seq_len,
            prepend_bos=prepend_bos,
            n_tokens=n_tokens,
            batch_size=batch_size,
            examples_per_component=examples_per_component,
            context_tokens=context_tokens,
            threshold=threshold,
            seed=seed,
            output_top_k=output_top_k,
            cooccurrence=cooccurrence,
            checkpoint_every=checkpoint_every,
            device=device,
        ),
    )
    r, w = resolve_rank(rank, world_size)
    repo = run_harvest(
        decomposition_id,
        config,
        out=out,
        rank=r,
        world_size=w,
        progress=not json_out,
        force=force,
    )
    if repo is None:
        err_console.print(
            f"rank {r} of {w} finished; the last rank to finish merges the shards "
            "(or run `spd-host harvest merge`)."
        )
        return
    if repo.reused:
        err_console.print(
            f"using cached harvest {repo.run} (made {made_at(repo)}); --force recomputes it",
            highlight=False,
        )
    doc = summarize(repo)
    if json_out:
        print_json(doc)
    else:
        print_summary(doc)


def made_at(repo: Any) -> str:
    """When a finished sub-run was written (its ``harvest.json``), in local time to the minute."""
    from datetime import datetime

    from spd_host.harvest.store import RESULT_JSON

    stamp = (repo.path / RESULT_JSON).stat().st_mtime
    return datetime.fromtimestamp(stamp).astimezone().strftime("%Y-%m-%d %H:%M %Z")


@harvest_app.command("merge")
@handles_errors
def merge(
    decomposition_id: Annotated[
        str | None, typer.Argument(help="The decomposition (to find its sub-run)")
    ] = None,
    run_name: Annotated[
        str | None, typer.Option("--run", help="Sub-run name (default: the latest with shards)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Sub-run directory holding shards/")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Merge the shard states of a sharded harvest into one result (exact; reservoirs stay uniform)."""
    from spd_host.errors import ConfigError, ResultsNotFoundError
    from spd_host.harvest import merge_shards, summarize
    from spd_host.harvest.repo import harvest_root

    if out is None:
        if decomposition_id is None:
            raise ConfigError(
                "give a decomposition ID or --out", hint="spd-host harvest merge transcoder:demo"
            )
        root = harvest_root(decomposition_id)
        if run_name is not None:
            out = root / run_name
        else:
            candidates = (
                sorted(root.glob("*/shards"), key=lambda p: p.stat().st_mtime)
                if root.exists()
                else []
            )
            if not candidates:
                raise ResultsNotFoundError(
                    f"no sharded harvest of {decomposition_id} under {root}",
                    hint="run `spd-host harvest <id> --rank R --world-size W` on every rank first",
                )
            out = candidates[-1].parent
    doc = summarize(merge_shards(out))
    if json_out:
        print_json(doc)
    else:
        print_summary(doc)
