"""Translate the hook names formats use into canonical hook points (``spd_host.topology``).

Formats name hooks three ways: TransformerLens names (SAELens: ``blocks.5.hook_resid_pre``),
TransformerLens names relative to a block (circuit-tracer: ``hook_resid_mid``, plus its own
``mlp.hook_in`` / ``mlp.hook_out``), and module paths (sparsify: ``layers.5.mlp``). The pure
string translations live in ``spd_host.topology``; this module adds circuit-tracer's aliases
and turns failures into ``FormatError``s that name the config file.
"""

from __future__ import annotations

import re
from typing import Literal

from spd_host.errors import FormatError, SpdHostError
from spd_host.topology import hook_point_from_module_path, hook_point_from_transformerlens

# circuit-tracer adds hook points to TransformerLens MLPs; they coincide with standard ones.
_CIRCUIT_TRACER_ALIASES = {
    "mlp.hook_in": "ln2.hook_normalized",
    "mlp.hook_out": "hook_mlp_out",
}

_HOOK_POINT_RE = re.compile(r"^(\d+)\.([a-z_]+)$")


def from_transformerlens(name: str, *, where: str) -> str:
    """``blocks.5.ln2.hook_normalized`` -> ``5.mlp_in``; FormatError naming ``where``."""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _CIRCUIT_TRACER_ALIASES:
        name = f"blocks.{m.group(1)}.{_CIRCUIT_TRACER_ALIASES[m.group(2)]}"
    try:
        point = hook_point_from_transformerlens(name)
    except (SpdHostError, ValueError, KeyError) as err:
        raise FormatError(
            f"{where}: hook {name!r} is not a hook point spd-host can map ({err})",
            hint="transcoders must read and write residual-stream or MLP hook points "
            "(hook_resid_pre/mid/post, ln2.hook_normalized, hook_mlp_out, hook_attn_out)",
        ) from err
    return point


def from_block_relative(hook: str, layer: int, *, where: str) -> str:
    """circuit-tracer style: ``hook_resid_mid`` at layer 3 -> ``3.resid_mid``."""
    full = hook if hook.startswith("blocks.") else f"blocks.{layer}.{hook}"
    return from_transformerlens(full, where=where)


def from_module_path(path: str, role: Literal["input", "output"], *, where: str) -> str:
    """sparsify hookpoints: (``layers.5.mlp``, input) -> ``5.mlp_in``."""
    try:
        return hook_point_from_module_path(path, role)
    except (SpdHostError, ValueError, KeyError) as err:
        raise FormatError(
            f"{where}: hookpoint {path!r} is not a module spd-host can map ({err})",
            hint="sparsify hookpoints must be a block (layers.N) or its MLP (layers.N.mlp)",
        ) from err


def layer_of(hook_point: str) -> int:
    m = _HOOK_POINT_RE.match(hook_point)
    if not m:
        raise FormatError(
            f"{hook_point!r} is not a per-layer hook point",
            hint="transcoder and CLT sites must read a hook point inside a block",
        )
    return int(m.group(1))


def kind_of(hook_point: str) -> str:
    return hook_point.split(".", 1)[1]
