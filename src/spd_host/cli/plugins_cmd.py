"""``spd-host plugins``: what is installed, what it provides, what failed to load."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from spd_host.cli.common import console, handles_errors, print_json
from spd_host.plugins import get_host


@handles_errors
def plugins(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List installed plugins: name, version, methods, hooks, load errors."""
    host = get_host()
    records = sorted(host.records.values(), key=lambda r: (not r.first_party, r.name))
    if json_out:
        print_json({"plugins": [r.as_dict() for r in records], "methods": host.method_names})
        return
    table = Table(title="spd-host plugins")
    for col in ("plugin", "version", "methods", "hooks", "status"):
        table.add_column(col)
    for r in records:
        status = "[green]loaded[/]" if not r.errors else "[red]" + "; ".join(r.errors) + "[/]"
        table.add_row(
            r.name + ("" if r.first_party else " [dim](third-party)[/]"),
            r.version or "-",
            ", ".join(r.methods) or "-",
            ", ".join(r.hooks) or "-",
            status,
        )
    console.print(table)
