"""The three hooks a method plugin implements. spd-host imports this module via the entry point."""

from __future__ import annotations

from collections.abc import Callable

from spd_host.adapter import DecompositionAdapter, HarvestFn, HarvestOptions, MethodInfo
from spd_host.errors import SourceNotFoundError
from spd_host.hookspecs import hookimpl
from spd_host.ids import DecompositionId, SourceKind, fetch_source

# 1. What the method is. `name` is the `<method>` in IDs (`resid-sae:<dir>`); the description is
#    put verbatim into autointerp prompts, so it explains a component to someone who never heard
#    of the method.
METHOD = MethodInfo(
    name="resid-sae",
    description=(
        "A sparse autoencoder (SAE) rewrites the residual stream at one layer as a sparse sum of "
        "learned directions. Each component is one direction; its activation is how strongly "
        "that direction is present at a token (zero most of the time)."
    ),
)


@hookimpl
def register_methods(register: Callable[[MethodInfo], None]) -> None:
    """Called once at start-up: cheap, no weights, no network."""
    register(METHOD)


@hookimpl
def load_decomposition(decomposition_id: DecompositionId) -> DecompositionAdapter | None:
    """Called only for IDs of this plugin's method: resolve the source, read metadata."""
    from resid_sae.adapter import ResidSaeAdapter  # keep torch out of start-up

    if decomposition_id.kind in (SourceKind.DEMO, SourceKind.SHORT):
        raise SourceNotFoundError(
            f"{decomposition_id.raw}: this example ships no demo", hint="use resid-sae:<dir>"
        )
    root = fetch_source(decomposition_id)  # local path, hf:..., or wandb:... -> local dir
    return ResidSaeAdapter(decomposition_id, root, METHOD)


@hookimpl
def harvest_fn(adapter: DecompositionAdapter, options: HarvestOptions) -> HarvestFn | None:
    """Called only with adapters this plugin made: return `tokens -> HarvestBatch`."""
    from resid_sae.adapter import ResidSaeAdapter

    return adapter.harvest_fn(options) if isinstance(adapter, ResidSaeAdapter) else None
