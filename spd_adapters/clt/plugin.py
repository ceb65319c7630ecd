"""Hook implementations for cross-layer transcoders (circuit-tracer layout)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from spd_host.adapter import DecompositionAdapter, HarvestFn, HarvestOptions, MethodInfo
from spd_host.errors import FormatError
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
    from spd_adapters.transcoder.goodfire import resolve_wandb_id
    from spd_host.ids import SourceKind

    if decomposition_id.kind is SourceKind.WANDB:
        root: Path | None = resolve_wandb_id(decomposition_id)
    else:
        root = decomposition_dir(
            decomposition_id, demo_dir=DEMO_DIR, trainer="spd_adapters.clt.train_demo"
        )
    if root is None:
        return None
    from spd_adapters.clt.goodfire import read_goodfire_clt
    from spd_adapters.transcoder import goodfire

    kind = goodfire.harvest_spec_type(root)
    if kind == "CLTHarvestConfig" or goodfire.is_checkpoint_dir(root):
        return CLTAdapter(decomposition_id, METHOD, read_goodfire_clt(root))
    if kind == "TranscoderHarvestConfig":
        raise FormatError(
            f"{root}: type is TranscoderHarvestConfig",
            hint=f"load it with the transcoder method: transcoder:{root}",
        )
    return CLTAdapter(decomposition_id, METHOD, read_clt(root))


@hookimpl
def harvest_fn(adapter: DecompositionAdapter, options: HarvestOptions) -> HarvestFn | None:
    from spd_adapters.clt.adapter import CLTAdapter

    if not isinstance(adapter, CLTAdapter):
        return None
    return adapter.harvest_fn(options)
