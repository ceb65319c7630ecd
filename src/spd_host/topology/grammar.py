"""The canonical grammar: module addresses and activation hook points, parsed and described.

Pure strings, no torch: every other part of the topology package (and every plugin) speaks this
grammar, so it lives on its own. Block indices are 0-based everywhere.

Module addresses (weights a decomposition can target)::

    embed | output
    {i}.attn.{q|k|v|o}            separate attention projections
    {i}.attn_fused.{qkv|o}        fused query/key/value projection (GPT-2 c_attn, NeoX, Phi-3)
    {i}.glu.{gate|up|down}        gated MLP
    {i}.glu_fused.{gate_up|down}  gated MLP with one fused gate/up matrix (Phi-3)
    {i}.mlp.{up|down}             plain two-layer MLP
    {i}.norm.{attn_pre|attn_post|mlp_pre|mlp_post} | final_norm     layer norms

Hook points (activations)::

    embed | unembed_in
    {i}.{resid_pre|attn_in|attn_out|attn_out_normed|resid_mid|mlp_in|mlp_hidden|mlp_out|mlp_out_normed|resid_post}
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spd_host.errors import TopologyError

#: kind of a block-level module address -> allowed roles, in canonical order
BLOCK_ADDRESS_ROLES: dict[str, tuple[str, ...]] = {
    "attn": ("q", "k", "v", "o"),
    "attn_fused": ("qkv", "o"),
    "glu": ("gate", "up", "down"),
    "glu_fused": ("gate_up", "down"),
    "mlp": ("up", "down"),
    "norm": ("attn_pre", "attn_post", "mlp_pre", "mlp_post"),
}
GLOBAL_ADDRESSES: tuple[str, ...] = ("embed", "output", "final_norm")

#: per-block hook point names, in forward order
BLOCK_HOOK_NAMES: tuple[str, ...] = (
    "resid_pre",
    "attn_in",
    "attn_out",
    "attn_out_normed",
    "resid_mid",
    "mlp_in",
    "mlp_hidden",
    "mlp_out",
    "mlp_out_normed",
    "resid_post",
)
GLOBAL_HOOK_NAMES: tuple[str, ...] = ("embed", "unembed_in")

_BLOCK_ADDRESS_RE = re.compile(r"^(\d+)\.([a-z_]+)\.([a-z_]+)$")
_BLOCK_HOOK_RE = re.compile(r"^(\d+)\.([a-z_]+)$")

ADDRESS_GRAMMAR = (
    "embed | output | final_norm | {i}.attn.{q|k|v|o} | {i}.attn_fused.{qkv|o} | "
    "{i}.glu.{gate|up|down} | {i}.glu_fused.{gate_up|down} | {i}.mlp.{up|down} | "
    "{i}.norm.{attn_pre|attn_post|mlp_pre|mlp_post}"
)
HOOK_GRAMMAR = "embed | unembed_in | {i}.{" + "|".join(BLOCK_HOOK_NAMES) + "}"


@dataclass(frozen=True)
class Address:
    """A parsed module address: ``block`` is None for ``embed``/``output``/``final_norm``."""

    block: int | None
    kind: str  # "embed", "output", "final_norm", or a key of BLOCK_ADDRESS_ROLES
    role: str | None

    def __str__(self) -> str:
        if self.block is None:
            return self.kind
        return f"{self.block}.{self.kind}.{self.role}"


@dataclass(frozen=True)
class HookPoint:
    """A parsed hook point: ``block`` is None for ``embed``/``unembed_in``."""

    block: int | None
    name: str

    def __str__(self) -> str:
        return self.name if self.block is None else f"{self.block}.{self.name}"


def parse_address(text: str) -> Address:
    """Parse a canonical module address; ``TopologyError`` (with the grammar) if malformed."""
    if text in GLOBAL_ADDRESSES:
        return Address(None, text, None)
    m = _BLOCK_ADDRESS_RE.match(text)
    if m and m.group(2) in BLOCK_ADDRESS_ROLES and m.group(3) in BLOCK_ADDRESS_ROLES[m.group(2)]:
        return Address(int(m.group(1)), m.group(2), m.group(3))
    raise TopologyError(
        f"{text!r} is not a canonical module address",
        hint=f"addresses look like {ADDRESS_GRAMMAR} (block i is 0-based)",
    )


def parse_hook_point(text: str) -> HookPoint:
    """Parse a canonical hook point; ``TopologyError`` (with the grammar) if malformed."""
    if text in GLOBAL_HOOK_NAMES:
        return HookPoint(None, text)
    m = _BLOCK_HOOK_RE.match(text)
    if m and m.group(2) in BLOCK_HOOK_NAMES:
        return HookPoint(int(m.group(1)), m.group(2))
    raise TopologyError(
        f"{text!r} is not a canonical hook point",
        hint=f"hook points look like {HOOK_GRAMMAR} (block i is 0-based); "
        "TransformerLens names and module paths translate with "
        "hook_point_from_transformerlens / hook_point_from_module_path",
    )


def is_hook_point(text: str) -> bool:
    try:
        parse_hook_point(text)
    except TopologyError:
        return False
    return True


_ROLE_TEXT = {
    ("attn", "q"): "attention query projection",
    ("attn", "k"): "attention key projection",
    ("attn", "v"): "attention value projection",
    ("attn", "o"): "attention output projection",
    ("attn_fused", "qkv"): "fused attention query/key/value projection",
    ("attn_fused", "o"): "attention output projection",
    ("glu", "gate"): "MLP gate projection (gated MLP)",
    ("glu", "up"): "MLP up-projection (gated MLP)",
    ("glu", "down"): "MLP down-projection",
    ("glu_fused", "gate_up"): "fused MLP gate/up projection (gated MLP)",
    ("glu_fused", "down"): "MLP down-projection",
    ("mlp", "up"): "MLP up-projection",
    ("mlp", "down"): "MLP down-projection",
    ("norm", "attn_pre"): "layer norm before attention",
    ("norm", "attn_post"): "layer norm after attention (on the attention output)",
    ("norm", "mlp_pre"): "layer norm before the MLP",
    ("norm", "mlp_post"): "layer norm after the MLP (on the MLP output)",
}
_GLOBAL_ADDRESS_TEXT = {
    "embed": "Token embedding",
    "output": "Unembedding (LM head)",
    "final_norm": "Final layer norm before the unembedding",
}
_HOOK_TEXT = {
    "resid_pre": "residual stream entering",
    "attn_in": "attention input (after its layer norm)",
    "attn_out": "attention output (the attention module's output)",
    "attn_out_normed": "attention output after the post-attention norm (what is added to the residual)",
    "resid_mid": "residual stream between attention and MLP",
    "mlp_in": "MLP input (after its layer norm)",
    "mlp_hidden": "MLP hidden activations (input of the down-projection)",
    "mlp_out": "MLP output (the MLP module's output)",
    "mlp_out_normed": "MLP output after the post-MLP norm (what is added to the residual)",
    "resid_post": "residual stream leaving",
}
_GLOBAL_HOOK_TEXT = {
    "embed": "token embedding output",
    "unembed_in": "input of the unembedding (after the final norm)",
}


def describe_address(address: Address, n_layers: int) -> str:
    if address.block is None:
        return _GLOBAL_ADDRESS_TEXT[address.kind]
    role = _ROLE_TEXT[(address.kind, address.role or "")]
    return f"{role[0].upper()}{role[1:]} in block {address.block} of {n_layers}"


def describe_hook_point(hook: HookPoint, n_layers: int) -> str:
    if hook.block is None:
        text = _GLOBAL_HOOK_TEXT[hook.name]
        return f"{text[0].upper()}{text[1:]}"
    text = _HOOK_TEXT[hook.name]
    joiner = " " if hook.name in ("resid_pre", "resid_post") else " in "
    return f"{text[0].upper()}{text[1:]}{joiner}block {hook.block} of {n_layers}"
