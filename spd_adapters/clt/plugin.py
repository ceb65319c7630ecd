"""Hook implementations for cross-layer transcoders (circuit-tracer layout)."""

from __future__ import annotations

from collections.abc import Callable

from spd_host.adapter import MethodInfo
from spd_host.hookspecs import hookimpl

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


@hookimpl
def register_methods(register: Callable[[MethodInfo], None]) -> None:
    register(METHOD)
