"""Hook implementations for Stochastic Parameter Decomposition runs (Goodfire ``spd`` format)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from spd_host.adapter import MethodInfo
from spd_host.hookspecs import hookimpl
from spd_host.ids import SourceKind

if TYPE_CHECKING:
    from spd_host.adapter import DecompositionAdapter, HarvestFn, HarvestOptions
    from spd_host.ids import DecompositionId

METHOD = MethodInfo(
    name="spd",
    description=(
        "Stochastic Parameter Decomposition (SPD) splits each decomposed weight matrix into C "
        "rank-one subcomponents whose sum approximates the original weights. A learned causal-"
        "importance function predicts, for each token, how much each subcomponent matters to the "
        "layer's output there (0 = can be ablated, 1 = needed). Each component is one rank-one "
        "piece of one weight matrix; it 'fires' where its causal importance is above a threshold, "
        "and its component activation is the input's projection onto the piece's input direction "
        "scaled by the norm of its output direction. Causal importances are computed without the "
        "training-time noise, so harvests are deterministic."
    ),
    # s-: torch-era spd runs on wandb; p-: param-decomp (JAX) run dirs under a runs root.
    short_id_pattern=r"[sp]-[0-9a-z]{8}",
)


@hookimpl
def register_methods(register: Callable[[MethodInfo], None]) -> None:
    register(METHOD)


@hookimpl
def load_decomposition(decomposition_id: DecompositionId) -> DecompositionAdapter | None:
    if decomposition_id.method != METHOD.name:
        return None
    from spd_adapters.spd.adapter import SpdAdapter, resolve_run_dir
    from spd_adapters.spd.param_decomp import run_files

    short = decomposition_id.short_id or ""
    if decomposition_id.kind is SourceKind.SHORT and short.startswith("p-"):
        path = run_files.resolve_short_id(short)
    else:
        path = resolve_run_dir(decomposition_id)
    if run_files.is_pd_run(path):
        from spd_adapters.spd.param_decomp.adapter import PdAdapter

        return PdAdapter(decomposition_id, METHOD, path)
    return SpdAdapter(decomposition_id, METHOD, path)


@hookimpl
def harvest_fn(adapter: DecompositionAdapter, options: HarvestOptions) -> HarvestFn | None:
    from spd_adapters.spd.adapter import SpdAdapter
    from spd_adapters.spd.harvest_fn import make_harvest_fn
    from spd_adapters.spd.param_decomp.adapter import PdAdapter
    from spd_adapters.spd.param_decomp.harvest_fn import make_pd_harvest_fn

    if isinstance(adapter, PdAdapter):
        return make_pd_harvest_fn(adapter, options)
    if not isinstance(adapter, SpdAdapter):
        return None
    return make_harvest_fn(adapter, options)


@hookimpl
def register_architectures(register: Callable[[Any], None]) -> None:
    """Goodfire's own target models (LlamaSimple, LlamaSimpleMLP, GPT2Simple; see targets/) and
    transformers' Qwen3.5-MoE (param-decomp's qwen36_moe target)."""
    from spd_adapters.spd.param_decomp.topology_spec import QWEN3_5_MOE
    from spd_adapters.spd.targets.specs import SPECS

    for spec in (*SPECS, QWEN3_5_MOE):
        register(spec)
