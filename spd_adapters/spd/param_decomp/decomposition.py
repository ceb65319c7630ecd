"""The restored orbax tree -> per-site components and a torch CI function, every shape checked.

Tree layouts read (param-decomp ``core/components.py``, ``core/ci_fn/implementations``):

- components: ``components.stacks.<group> = [Vs [g, d_in, C], Us [g, C, d_out]]`` (current), or
  ``components.vu.<site> = [V [d_in, C], U [C, d_out]]`` (older per-site ``DecompVU``);
- CI fn: ``ci_fn.backbone`` (current, ``BackboneCIFn``) or ``ci_fn`` itself (older), optionally
  wrapped by component conditioning (``backbone`` + ``readouts.<site>``):
  - chunkwise: ``chunks.{in_proj_w [n, in, d], in_proj_b, blocks[i].{wq, wk, wv, wo, w1, b1, w2,
    b2, gate, norm_scales}, out_ws[j] [n, d, C_j], out_bs[j]}`` + ``inv_freq`` — every leaf leads
    with the chunk axis (possibly followed by all-zero placement pads);
  - global: ``in_proj_w [in, d]``, ``in_proj_b``, ``blocks.*`` leading with the depth axis,
    ``heads[g].{weights [s, d, C], biases [s, C]}`` (one stack per group, group order of first
    appearance, sites in site order) + ``inv_freq``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spd_adapters.spd.param_decomp.ci_fns import (
    Arm,
    Block,
    CiNet,
    MlpNet,
    PdCiFunction,
    Readout,
    TransformerNet,
)
from spd_adapters.spd.param_decomp.launch_config import CiConfig, GlobalMlpCi, TransformerCi
from spd_adapters.spd.param_decomp.structure import Structure
from spd_host.errors import FormatError


@dataclass
class PdDecomposition:
    V: dict[str, Tensor]  # site -> [d_in, C]
    U: dict[str, Tensor]  # site -> [C, d_out]
    ci_fn: PdCiFunction


class _Tree:
    """Navigates the restored tree; every miss or bad shape names the checkpoint and key path."""

    def __init__(self, root: Any, where: Path, *, meta: bool = False):
        self.root, self.where, self.meta = root, where, meta

    def t(self, a: np.ndarray) -> Tensor:
        """A float32 torch copy; with ``meta`` a shape-only tensor (validation without data)."""
        if self.meta:
            return torch.empty(a.shape, device="meta")
        return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))

    def fail(self, msg: str) -> FormatError:
        return FormatError(f"{self.where}: {msg}")

    def get(self, node: Any, key: str | int, path: str) -> Any:
        try:
            return node[key]
        except (KeyError, IndexError, TypeError):
            have = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise self.fail(f"no {path}.{key} in the checkpoint tree (have: {have})") from None

    def array(self, node: Any, key: str | int, path: str, ndim: int) -> np.ndarray:
        value = self.get(node, key, path)
        if not isinstance(value, np.ndarray) or value.ndim != ndim:
            shape = getattr(value, "shape", type(value).__name__)
            raise self.fail(f"{path}.{key} must be a {ndim}-d array, got {shape}")
        return value


def _expect(tree: _Tree, what: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise tree.fail(f"{what} has shape {list(got)}, expected {list(want)}")


def read_components(
    tree: _Tree, comp: Any, structure: Structure, dims: dict[str, tuple[int, int]]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    V: dict[str, Tensor] = {}
    U: dict[str, Tensor] = {}
    if isinstance(comp, dict) and "stacks" in comp:
        stacks = comp["stacks"]
        for site in structure.sites:
            pair = tree.get(stacks, site.group, "components.stacks")
            Vs = tree.array(pair, 0, f"components.stacks.{site.group}", 3)
            Us = tree.array(pair, 1, f"components.stacks.{site.group}", 3)
            n = len(structure.group_sites(site.group))
            if Vs.shape[0] < n or Us.shape[0] < n:
                raise tree.fail(
                    f"components.stacks.{site.group} stacks {Vs.shape[0]} matrices, the config "
                    f"decomposes {n} {site.kind!r} sites"
                )
            V[site.name], U[site.name] = tree.t(Vs[site.stack_index]), tree.t(Us[site.stack_index])
    elif isinstance(comp, dict) and "vu" in comp:
        for site in structure.sites:
            pair = tree.get(comp["vu"], site.name, "components.vu")
            V[site.name] = tree.t(tree.array(pair, 0, f"components.vu.{site.name}", 2))
            U[site.name] = tree.t(tree.array(pair, 1, f"components.vu.{site.name}", 2))
    else:
        have = sorted(comp) if isinstance(comp, dict) else type(comp).__name__
        raise tree.fail(f"components holds neither stacks nor vu (have: {have})")
    for site in structure.sites:
        d_in, d_out = dims[site.name]
        _expect(tree, f"V of {site.name}", tuple(V[site.name].shape), (d_in, site.C))
        _expect(tree, f"U of {site.name}", tuple(U[site.name].shape), (site.C, d_out))
    return V, U


def _block(tree: _Tree, node: Any, path: str, index: int, ci: TransformerCi) -> Block:
    """One block's weights; ``index`` selects along every leaf's leading (chunk/depth) axis."""

    def arr(key: str, ndim: int) -> Tensor:
        return tree.t(tree.array(node, key, path, ndim + 1)[index])

    gate_node = node.get("gate") if isinstance(node, dict) else None
    norms = node.get("norm_scales") if isinstance(node, dict) else None
    if (gate_node is not None) != (ci.ffn.kind == "swiglu"):
        raise tree.fail(
            f"{path}.gate is {'present' if gate_node is not None else 'absent'} but the config "
            f"says ffn.kind={ci.ffn.kind!r}"
        )
    if (norms is not None) != ci.learned_norm_scale:
        raise tree.fail(
            f"{path}.norm_scales is {'present' if norms is not None else 'absent'} but the "
            f"config says learned_norm_scale={ci.learned_norm_scale}"
        )
    gate = None
    if gate_node is not None:
        gate = (
            tree.t(tree.array(gate_node, 0, f"{path}.gate", 3)[index]),
            tree.t(tree.array(gate_node, 1, f"{path}.gate", 2)[index]),
        )
    scales = None
    if norms is not None:
        scales = (
            tree.t(tree.array(norms, 0, f"{path}.norm_scales", 2)[index]),
            tree.t(tree.array(norms, 1, f"{path}.norm_scales", 2)[index]),
        )
    blk = Block(
        wq=arr("wq", 2),
        wk=arr("wk", 2),
        wv=arr("wv", 2),
        wo=arr("wo", 2),
        w1=arr("w1", 2),
        b1=arr("b1", 1),
        w2=arr("w2", 2),
        b2=arr("b2", 1),
        gate=gate,
        norm_scales=scales,
    )
    d, h = ci.d_model, ci.ffn.hidden
    kv = d // ci.attention.n_heads * ci.attention.kv_heads
    for name, t, want in [
        ("wq", blk.wq, (d, d)),
        ("wk", blk.wk, (kv, d)),
        ("wv", blk.wv, (kv, d)),
        ("wo", blk.wo, (d, d)),
        ("w1", blk.w1, (d, h)),
        ("b1", blk.b1, (h,)),
        ("w2", blk.w2, (h, d)),
        ("b2", blk.b2, (d,)),
    ]:
        _expect(tree, f"{path}.{name}", tuple(t.shape), want)
    return blk


def _net(
    tree: _Tree,
    ci: TransformerCi,
    in_w: Tensor,
    in_b: Tensor,
    blocks: list[Block],
    heads: list[tuple[Tensor, Tensor]],
    inv_freq: Tensor,
    in_dim: int,
    cs: list[int],
    where: str,
) -> TransformerNet:
    d = ci.d_model
    _expect(tree, f"{where}in_proj_w", tuple(in_w.shape), (in_dim, d))
    _expect(tree, f"{where}in_proj_b", tuple(in_b.shape), (d,))
    _expect(tree, "inv_freq", tuple(inv_freq.shape), (d // ci.attention.n_heads // 2,))
    for j, ((w, b), C) in enumerate(zip(heads, cs, strict=True)):
        _expect(tree, f"{where}output head {j}", tuple(w.shape), (d, C))
        _expect(tree, f"{where}output bias {j}", tuple(b.shape), (C,))
    return TransformerNet(
        in_w=in_w,
        in_b=in_b,
        blocks=blocks,
        head_ws=[w for w, _ in heads],
        head_bs=[b for _, b in heads],
        inv_freq=inv_freq,
        n_heads=ci.attention.n_heads,
        n_kv_heads=ci.attention.kv_heads,
        causal=ci.attention.mask == "causal",
    )


def read_global_mlp(
    tree: _Tree,
    node: Any,
    ci: GlobalMlpCi,
    structure: Structure,
    tap_width: Callable[[str], int],
) -> PdCiFunction:
    """``ci_fn.mlp.{weights, biases}`` (``GlobalMLPCIFn`` is not wrapped in a backbone)."""
    if not isinstance(node, dict) or "mlp" not in node:
        have = sorted(node) if isinstance(node, dict) else type(node).__name__
        raise tree.fail(
            f"the checkpoint's CI fn has keys {have}, not the global_mlp layout (ci_fn.mlp) the "
            f"config's decomposition.ci.type='global_mlp' implies"
        )
    mlp = node["mlp"]
    ws, bs = tree.get(mlp, "weights", "ci_fn.mlp"), tree.get(mlp, "biases", "ci_fn.mlp")
    route = structure.nets[0]
    sizes = [structure.by_name[s].C for s in route.output_sites]
    dims = [sum(tap_width(k) for k in route.input_taps), *ci.hidden_dims, sum(sizes)]
    n = len(dims) - 1
    if not isinstance(ws, list) or not isinstance(bs, list) or len(ws) != n or len(bs) != n:
        raise tree.fail(f"ci_fn.mlp must hold {n} layers (hidden_dims={ci.hidden_dims})")
    weights = [tree.t(tree.array(ws, i, "ci_fn.mlp.weights", 2)) for i in range(n)]
    biases = [tree.t(tree.array(bs, i, "ci_fn.mlp.biases", 1)) for i in range(n)]
    for i in range(n):
        _expect(tree, f"ci_fn.mlp.weights.{i}", tuple(weights[i].shape), (dims[i], dims[i + 1]))
        _expect(tree, f"ci_fn.mlp.biases.{i}", tuple(biases[i].shape), (dims[i + 1],))
    net = MlpNet(weights, biases, sizes)
    return PdCiFunction(ci.type, [CiNet(route.input_taps, route.output_sites, net)], None)


def read_ci_fn(
    tree: _Tree,
    node: Any,
    ci: CiConfig,
    structure: Structure,
    tap_width: Callable[[str], int],
) -> PdCiFunction:
    if isinstance(ci, GlobalMlpCi):
        return read_global_mlp(tree, node, ci, structure, tap_width)
    if not isinstance(ci, TransformerCi):  # the MoE fn has its own reader (moe_tree)
        raise tree.fail(f"decomposition.ci.type={ci.type!r} is not read here")
    readouts_node = None
    if isinstance(node, dict) and "backbone" in node:
        node = node["backbone"]
    if isinstance(node, dict) and "readouts" in node:
        readouts_node, node = node["readouts"], tree.get(node, "backbone", "ci_fn.backbone")
    if (readouts_node is not None) != (ci.component_conditioning is not None):
        raise tree.fail(
            "ci_fn readouts are "
            + ("present" if readouts_node is not None else "absent")
            + " but the config's component_conditioning is "
            + ("unset" if ci.component_conditioning is None else "set")
        )
    if not isinstance(node, dict):
        raise tree.fail(f"ci_fn is a {type(node).__name__}, expected a CI network")
    kind = (
        "chunkwise_transformer"
        if "chunks" in node
        else "global_transformer"
        if "heads" in node
        else None
    )
    if kind != ci.type:
        raise tree.fail(
            f"the checkpoint's CI fn is {kind or 'of an unknown layout'} (keys {sorted(node)}), "
            f"the config says decomposition.ci.type={ci.type!r}"
        )
    inv_freq = tree.t(tree.array(node, "inv_freq", "ci_fn", 1))
    cs = {s.name: s.C for s in structure.sites}
    nets: list[CiNet] = []
    if kind == "chunkwise_transformer":
        ch = node["chunks"]
        p = "ci_fn.chunks"
        in_w_all = tree.array(ch, "in_proj_w", p, 3)
        in_b_all = tree.array(ch, "in_proj_b", p, 2)
        blocks_node = tree.get(ch, "blocks", p)
        if not isinstance(blocks_node, list) or len(blocks_node) != ci.n_blocks:
            n = len(blocks_node) if isinstance(blocks_node, list) else type(blocks_node).__name__
            raise tree.fail(f"{p}.blocks holds {n} blocks, the config says n_blocks={ci.n_blocks}")
        out_ws = tree.get(ch, "out_ws", p)
        out_bs = tree.get(ch, "out_bs", p)
        n_slots = len(structure.nets[0].output_sites)
        if not isinstance(out_ws, list) or len(out_ws) != n_slots or len(out_bs) != n_slots:
            raise tree.fail(f"{p}.out_ws must hold one head per chunk site ({n_slots})")
        if in_w_all.shape[0] < len(structure.nets):
            raise tree.fail(
                f"{p}.in_proj_w stacks {in_w_all.shape[0]} chunks, the config resolves "
                f"{len(structure.nets)}"
            )
        for c, route in enumerate(structure.nets):
            blocks = [_block(tree, b, f"{p}.blocks.{i}", c, ci) for i, b in enumerate(blocks_node)]
            heads = [
                (
                    tree.t(tree.array(out_ws, j, f"{p}.out_ws", 3)[c]),
                    tree.t(tree.array(out_bs, j, f"{p}.out_bs", 2)[c]),
                )
                for j in range(n_slots)
            ]
            in_dim = sum(tap_width(k) for k in route.input_taps)
            net = _net(
                tree,
                ci,
                tree.t(in_w_all[c]),
                tree.t(in_b_all[c]),
                blocks,
                heads,
                inv_freq,
                in_dim,
                [cs[s] for s in route.output_sites],
                f"chunk {c} ",
            )
            nets.append(CiNet(route.input_taps, route.output_sites, net))
    else:
        blocks_node = tree.get(node, "blocks", "ci_fn")
        depth = tree.array(blocks_node, "wq", "ci_fn.blocks", 3).shape[0]
        if depth != ci.n_blocks:
            raise tree.fail(f"ci_fn.blocks stacks {depth} blocks, the config says {ci.n_blocks}")
        blocks = [_block(tree, blocks_node, "ci_fn.blocks", i, ci) for i in range(depth)]
        heads_node = tree.get(node, "heads", "ci_fn")
        groups: dict[str, list[str]] = {}
        for s in structure.sites:
            groups.setdefault(s.group, []).append(s.name)
        if not isinstance(heads_node, list) or len(heads_node) != len(groups):
            raise tree.fail(f"ci_fn.heads must hold one stack per group {list(groups)}")
        head_of: dict[str, tuple[Tensor, Tensor]] = {}
        for g, (group, names) in enumerate(groups.items()):
            w = tree.array(heads_node[g], "weights", f"ci_fn.heads.{g}", 3)
            b = tree.array(heads_node[g], "biases", f"ci_fn.heads.{g}", 2)
            if w.shape[0] != len(names):
                raise tree.fail(
                    f"ci_fn.heads.{g} ({group!r}) stacks {w.shape[0]} heads, expected {len(names)}"
                )
            for s_idx, name in enumerate(names):
                head_of[name] = (tree.t(w[s_idx]), tree.t(b[s_idx]))
        route = structure.nets[0]
        in_dim = sum(tap_width(k) for k in route.input_taps)
        net = _net(
            tree,
            ci,
            tree.t(tree.array(node, "in_proj_w", "ci_fn", 2)),
            tree.t(tree.array(node, "in_proj_b", "ci_fn", 1)),
            blocks,
            [head_of[s] for s in route.output_sites],
            inv_freq,
            in_dim,
            [cs[s] for s in route.output_sites],
            "",
        )
        nets.append(CiNet(route.input_taps, route.output_sites, net))
    readouts = None
    if readouts_node is not None:
        readouts = {}
        for s in structure.sites:
            r = tree.get(readouts_node, s.name, "ci_fn.readouts")
            rp = f"ci_fn.readouts.{s.name}"

            def arm(node: Any, path: str, C: int) -> Arm:
                vals = [
                    tree.t(tree.array(node, k, path, 1))
                    for k in ("input_scale", "input_bias", "output_scale")
                ]
                for k, v in zip(("input_scale", "input_bias", "output_scale"), vals, strict=True):
                    _expect(tree, f"{path}.{k}", tuple(v.shape), (C,))
                return Arm(*vals)

            bias = tree.t(tree.array(r, "bias", rp, 1))
            _expect(tree, f"{rp}.bias", tuple(bias.shape), (s.C,))
            readouts[s.name] = Readout(
                arm(tree.get(r, "positive", rp), f"{rp}.positive", s.C),
                arm(tree.get(r, "negative", rp), f"{rp}.negative", s.C),
                bias,
            )
    return PdCiFunction(ci.type, nets, readouts)


def build_decomposition(
    restored: dict[str, Any],
    where: Path,
    ci: CiConfig,
    structure: Structure,
    dims: dict[str, tuple[int, int]],
    tap_width: Callable[[str], int],
    *,
    meta: bool = False,
) -> PdDecomposition:
    """``meta``: check every key and shape against the config without materialising data."""
    tree = _Tree(restored, where, meta=meta)
    V, U = read_components(tree, restored["components"], structure, dims)
    fn = read_ci_fn(tree, restored["ci_fn"], ci, structure, tap_width)
    return PdDecomposition(V, U, fn)
