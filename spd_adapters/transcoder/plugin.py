"""Hook implementations for transcoders and SAEs (sparsify, SAELens, circuit-tracer layouts)."""

from __future__ import annotations

from collections.abc import Callable

from spd_host.adapter import MethodInfo
from spd_host.hookspecs import hookimpl

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


@hookimpl
def register_methods(register: Callable[[MethodInfo], None]) -> None:
    register(METHOD)
