"""``spd-host info <id>``: a decomposition's metadata, without loading weights."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from spd_host.adapter import DecompositionAdapter
from spd_host.cli.common import BaseModelOpt, console, handles_errors, print_json, use_base_model
from spd_host.plugins import get_host


def describe_adapter(adapter: DecompositionAdapter) -> dict[str, Any]:
    """The JSON document ``spd-host info --json`` prints."""
    sites = [s.model_dump(mode="json") for s in adapter.sites]
    return {
        "decomposition_id": adapter.decomposition_id,
        "method": adapter.method.model_dump(mode="json"),
        "base_model": adapter.base_model_name,
        "activation_types": list(adapter.activation_types),
        "defaults": adapter.defaults.model_dump(mode="json"),
        "n_sites": len(sites),
        "n_components": sum(s["n_components"] for s in sites),
        "sites": sites,
    }


@handles_errors
def info(
    decomposition_id: Annotated[str, typer.Argument(help="e.g. transcoder:demo, clt:hf:org/repo")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    base_model: BaseModelOpt = None,
) -> None:
    """Show a decomposition's method, base model, sites and activation types."""
    use_base_model(base_model)
    adapter = get_host().load_adapter(decomposition_id)
    doc = describe_adapter(adapter)
    if json_out:
        print_json(doc)
        return
    console.print(f"[bold]{doc['decomposition_id']}[/]  method=[cyan]{doc['method']['name']}[/]")
    console.print(f"base model: {doc['base_model']}")
    console.print(f"activation types: {', '.join(doc['activation_types'])}")
    table = Table(title=f"{doc['n_sites']} sites, {doc['n_components']} components")
    for col in ("site", "C", "reads from", "writes to", "description"):
        table.add_column(col)
    for s in doc["sites"]:
        table.add_row(
            s["name"],
            str(s["n_components"]),
            s["reads_from"],
            ", ".join(s["writes_to"]),
            s["description"],
        )
    console.print(table)
    console.print(f"[dim]{doc['method']['description']}[/]")
