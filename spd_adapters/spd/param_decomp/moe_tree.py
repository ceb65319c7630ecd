"""The restored orbax tree of a qwen36_moe run -> per-site components + the torch MoE CI fn.

Layouts (param-decomp ``core/components.py``, ``core/ci_fn``):

- components: ``components.stacks.<kind> = [Vs, Us]``; dense kinds ``Vs [g, d_in, C]``,
  ``Us [g, C, d_out]``; expert kinds (expert-blocked) ``Vs [g, E, d_in_e, c]``,
  ``Us [g, E, c, d_out_e]`` with ``C = E*c``;
- CI fn (``MoEChunkwiseTransformerCIFn``, optionally under ``backbone``):
  ``chunks.{in_proj_w [n, in, d], in_proj_b [n, d], blocks[i].{wq [n, d, d], wk/wv [n, kv, d],
  wo [n, d, d], expert_gate[r]/expert_up[r] [n, E, d, f], expert_down[r] [n, E, f, d],
  shared_gate/shared_up [n, d, s], shared_down [n, s, d], norm_scales}, heads[j].{w, b}}``
  + ``inv_freq``: a dense head ``w [n, d, C]``, ``b [n, C]``; an expert head ``w [n, E, f, c]``
  (no ``b``). Every chunk leaf leads with the chunk axis (possibly + all-zero placement pads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from spd_adapters.spd.param_decomp import qwen36_moe
from spd_adapters.spd.param_decomp.decomposition import _expect, _Tree
from spd_adapters.spd.param_decomp.launch_config import MoeTransformerCi
from spd_adapters.spd.param_decomp.moe_ci import (
    MoeBlock,
    MoeChunkNet,
    MoeCiFunction,
    MoeCiNet,
    MoeHead,
)
from spd_adapters.spd.param_decomp.qwen36_moe import SiteDims
from spd_adapters.spd.param_decomp.structure import Structure


@dataclass
class MoeDecomposition:
    V: dict[str, Tensor]  # dense site -> [d_in, C]; expert site -> [E, d_in_e, c]
    U: dict[str, Tensor]  # dense site -> [C, d_out]; expert site -> [E, c, d_out_e]
    ci_fn: MoeCiFunction


def read_moe_components(
    tree: _Tree, comp: Any, structure: Structure, dims: dict[str, SiteDims]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    if not isinstance(comp, dict) or "stacks" not in comp:
        have = sorted(comp) if isinstance(comp, dict) else type(comp).__name__
        raise tree.fail(f"components holds no stacks (have: {have})")
    V: dict[str, Tensor] = {}
    U: dict[str, Tensor] = {}
    for site in structure.sites:
        d = dims[site.name]
        nd = 3 if d.n_experts is None else 4
        where = f"components.stacks.{site.group}"
        pair = tree.get(comp["stacks"], site.group, "components.stacks")
        Vs, Us = tree.array(pair, 0, where, nd), tree.array(pair, 1, where, nd)
        n = len(structure.group_sites(site.group))
        if Vs.shape[0] < n or Us.shape[0] < n:
            raise tree.fail(
                f"{where} stacks {Vs.shape[0]} matrices, the config decomposes {n} "
                f"{site.kind!r} sites"
            )
        V[site.name], U[site.name] = tree.t(Vs[site.stack_index]), tree.t(Us[site.stack_index])
        want_v: tuple[int, ...]
        want_u: tuple[int, ...]
        if d.n_experts is None:
            want_v, want_u = (d.d_in, site.C), (site.C, d.d_out)
        else:
            if site.C % d.n_experts:
                raise tree.fail(
                    f"{site.name}: C={site.C} is not a multiple of the target's "
                    f"{d.n_experts} experts"
                )
            c = site.C // d.n_experts
            want_v, want_u = (d.n_experts, d.d_in, c), (d.n_experts, c, d.d_out)
        _expect(tree, f"V of {site.name}", tuple(V[site.name].shape), want_v)
        _expect(tree, f"U of {site.name}", tuple(U[site.name].shape), want_u)
    return V, U


def _moe_block(
    tree: _Tree,
    node: Any,
    path: str,
    c: int,
    ci: MoeTransformerCi,
    n_routers: int,
    n_experts: int,
) -> MoeBlock:
    def arr(parent: Any, key: str | int, where: str, shape: tuple[int, ...]) -> Tensor:
        t = tree.t(tree.array(parent, key, where, len(shape) + 1)[c])
        _expect(tree, f"{where}.{key}", tuple(t.shape), shape)
        return t

    d, f, s = ci.d_model, ci.expert_ffn_hidden, ci.shared_ffn_hidden
    kv = d // ci.attention.n_heads * ci.attention.kv_heads

    def bank(key: str, shape: tuple[int, ...]) -> list[Tensor]:
        banks = tree.get(node, key, path)
        if not isinstance(banks, list) or len(banks) != n_routers:
            n = len(banks) if isinstance(banks, list) else type(banks).__name__
            raise tree.fail(
                f"{path}.{key} holds {n} expert banks, the chunk covers {n_routers} MoE layers"
            )
        return [arr(banks, r, f"{path}.{key}", shape) for r in range(n_routers)]

    norms = node.get("norm_scales") if isinstance(node, dict) else None
    if (norms is not None) != ci.learned_norm_scale:
        raise tree.fail(
            f"{path}.norm_scales is {'present' if norms is not None else 'absent'} but the "
            f"config says learned_norm_scale={ci.learned_norm_scale}"
        )
    scales = None
    if norms is not None:
        scales = (
            arr(norms, 0, f"{path}.norm_scales", (d,)),
            arr(norms, 1, f"{path}.norm_scales", (d,)),
        )
    return MoeBlock(
        wq=arr(node, "wq", path, (d, d)),
        wk=arr(node, "wk", path, (kv, d)),
        wv=arr(node, "wv", path, (kv, d)),
        wo=arr(node, "wo", path, (d, d)),
        expert_gate=bank("expert_gate", (n_experts, d, f)),
        expert_up=bank("expert_up", (n_experts, d, f)),
        expert_down=bank("expert_down", (n_experts, f, d)),
        shared_gate=arr(node, "shared_gate", path, (d, s)),
        shared_up=arr(node, "shared_up", path, (d, s)),
        shared_down=arr(node, "shared_down", path, (s, d)),
        norm_scales=scales,
    )


def read_moe_ci_fn(
    tree: _Tree,
    node: Any,
    ci: MoeTransformerCi,
    structure: Structure,
    tap_width: Any,
    n_experts: int,
) -> MoeCiFunction:
    if isinstance(node, dict) and "backbone" in node:
        node = node["backbone"]
    if not isinstance(node, dict) or "chunks" not in node:
        have = sorted(node) if isinstance(node, dict) else type(node).__name__
        raise tree.fail(
            f"the checkpoint's CI fn has keys {have}, not the moe_chunkwise_transformer layout "
            "(ci_fn.chunks + ci_fn.inv_freq) the config implies"
        )
    ch, p = node["chunks"], "ci_fn.chunks"
    d = ci.d_model
    inv_freq = tree.t(tree.array(node, "inv_freq", "ci_fn", 1))
    _expect(tree, "ci_fn.inv_freq", tuple(inv_freq.shape), (d // ci.attention.n_heads // 2,))
    in_w_all = tree.array(ch, "in_proj_w", p, 3)
    in_b_all = tree.array(ch, "in_proj_b", p, 2)
    if in_w_all.shape[0] < len(structure.nets):
        raise tree.fail(
            f"{p}.in_proj_w stacks {in_w_all.shape[0]} chunks, the config resolves "
            f"{len(structure.nets)}"
        )
    blocks_node = tree.get(ch, "blocks", p)
    if not isinstance(blocks_node, list) or len(blocks_node) != ci.n_blocks:
        n = len(blocks_node) if isinstance(blocks_node, list) else type(blocks_node).__name__
        raise tree.fail(f"{p}.blocks holds {n} blocks, the config says n_blocks={ci.n_blocks}")
    heads_node = tree.get(ch, "heads", p)
    first = structure.nets[0]
    if not isinstance(heads_node, list) or len(heads_node) != len(first.output_sites):
        raise tree.fail(f"{p}.heads must hold one head per chunk site ({len(first.output_sites)})")
    by_name = structure.by_name
    nets: list[MoeCiNet] = []
    for c, route in enumerate(structure.nets):
        n_routers = len(route.routing_layers)
        blocks = [
            _moe_block(tree, b, f"{p}.blocks.{i}", c, ci, n_routers, n_experts)
            for i, b in enumerate(blocks_node)
        ]
        heads = []
        for j, site_name in enumerate(route.output_sites):
            site = by_name[site_name]
            hp = f"{p}.heads.{j}"
            hnode = heads_node[j]
            if site.kind in qwen36_moe.EXPERT_KINDS:
                cpe = site.C // n_experts
                w = tree.t(tree.array(hnode, "w", hp, 4)[c])
                _expect(
                    tree,
                    f"{hp}.w ({site_name})",
                    tuple(w.shape),
                    (n_experts, ci.expert_ffn_hidden, cpe),
                )
                if isinstance(hnode, dict) and hnode.get("b") is not None:
                    raise tree.fail(f"{hp} ({site_name}) is an expert head and has no bias")
                heads.append(MoeHead(w, None, route.routing_layers.index(site.layer)))
            else:
                w = tree.t(tree.array(hnode, "w", hp, 3)[c])
                b = tree.t(tree.array(hnode, "b", hp, 2)[c])
                _expect(tree, f"{hp}.w ({site_name})", tuple(w.shape), (d, site.C))
                _expect(tree, f"{hp}.b ({site_name})", tuple(b.shape), (site.C,))
                heads.append(MoeHead(w, b, None))
        in_dim = sum(tap_width(k) for k in route.input_taps) + n_routers * n_experts
        in_w, in_b = tree.t(in_w_all[c]), tree.t(in_b_all[c])
        _expect(tree, f"chunk {c} in_proj_w", tuple(in_w.shape), (in_dim, d))
        _expect(tree, f"chunk {c} in_proj_b", tuple(in_b.shape), (d,))
        net = MoeChunkNet(
            in_w=in_w,
            in_b=in_b,
            blocks=blocks,
            heads=heads,
            inv_freq=inv_freq,
            n_heads=ci.attention.n_heads,
            n_kv_heads=ci.attention.kv_heads,
            causal=ci.attention.mask == "causal",
            n_experts=n_experts,
        )
        nets.append(MoeCiNet(route.input_taps, route.routing_layers, route.output_sites, net))
    return MoeCiFunction(nets, n_experts)


def build_moe_decomposition(
    restored: dict[str, Any],
    where: Path,
    ci: MoeTransformerCi,
    structure: Structure,
    dims: dict[str, SiteDims],
    tap_width: Any,
    n_experts: int,
    *,
    meta: bool = False,
) -> MoeDecomposition:
    """``meta``: check every key and shape against the config without materialising data."""
    tree = _Tree(restored, where, meta=meta)
    if "components" not in restored or "ci_fn" not in restored:
        raise tree.fail(f"no components/ci_fn in the checkpoint item (have: {sorted(restored)})")
    V, U = read_moe_components(tree, restored["components"], structure, dims)
    fn = read_moe_ci_fn(tree, restored["ci_fn"], ci, structure, tap_width, n_experts)
    return MoeDecomposition(V, U, fn)
