"""Canonical structure of transformer LMs: addresses, hook points, capture and replacement.

``topology_of(model)`` maps a Hugging Face causal LM onto one canonical structure (see
``grammar`` for the address/hook-point grammar and docs/topology.md for per-architecture
definitions); plugins add architectures by registering an :class:`ArchitectureSpec`.
"""

from __future__ import annotations

from spd_host.topology.detect import Layout, detect, match_spec
from spd_host.topology.grammar import (
    ADDRESS_GRAMMAR,
    HOOK_GRAMMAR,
    Address,
    HookPoint,
    is_hook_point,
    parse_address,
    parse_hook_point,
)
from spd_host.topology.hooks import Site
from spd_host.topology.names import hook_point_from_module_path, hook_point_from_transformerlens
from spd_host.topology.spec import BUILTIN_SPECS, ArchitectureSpec, MixerVariant
from spd_host.topology.topology import TransformerTopology, topology_of

__all__ = [
    "ADDRESS_GRAMMAR",
    "BUILTIN_SPECS",
    "HOOK_GRAMMAR",
    "Address",
    "ArchitectureSpec",
    "HookPoint",
    "Layout",
    "MixerVariant",
    "Site",
    "TransformerTopology",
    "detect",
    "hook_point_from_module_path",
    "hook_point_from_transformerlens",
    "is_hook_point",
    "match_spec",
    "parse_address",
    "parse_hook_point",
    "topology_of",
]
