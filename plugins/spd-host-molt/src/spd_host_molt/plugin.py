"""The hook implementations spd-host calls: this module is the ``molt`` entry point."""

from __future__ import annotations

from collections.abc import Callable

from spd_host.adapter import DecompositionAdapter, HarvestFn, HarvestOptions, MethodInfo
from spd_host.errors import SourceNotFoundError
from spd_host.hookspecs import hookimpl
from spd_host.ids import DecompositionId, SourceKind, fetch_source

METHOD = MethodInfo(
    name="molt",
    description=(
        "A MOLT (sparse mixture of linear transforms) replaces one MLP layer with many small "
        "low-rank linear maps, each switched on by its own encoder unit. At every token the "
        "encoder scores each transform from the MLP's input; most scores are zero, and the layer's "
        "output is the sum of the active transforms applied to the input, each weighted by its "
        "score. Each component is one transform: its activation is how strongly the encoder "
        "switches that transform on at a token, and what it writes depends on the token's input "
        "(a linear function of it), not just on the activation."
    ),
)


@hookimpl
def register_methods(register: Callable[[MethodInfo], None]) -> None:
    register(METHOD)


@hookimpl
def load_decomposition(decomposition_id: DecompositionId) -> DecompositionAdapter | None:
    from spd_host_molt.adapter import MoltAdapter
    from spd_host_molt.format import ALLOW_PATTERNS

    if decomposition_id.kind in (SourceKind.DEMO, SourceKind.SHORT):
        raise SourceNotFoundError(
            f"{decomposition_id.raw}: the molt plugin ships no demo decomposition",
            hint="use molt:<dir> (a Llamascopium MOLT directory) or molt:hf:<owner>/<repo>/<name>",
        )
    root = fetch_source(decomposition_id, allow_patterns=list(ALLOW_PATTERNS))
    return MoltAdapter(decomposition_id, root, METHOD)


@hookimpl
def harvest_fn(adapter: DecompositionAdapter, options: HarvestOptions) -> HarvestFn | None:
    from spd_host_molt.adapter import MoltAdapter

    if not isinstance(adapter, MoltAdapter):
        return None
    return adapter.harvest_fn(options)
