"""What a run's config says the decomposition looks like: sites, their order, groups, CI routing.

Mirrors param-decomp's resolution (``experiments/lm/config.py``): the ``decomposition.sites``
spec tiles one C per matrix kind over the selected layers; the site order is layer-ascending,
then the family's canonical kind order; site names are torch module paths relative to the
decoder (``glu_transformer``: ``layers.{i}.self_attn.{q,k,v,o}_proj``,
``layers.{i}.mlp.{gate,up,down}_proj``; ``simple_mlp``: ``h.{i}.attn.{q,k,v,o}_proj``,
``h.{i}.mlp.{c_fc,down_proj}``).
V/U persist stacked per *group*, and an LM target's group is the matrix kind, so site
``(layer, kind)`` sits at its layer's rank among the decomposed layers in stack ``kind``.

Input taps (``targets/transformer_taps.py``): ``resid.{b}`` is the raw residual stream entering
block ``b`` (``resid.{n_layer}`` leaves the last block); per-block ``attn_in.{b}``,
``attn_out.{b}``, ``mlp_in.{b}``, ``mlp_hidden.{b}`` are the inputs of the q/k/v, o, gate/up and
down projections.
"""

from __future__ import annotations

from dataclasses import dataclass

from spd_adapters.spd.param_decomp import qwen36_moe
from spd_adapters.spd.param_decomp.launch_config import (
    LaunchConfig,
    ResidualBoundaries,
)

SITE_INPUT_TAPS = ("attn_in", "attn_out", "mlp_in", "mlp_hidden")

_GLU_SUBMODULE = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn"}
_INPUT_TAP = {
    # glu_transformer (HF Llama / Qwen3)
    "q": "attn_in",
    "k": "attn_in",
    "v": "attn_in",
    "o": "attn_out",
    "gate": "mlp_in",
    "up": "mlp_in",
    "down": "mlp_hidden",
    # simple_mlp (Goodfire's LlamaSimpleMLP)
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "c_fc": "mlp_in",
    "down_proj": "mlp_hidden",
}


def glu_site_name(layer: int, kind: str) -> str:
    return f"layers.{layer}.{_GLU_SUBMODULE.get(kind, 'mlp')}.{kind}_proj"


def simple_mlp_site_name(layer: int, kind: str) -> str:
    """``h.{i}.attn.{q,k,v,o}_proj`` / ``h.{i}.mlp.{c_fc,down_proj}`` (``targets/llama_simple_mlp``)."""
    return f"h.{layer}.{'mlp' if kind in ('c_fc', 'down_proj') else 'attn'}.{kind}"


SITE_NAMERS = {
    "glu_transformer": glu_site_name,
    "simple_mlp": simple_mlp_site_name,
    "qwen36_moe": qwen36_moe.site_name,
}


@dataclass(frozen=True)
class SiteInfo:
    name: str
    layer: int
    kind: str
    C: int
    group: str
    stack_index: int

    @property
    def input_tap(self) -> str:
        return f"{_INPUT_TAP[self.kind]}.{self.layer}"


@dataclass(frozen=True)
class NetRouting:
    input_taps: tuple[str, ...]
    output_sites: tuple[str, ...]
    # moe_chunkwise_transformer: the target layers whose routing the chunk dispatches on
    routing_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class Structure:
    family: str
    sites: tuple[SiteInfo, ...]
    layers: tuple[int, ...]
    kinds: tuple[str, ...]
    nets: tuple[NetRouting, ...]

    @property
    def by_name(self) -> dict[str, SiteInfo]:
        return {s.name: s for s in self.sites}

    def group_sites(self, group: str) -> list[SiteInfo]:
        return [s for s in self.sites if s.group == group]


def _taps(
    tap_sel: object,
    layers: tuple[int, ...],
    n_layer: int,
    kinds: tuple[str, ...] = (),
    block_taps: tuple[str, ...] = SITE_INPUT_TAPS,
) -> tuple[str, ...]:
    if tap_sel == "all_site_inputs":
        # older chunk tap (param-decomp ``_chunk_input_taps``): one tap per decomposed site of
        # the group, block by block in kind order, each the site's own input (q/k/v repeat
        # attn_in); normed and concatenated like every other tap
        return tuple(f"{_INPUT_TAP[k]}.{b}" for b in layers for k in kinds)
    if tap_sel == "first_block_resid":
        return (f"resid.{layers[0]}",)
    if tap_sel == "all_block_resids":
        return tuple(f"resid.{b}" for b in layers)
    if tap_sel == "all_block_taps":
        return tuple(f"{name}.{b}" for b in layers for name in block_taps)
    if isinstance(tap_sel, ResidualBoundaries):
        start, span = layers[0], layers[-1] + 1 - layers[0]
        if tap_sel.offsets != sorted(set(tap_sel.offsets)) or tap_sel.offsets[-1] > span:
            raise ValueError(f"residual boundary offsets {tap_sel.offsets} outside 0..{span}")
        return tuple(f"resid.{start + o}" for o in tap_sel.offsets)
    raise ValueError(f"input_tap {tap_sel!r} is not supported by spd-host")


def _resolve_qwen36(cfg: LaunchConfig, n_layer: int, full_attention: frozenset[int]) -> Structure:
    """Every kind on every layer that has it (slot = rank among those layers); one chunk per
    ``blocks_per_chunk`` consecutive layers, its sites layer-ascending then kind order."""
    spec, ci = cfg.decomposition.sites, cfg.decomposition.ci
    kinds = spec.kinds()
    rank: dict[str, int] = {}
    sites = []
    for layer in range(n_layer):
        for kind in kinds:
            if qwen36_moe.layer_has(kind, layer, full_attention):
                slot = rank.get(kind, 0)
                rank[kind] = slot + 1
                sites.append(
                    SiteInfo(
                        qwen36_moe.site_name(layer, kind), layer, kind, spec.cs[kind], kind, slot
                    )
                )
    per = getattr(ci, "blocks_per_chunk", None) or 0
    # chunks group the decomposed BLOCKS (layers carrying a site), as param-decomp's resolver
    layers = tuple(sorted({s.layer for s in sites}))
    if not per or len(layers) % per:
        raise ValueError(f"{len(layers)} decomposed blocks not divisible by blocks_per_chunk={per}")
    interval = min(full_attention) + 1 if full_attention else per
    if per != interval:
        raise ValueError(
            f"blocks_per_chunk={per} is not the target's full_attention_interval={interval} "
            "(a moe_chunkwise_transformer chunk is one stage)"
        )
    nets = tuple(
        NetRouting(
            # qwen36_moe has no dense MLP hidden: its block taps are the other three
            _taps(ci.input_tap, layers[i : i + per], n_layer, block_taps=SITE_INPUT_TAPS[:3]),
            tuple(s.name for s in sites if s.layer in layers[i : i + per]),
            layers[i : i + per],
        )
        for i in range(0, len(layers), per)
    )
    return Structure(spec.kind, tuple(sites), layers, kinds, nets)


def resolve_structure(
    cfg: LaunchConfig, n_layer: int, full_attention: frozenset[int] = frozenset()
) -> Structure:
    """Sites + per-network routing; raises ``ValueError`` (the caller names the config file).
    ``full_attention``: the full-attention layers of a qwen36_moe target."""
    spec, ci = cfg.decomposition.sites, cfg.decomposition.ci
    if spec.kind == "qwen36_moe":
        return _resolve_qwen36(cfg, n_layer, full_attention)
    name_of = SITE_NAMERS[spec.kind]
    kinds = spec.kinds()
    layers = spec.layer_indices(n_layer)
    sites = tuple(
        SiteInfo(name_of(layer, kind), layer, kind, spec.cs[kind], kind, rank)
        for rank, layer in enumerate(layers)
        for kind in kinds
    )
    # layer-ascending, then kind order (the enumeration above already is)
    if ci.type == "chunkwise_transformer":
        per = ci.blocks_per_chunk or 0
        if len(layers) % per:
            raise ValueError(
                f"{len(layers)} decomposed blocks not divisible by blocks_per_chunk={per}"
            )
        nets = tuple(
            NetRouting(
                _taps(ci.input_tap, layers[i : i + per], n_layer, kinds),
                tuple(name_of(b, k) for b in layers[i : i + per] for k in kinds),
            )
            for i in range(0, len(layers), per)
        )
    else:
        nets = (
            NetRouting(_taps(ci.input_tap, layers, n_layer, kinds), tuple(s.name for s in sites)),
        )
    return Structure(spec.kind, sites, layers, kinds, nets)
