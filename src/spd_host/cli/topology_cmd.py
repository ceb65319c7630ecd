"""``spd-host topology <model>``: the canonical map of a model, built from its config only."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from spd_host.cli.common import console, handles_errors, print_json


@handles_errors
def topology(
    model: Annotated[
        str,
        typer.Argument(help="local HF model directory, 'demo', or a Hub name in the local cache"),
    ],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a model's canonical addresses, module paths and hook points (no weights loaded)."""
    from spd_host.topology import topology_of
    from spd_host.topology.loading import skeleton_from_pretrained

    topo = topology_of(skeleton_from_pretrained(model))
    doc = {"model": model, **topo.as_dict()}
    if json_out:
        print_json(doc)
        return
    console.print(
        f"[bold]{model}[/]  architecture=[cyan]{topo.architecture}[/] spec={topo.spec.name} "
        f"n_layers={topo.n_layers}"
        + ("  [yellow](parallel attention+MLP)[/]" if topo.parallel else "")
    )
    if topo.spec.description:
        console.print(f"[dim]{escape(topo.spec.description)}[/]")
    table = Table(title="canonical module addresses")
    for col in ("address", "module path", "description"):
        table.add_column(col)
    for address, info in doc["addresses"].items():  # type: ignore[attr-defined]
        table.add_row(address, info["module_path"], escape(info["description"]))
    console.print(table)
    hooks = Table(title="hook points")
    for col in ("hook point", "module path", "where", "description"):
        hooks.add_column(col)
    for hook, info in doc["hook_points"].items():  # type: ignore[attr-defined]
        hooks.add_row(hook, info["module_path"], info["where"], escape(info["description"]))
    console.print(hooks)
