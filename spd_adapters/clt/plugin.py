"""Hook implementations for cross-layer transcoders (circuit-tracer layout)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from spd_host.adapter import DecompositionAdapter, HarvestFn, HarvestOptions, MethodInfo
from spd_host.hookspecs import hookimpl
from spd_host.ids import DecompositionId

METHOD = MethodInfo(
    name="clt",
    description=(
        "A cross-layer transcoder (CLT) replaces all MLP layers of a model at once. Each layer "
        "has a sparse encoder that reads the residual stream entering that layer's MLP; a feature "
        "read at layer i has decoders into the MLP outputs of layer i and every later layer. Each "
        "component is one feature of one source layer; its activation is how strongly the "
        "encoder detects it at a token, and its decoders say what it writes to the current and "
        "later MLP outputs."
    ),
)

DEMO_DIR = Path(__file__).parent / "demo_assets"


@hookimpl
def register_methods(register: Callable[[MethodInfo], None]) -> None:
    register(METHOD)


@hookimpl
def load_decomposition(decomposition_id: DecompositionId) -> DecompositionAdapter | None:
    from spd_adapters._files import decomposition_dir
    from spd_adapters.clt.adapter import CLTAdapter
    from spd_adapters.clt.formats import read_clt

    root = decomposition_dir(
        decomposition_id, demo_dir=DEMO_DIR, trainer="spd_adapters.clt.train_demo"
    )
    if root is None:
        return None
    return CLTAdapter(decomposition_id, METHOD, read_clt(root))


@hookimpl
def harvest_fn(adapter: DecompositionAdapter, options: HarvestOptions) -> HarvestFn | None:
    from spd_adapters.clt.adapter import CLTAdapter

    if not isinstance(adapter, CLTAdapter):
        return None
    return adapter.harvest_fn(options)
