"""Structural detection: which :class:`ArchitectureSpec` describes a model, and where things are.

A spec claims a model when its paths resolve on *every* block with the right kinds of module
(2-D weights for projections), and none of its forbidden paths exist. Plugin specs are tried
before the built-ins so that a plugin can take over a model. Class names are never consulted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from spd_host.errors import TopologyError
from spd_host.topology.spec import BUILTIN_SPECS, ArchitectureSpec, MixerVariant


@dataclass
class Layout:
    """Absolute module paths of one model's canonical pieces (what a spec resolved to)."""

    spec: ArchitectureSpec
    blocks: str
    n_layers: int
    embed: str
    output: str | None
    final_norm: str | None
    parallel: bool
    reasons: list[str] = field(default_factory=list)
    #: per block, the token mixer it has (always the spec's own ``attn`` unless it is hybrid)
    mixers: list[MixerVariant] = field(default_factory=list)

    def mixer(self, i: int) -> MixerVariant:
        return self.mixers[i] if self.mixers else self.spec.mixers[0]


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _has_2d_weight(module: nn.Module | None) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2


def _candidates(paths: Sequence[str]) -> list[str]:
    """Each spec path, plus the same path without its first component (bare base models)."""
    out: list[str] = []
    for p in paths:
        out.append(p)
        if "." in p:
            out.append(p.split(".", 1)[1])
    return out


def _first(model: nn.Module, paths: Sequence[str]) -> str | None:
    for p in _candidates(paths):
        if _get(model, p) is not None:
            return p
    return None


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _mixer_problem(block: nn.Module, mixer: MixerVariant) -> str | None:
    attn = _get(block, mixer.attn)
    if attn is None:
        return f"no attention module {mixer.attn!r}"
    for role, rel in mixer.attn_proj.items():
        if not _has_2d_weight(_get(attn, rel)):
            return f"no attention projection {mixer.attn}.{rel} ({role}) with a 2-D weight"
    return None


def block_mixer(block: nn.Module, spec: ArchitectureSpec) -> MixerVariant | str:
    """The first of the spec's token mixers that ``block`` has, or why none fits."""
    problems = []
    for mixer in spec.mixers:
        problem = _mixer_problem(block, mixer)
        if problem is None:
            return mixer
        problems.append(problem)
    return "; ".join(problems)


def _block_problem(block: nn.Module, spec: ArchitectureSpec) -> str | None:
    """Why ``block`` does not fit ``spec`` (None when it fits)."""
    mixer = block_mixer(block, spec)
    if isinstance(mixer, str):
        return mixer
    mlp = _get(block, spec.mlp)
    if mlp is None:
        return f"no MLP module {spec.mlp!r}"
    for role, rel in spec.mlp_proj.items():
        if not _has_2d_weight(_get(mlp, rel)):
            return f"no MLP projection {spec.mlp}.{rel} ({role}) with a 2-D weight"
    for role, rel in spec.norms.items():
        if _get(block, rel) is None:
            return f"no {role} norm {rel!r}"
    for branch in (spec.attn_residual, spec.mlp_residual):
        if branch is not None and _get(block, branch) is None:
            return f"no residual-branch module {branch!r}"
    for forbidden in spec.forbidden:
        if _get(block, forbidden) is not None:
            return f"has {forbidden!r}, which this spec rules out"
    return None


def match_spec(model: nn.Module, spec: ArchitectureSpec) -> Layout | str:
    """The layout of ``model`` under ``spec``, or a one-line reason it does not fit."""
    blocks_path: str | None = None
    for p in _candidates(spec.blocks):
        mod = _get(model, p)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            blocks_path = p
            break
    if blocks_path is None:
        return f"no block list at {' / '.join(spec.blocks)}"
    blocks = model.get_submodule(blocks_path)
    assert isinstance(blocks, nn.ModuleList)
    for i, block in enumerate(blocks):
        problem = _block_problem(block, spec)
        if problem is not None:
            return f"block {i} ({blocks_path}.{i}): {problem}"
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    embed = _first(model, spec.embed) or _path_of(model, get_in() if callable(get_in) else None)
    if embed is None or not _has_2d_weight(_get(model, embed)):
        return "no token embedding found"
    output = _first(model, spec.output) or _path_of(model, get_out() if callable(get_out) else None)
    if output is not None and not _has_2d_weight(_get(model, output)):
        output = None
    if spec.matches is not None and not spec.matches(model):
        return "the spec's own structural test (matches) rejected the model"
    mixers = [block_mixer(block, spec) for block in blocks]
    return Layout(
        spec=spec,
        blocks=blocks_path,
        n_layers=len(blocks),
        embed=embed,
        output=output,
        final_norm=_first(model, spec.final_norm),
        parallel=spec.is_parallel(getattr(model, "config", None)),
        mixers=[m for m in mixers if isinstance(m, MixerVariant)],
    )


def plugin_specs() -> list[ArchitectureSpec]:
    """Specs registered by plugins (later plugins first), ignoring objects of other types."""
    from spd_host.plugins import get_host

    return [
        s
        for s in get_host().registered("register_architectures")
        if isinstance(s, ArchitectureSpec)
    ]


def detect(model: nn.Module, specs: Sequence[ArchitectureSpec] | None = None) -> Layout:
    """Find the first spec (plugins', then built-in) that fits ``model``; TopologyError if none."""
    candidates = list(specs) if specs is not None else [*plugin_specs(), *BUILTIN_SPECS]
    reasons: list[str] = []
    for spec in candidates:
        result = match_spec(model, spec)
        if isinstance(result, Layout):
            return result
        reasons.append(f"{spec.name}: {result}")
    children = ", ".join(name for name, _ in model.named_children()) or "(none)"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise TopologyError(
        f"cannot map {type(model).__name__} (model_type={model_type!r}, top-level modules: {children}) "
        "onto any known architecture:\n  " + "\n  ".join(reasons),
        hint="known architectures: "
        + ", ".join(s.name for s in candidates)
        + ". Teach the host a new one by registering a spd_host.topology.ArchitectureSpec through "
        "the register_architectures hook (see docs/topology.md).",
    )
