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

# circuit-tracer adds hook points to TransformerLens MLPs; they coincide with standard ones.
_CIRCUIT_TRACER_ALIASES = {
    "mlp.hook_in": "ln2.hook_normalized",
    "mlp.hook_out": "hook_mlp_out",
}

_HOOK_POINT_RE = re.compile(r"^(\d+)\.(resid_pre|resid_mid|mlp_in|mlp_out|attn_out|resid_post)$")


def from_transformerlens(name: str, *, where: str) -> str:
    """``blocks.5.ln2.hook_normalized`` -> ``5.mlp_in``; FormatError naming ``where``."""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _CIRCUIT_TRACER_ALIASES:
        name = f"blocks.{m.group(1)}.{_CIRCUIT_TRACER_ALIASES[m.group(2)]}"
    try:
        point = _tl(name)
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
        return _module_path(path, role)
    except (SpdHostError, ValueError, KeyError) as err:
        raise FormatError(
            f"{where}: hookpoint {path!r} is not a module spd-host can map ({err})",
            hint="sparsify hookpoints must be a block (layers.N) or its MLP (layers.N.mlp)",
        ) from err


def layer_of(hook_point: str) -> int:
    m = _HOOK_POINT_RE.match(hook_point)
    if not m:
        raise FormatError(f"{hook_point!r} is not a per-layer canonical hook point")
    return int(m.group(1))


def kind_of(hook_point: str) -> str:
    return hook_point.split(".", 1)[1]


_TL_SUFFIX = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "ln2.hook_normalized": "mlp_in",
    "hook_mlp_out": "mlp_out",
    "hook_attn_out": "attn_out",
    "hook_resid_post": "resid_post",
}


def _tl(name: str) -> str:
    try:
        from spd_host.topology import hook_point_from_transformerlens
    except ImportError:  # TEMPORARY: until spd_host.topology lands on this branch
        m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
        if not m or m.group(2) not in _TL_SUFFIX:
            raise ValueError(f"unknown TransformerLens hook {name!r}") from None
        return f"{m.group(1)}.{_TL_SUFFIX[m.group(2)]}"
    return hook_point_from_transformerlens(name)


def _module_path(path: str, role: Literal["input", "output"]) -> str:
    try:
        from spd_host.topology import hook_point_from_module_path
    except ImportError:  # TEMPORARY: until spd_host.topology lands on this branch
        m = re.match(r"^(?:.*\.)?(?:layers|h|blocks)\.(\d+)(\.mlp)?$", path)
        if not m:
            raise ValueError(f"unknown module path {path!r}") from None
        if m.group(2):
            return f"{m.group(1)}.mlp_in" if role == "input" else f"{m.group(1)}.mlp_out"
        return f"{m.group(1)}.resid_pre" if role == "input" else f"{m.group(1)}.resid_post"
    return hook_point_from_module_path(path, role)
