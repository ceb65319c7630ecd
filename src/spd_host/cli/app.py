"""The ``spd-host`` typer application: every command group is registered here."""

from __future__ import annotations

import typer

from spd_host.cli import (
    autointerp_cmd,
    demo_cmd,
    eval_cmd,
    harvest_cmd,
    info_cmd,
    plugins_cmd,
    serve_cmd,
    show_cmd,
    topology_cmd,
)

app = typer.Typer(
    name="spd-host",
    help="Harvest, label and evaluate decompositions of language models, for any method.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

app.command("plugins")(plugins_cmd.plugins)
app.command("info")(info_cmd.info)
app.command("autointerp")(autointerp_cmd.autointerp)
app.command("show")(show_cmd.show)
app.command("topology")(topology_cmd.topology)
app.add_typer(harvest_cmd.harvest_app, name="harvest")
app.add_typer(eval_cmd.eval_app, name="eval")
app.command("demo")(demo_cmd.demo)
app.command("serve")(serve_cmd.serve)
app.command("dashboard")(serve_cmd.dashboard)
app.add_typer(serve_cmd.export_app, name="export")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
