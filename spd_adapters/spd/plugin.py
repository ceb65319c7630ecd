"""Hook implementations for Stochastic Parameter Decomposition runs (Goodfire ``spd`` format)."""

from __future__ import annotations

from collections.abc import Callable

from spd_host.adapter import MethodInfo
from spd_host.hookspecs import hookimpl

METHOD = MethodInfo(
    name="spd",
    description=(
        "Stochastic Parameter Decomposition (SPD) splits each decomposed weight matrix into C "
        "rank-one subcomponents whose sum approximates the original weights. A learned causal-"
        "importance function predicts, for each token, how much each subcomponent matters to the "
        "layer's output there (0 = can be ablated, 1 = needed). Each component is one rank-one "
        "piece of one weight matrix; it 'fires' where its causal importance is above a threshold, "
        "and its component activation is the input's projection onto the piece's input direction "
        "scaled by the norm of its output direction."
    ),
    short_id_pattern=r"s-[0-9a-z]{8}",
)


@hookimpl
def register_methods(register: Callable[[MethodInfo], None]) -> None:
    register(METHOD)
