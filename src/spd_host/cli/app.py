"""The ``spd-host`` typer application: every command group is registered here."""

from __future__ import annotations

from typing import Annotated

import typer

from spd_host.cli import (
    autointerp_cmd,
    demo_cmd,
    eval_cmd,
    harvest_cmd,
    info_cmd,
    plugins_cmd,
    show_cmd,
    topology_cmd,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 80}

app = typer.Typer(
    name="spd-host",
    help="Harvest, label and evaluate decompositions of language models, for any method.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings=CONTEXT,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from spd_host import __version__

        typer.echo(f"spd-host {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Harvest, label and evaluate decompositions of language models, for any method."""


app.command("plugins")(plugins_cmd.plugins)
app.command("info")(info_cmd.info)
app.command("autointerp")(autointerp_cmd.autointerp)
app.command("show")(show_cmd.show)
app.command("topology")(topology_cmd.topology)
app.add_typer(harvest_cmd.harvest_app, name="harvest")
app.add_typer(eval_cmd.eval_app, name="eval")
app.command("demo")(demo_cmd.demo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
