"""Hook implementations for transcoders and SAEs (sparsify, SAELens, circuit-tracer layouts)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from spd_host.adapter import DecompositionAdapter, HarvestFn, HarvestOptions, MethodInfo
from spd_host.hookspecs import hookimpl
from spd_host.ids import DecompositionId

METHOD = MethodInfo(
    name="transcoder",
    description=(
        "A transcoder replaces one MLP layer with a sparse, overcomplete dictionary: an encoder "
        "maps the MLP's input to many feature activations, most of them zero, and a linear "
        "decoder maps the active features back to the MLP's output. Each component is one "
        "feature; its activation is how strongly the encoder detects that feature at a token, "
        "and its decoder row is what it adds to the MLP output. A sparse autoencoder (SAE) is the "
        "special case that reconstructs the same activation it reads."
    ),
)

DEMO_DIR = Path(__file__).parent / "demo_assets"


@hookimpl
def register_methods(register: Callable[[MethodInfo], None]) -> None:
    register(METHOD)


@hookimpl
def load_decomposition(decomposition_id: DecompositionId) -> DecompositionAdapter | None:
    from spd_adapters._files import decomposition_dir
    from spd_adapters.transcoder.adapter import TranscoderAdapter
    from spd_adapters.transcoder.formats import read_layout
    from spd_adapters.transcoder.goodfire import resolve_wandb_id
    from spd_host.ids import SourceKind

    if decomposition_id.kind is SourceKind.WANDB:
        root: Path | None = resolve_wandb_id(decomposition_id)
    else:
        root = decomposition_dir(
            decomposition_id, demo_dir=DEMO_DIR, trainer="spd_adapters.transcoder.train_demo"
        )
    if root is None:
        return None
    return TranscoderAdapter(decomposition_id, METHOD, read_layout(root))


@hookimpl
def harvest_fn(adapter: DecompositionAdapter, options: HarvestOptions) -> HarvestFn | None:
    from spd_adapters.transcoder.adapter import TranscoderAdapter

    if not isinstance(adapter, TranscoderAdapter):
        return None
    return adapter.harvest_fn(options)
