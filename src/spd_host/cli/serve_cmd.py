"""``spd-host serve`` (local browser), ``spd-host dashboard`` (static export) and
``spd-host export neuronpedia | circuit-tracer | logits``."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from spd_host.cli.common import console, handles_errors
from spd_host.errors import ConfigError

export_app = typer.Typer(
    help="Export a harvest for other viewers (Neuronpedia, circuit-tracer) or store decoder logits.",
    no_args_is_help=True,
)

HarvestRun = Annotated[str | None, typer.Option(help="harvest sub-run (default: latest)")]
Components = Annotated[
    str | None, typer.Option(help="comma-separated component keys, e.g. layer_0:3,layer_1:7")
]
Top = Annotated[int | None, typer.Option(help="the N densest alive components")]
Search = Annotated[str | None, typer.Option(help="only components whose label or top tokens match")]


def _need_viewer() -> None:
    """The web stack is the optional ``viewer`` extra: say how to get it instead of a traceback."""
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"the viewer needs {', '.join(missing)}, which are not installed",
            hint="pip install 'spd-host[viewer]'",
        )


@contextmanager
def _bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar on stderr; yields ``update(done, total)``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    with Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    ) as progress:  # fmt: skip
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def _keys(components: str | None) -> list[str] | None:
    return [k.strip() for k in components.split(",") if k.strip()] if components else None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@handles_errors
def serve(
    ids: Annotated[list[str], typer.Argument(help="one or more decomposition IDs")],
    host: Annotated[
        str, typer.Option(help="interface to bind (loopback by default)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0: pick a free one)")] = 8765,
    harvest_run: HarvestRun = None,
) -> None:
    """Browse harvests in a local web app: index, component pages, compare view."""
    _need_viewer()
    import uvicorn

    from spd_host.viewer.app import Viewer, create_app
    from spd_host.viewer.source import open_sources

    sources = open_sources(ids, harvest_run)
    console.print("opening the component index (built once per harvest; large ones take a while)")
    viewer = Viewer(sources)
    port = port or _free_port(host)
    console.print(f"serving {', '.join(ids)} at [bold]http://{host}:{port}/[/] (Ctrl-C stops)")
    try:
        uvicorn.run(create_app(viewer), host=host, port=port, log_level="warning")
    finally:
        viewer.close()


def _out_dir(out: Path) -> Path:
    """``--out`` checked before any work (a file, ``/proc``, a read-only place: refused)."""
    from spd_host.cli.options import writable_dir

    checked = writable_dir(out)
    assert checked is not None
    return checked


@handles_errors
def dashboard(
    decomposition_id: Annotated[str, typer.Argument(help="e.g. transcoder:demo")],
    out: Annotated[Path, typer.Option(help="directory to write (index.html inside)")],
    components: Components = None,
    top: Top = None,
    search: Search = None,
    harvest_run: HarvestRun = None,
) -> None:
    """Write a static, self-contained dashboard (opens from file://, no server, no network)."""
    out = _out_dir(out)
    _need_viewer()
    from spd_host.viewer.source import DecompositionSource
    from spd_host.viewer.static_site import write_dashboard

    if components and (top or search):
        raise ConfigError("give either --components or --top/--search, not both")
    source = DecompositionSource(decomposition_id, harvest_run)
    with _bar("component pages") as update:
        keys = write_dashboard(
            source,
            out,
            components=_keys(components),
            top=top if top is not None else (None if search else 100),
            search=search,
            progress=update,
        )
    console.print(f"wrote {len(keys)} component pages: {out / 'index.html'}")


@export_app.command("neuronpedia")
@handles_errors
def neuronpedia(
    decomposition_id: Annotated[str, typer.Argument(help="e.g. transcoder:demo")],
    out: Annotated[Path, typer.Option(help="directory to write <site>/<index>.json into")],
    components: Components = None,
    top: Top = None,
    search: Search = None,
    harvest_run: HarvestRun = None,
) -> None:
    """Neuronpedia feature JSON (activations, quantile bins, logits, histogram, explanations)."""
    out = _out_dir(out)
    _need_viewer()
    from spd_host.viewer.exports import export_neuronpedia
    from spd_host.viewer.index import ComponentIndex
    from spd_host.viewer.source import DecompositionSource
    from spd_host.viewer.static_site import select_keys

    source = DecompositionSource(decomposition_id, harvest_run)
    index = ComponentIndex(source).ensure(background_tokens=search is None)
    keys = select_keys(index, components=_keys(components), top=top, search=search)
    with _bar("Neuronpedia features") as update:
        n = export_neuronpedia(source, out, keys, progress=update)
    index.stop()
    console.print(f"wrote {n} Neuronpedia feature files under {out}")


@export_app.command("circuit-tracer")
@handles_errors
def circuit_tracer(
    decomposition_id: Annotated[str, typer.Argument(help="a transcoder or CLT decomposition")],
    out: Annotated[Path, typer.Option(help="directory; features/ is written inside")],
    harvest_run: HarvestRun = None,
) -> None:
    """circuit-tracer feature files: features/index.json.gz + one .bin per layer."""
    out = _out_dir(out)
    from spd_host.viewer.exports import export_circuit_tracer
    from spd_host.viewer.source import DecompositionSource

    with _bar("circuit-tracer features") as update:
        path = export_circuit_tracer(
            DecompositionSource(decomposition_id, harvest_run), out, progress=update
        )
    console.print(
        f"wrote {path} (serve with circuit_tracer's local server, features_dir={path.parent})"
    )


@export_app.command("logits")
@handles_errors
def logits(
    decomposition_id: Annotated[str, typer.Argument(help="e.g. transcoder:demo")],
    k: Annotated[int, typer.Option(help="tokens kept per side")] = 10,
    harvest_run: HarvestRun = None,
) -> None:
    """Compute top/bottom logits of every component's decoder direction; store beside the harvest."""
    from spd_host.viewer.logits import compute_logits
    from spd_host.viewer.source import DecompositionSource

    path = compute_logits(DecompositionSource(decomposition_id, harvest_run), k=k)
    if path is None:
        console.print(
            f"[yellow]{decomposition_id} has no fixed decoder direction per component; no logits stored[/]"
        )
        return
    console.print(f"wrote {path}")
