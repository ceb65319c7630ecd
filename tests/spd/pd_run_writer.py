"""Writes param-decomp (JAX) run directories in the exact on-disk layout of its trainer.

The checkpoint trees are built from registered dataclasses with the field names of
param-decomp's own equinox modules and dataclasses (``core/train.py`` ``Decomposition``,
``core/components.py`` ``ComponentStacks``, ``core/ci_fn/implementations/...`` backbones,
blocks, head stacks, readouts; the older ``DecompVU`` / ``ChunkwiseTransformerCIFn`` /
``ChunkTransformer`` / ``CIBlock`` and the pre-split ``TrainState``), and saved with orbax's
``CheckpointManager`` exactly as ``core/checkpoint.py`` saves them: a ``Composite`` of the
``decomposition`` and ``training`` items (older runs: one ``default`` item). Static fields
(site names, routing, placement) are not array leaves, so they are not written, as in the real
checkpoints. The target is a tiny HF Llama saved with ``save_pretrained`` (+ the demo tokenizer).
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

jax = __import__("pytest").importorskip("jax")
ocp = __import__("pytest").importorskip("orbax.checkpoint")
import jax.numpy as jnp  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from spd_host.demo import demo_model_dir  # noqa: E402

VOCAB = 2048
GLU_SUB = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn"}


def _dc(name: str, fields: list[str]) -> type:
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


# current layout
Decomposition = _dc("Decomposition", ["components", "ci_fn"])
ComponentStacks = _dc("ComponentStacks", ["stacks"])
BackboneCIFn = _dc("BackboneCIFn", ["backbone"])
ChunkwiseTransformerBackbone = _dc("ChunkwiseTransformerBackbone", ["chunks", "inv_freq"])
CIFnTransformer = _dc("CIFnTransformer", ["in_proj_w", "in_proj_b", "blocks", "out_ws", "out_bs"])
CIFnBlock = _dc(
    "CIFnBlock", ["wq", "wk", "wv", "wo", "w1", "b1", "w2", "b2", "gate", "norm_scales"]
)
GlobalTransformerBackbone = _dc(
    "GlobalTransformerBackbone", ["in_proj_w", "in_proj_b", "blocks", "heads", "inv_freq"]
)
CIFnHeadStack = _dc("CIFnHeadStack", ["weights", "biases"])
ComponentConditioned = _dc("ComponentConditioned", ["backbone", "readouts"])
ComponentActivationReadout = _dc("ComponentActivationReadout", ["positive", "negative", "bias"])
ClampedAffineArm = _dc("ClampedAffineArm", ["input_scale", "input_bias", "output_scale"])
TrainingItem = _dc("TrainingItem", ["objective", "step"])
GlobalMLPCIFn = _dc("GlobalMLPCIFn", ["mlp"])
SiteMLP = _dc("SiteMLP", ["weights", "biases"])
# older layout
DecompVU = _dc("DecompVU", ["vu"])
ChunkwiseTransformerCIFn = _dc("ChunkwiseTransformerCIFn", ["chunks", "inv_freq"])
ChunkTransformer = _dc("ChunkTransformer", ["in_proj_w", "in_proj_b", "blocks", "out_ws", "out_bs"])
CIBlock = _dc("CIBlock", ["wq", "wk", "wv", "wo", "w1", "b1", "w2", "b2"])
TrainState = _dc(
    "TrainState",
    ["components", "ci_fn", "components_opt_state", "ci_fn_opt_state", "adversaries", "step"],
)


def tiny_llama(seed: int = 0, n_layer: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=n_layer,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen3(seed: int = 0) -> Any:
    """A tiny HF Qwen3 (per-head q/k RMSNorm, explicit head_dim): another glu_transformer target."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=6,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return Qwen3ForCausalLM(cfg).eval()


def site_name(layer: int, kind: str, family: str = "glu_transformer") -> str:
    if family == "simple_mlp":
        return f"h.{layer}.{'mlp' if kind in ('c_fc', 'down_proj') else 'attn'}.{kind}"
    return f"layers.{layer}.{GLU_SUB.get(kind, 'mlp')}.{kind}_proj"


def module_path(spec: RunSpec, layer: int, kind: str) -> str:
    """Where the site sits in the torch model: HF nests the decoder under ``model.``."""
    name = site_name(layer, kind, spec.family)
    return name if spec.family == "simple_mlp" else f"model.{name}"


@dataclasses.dataclass
class RunSpec:
    """What to write: sites, CI config (the YAML ``decomposition.ci`` dict) and layout."""

    cs: dict[str, int]
    ci: dict[str, Any]
    layers: tuple[int, ...] = (0, 1)
    layout: str = "current"  # "current" | "legacy"
    config_name: str = "launch_config.yaml"
    stack_pad: int = 0  # trailing all-zero placement pads on the chunk stack
    family: str = "glu_transformer"  # or "simple_mlp" (Goodfire's LlamaSimpleMLP)
    target_spec: dict[str, Any] | None = None  # overrides the launch config's target.spec

    @property
    def kinds(self) -> list[str]:
        order = SIMPLE_KIND_ORDER if self.family == "simple_mlp" else KIND_ORDER
        return [k for k in order if k in self.cs]


KIND_ORDER = ("q", "k", "v", "o", "gate", "up", "down")
SIMPLE_KIND_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "down_proj")


def sites_of(spec: RunSpec) -> list[tuple[int, str]]:
    return [(layer, k) for layer in spec.layers for k in spec.kinds]


def _rng_arrays(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _block(
    rng: np.random.Generator, lead: tuple[int, ...], d: int, kv: int, h: int, ci: dict[str, Any]
) -> dict[str, Any]:
    swiglu = ci["ffn"]["kind"] == "swiglu"
    out: dict[str, Any] = {
        "wq": _rng_arrays(rng, (*lead, d, d), 0.6),
        "wk": _rng_arrays(rng, (*lead, kv, d), 0.6),
        "wv": _rng_arrays(rng, (*lead, kv, d), 0.6),
        "wo": _rng_arrays(rng, (*lead, d, d), 0.4),
        "w1": _rng_arrays(rng, (*lead, d, h), 0.5),
        "b1": _rng_arrays(rng, (*lead, h), 0.2),
        "w2": _rng_arrays(rng, (*lead, h, d), 0.4),
        "b2": _rng_arrays(rng, (*lead, d), 0.2),
        "gate": (
            (_rng_arrays(rng, (*lead, d, h), 0.5), _rng_arrays(rng, (*lead, h), 0.2))
            if swiglu
            else None
        ),
        "norm_scales": (
            (
                1 + _rng_arrays(rng, (*lead, d), 0.3),
                1 + _rng_arrays(rng, (*lead, d), 0.3),
            )
            if ci.get("learned_norm_scale")
            else None
        ),
    }
    return out


def tap_width(tap: str, model: Any) -> int:
    name = tap.rsplit(".", 1)[0]
    layer0 = model.h[0] if hasattr(model, "h") else model.model.layers[0]
    attn = layer0.attn if hasattr(layer0, "attn") else layer0.self_attn
    if name == "attn_out":
        return attn.o_proj.in_features
    if name == "mlp_hidden":
        return layer0.mlp.down_proj.in_features
    return attn.q_proj.in_features


# what each matrix kind reads (older runs' chunk tap ``all_site_inputs``: one tap per site)
SITE_INPUT = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_out"}
SITE_INPUT |= {"gate": "mlp_in", "up": "mlp_in", "down": "mlp_hidden"}
SITE_INPUT |= {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in"}
SITE_INPUT |= {"o_proj": "attn_out", "c_fc": "mlp_in", "down_proj": "mlp_hidden"}


def input_taps(ci: dict[str, Any], blocks: list[int], kinds: Any = ()) -> list[str]:
    sel = ci.get("input_tap", "first_block_resid")
    if sel == "all_site_inputs":  # each decomposed site's input, block by block, kind order
        return [f"{SITE_INPUT[k]}.{b}" for b in blocks for k in kinds]
    if sel == "first_block_resid":
        return [f"resid.{blocks[0]}"]
    if sel == "all_block_resids":
        return [f"resid.{b}" for b in blocks]
    if sel == "all_block_taps":
        return [f"{n}.{b}" for b in blocks for n in ("attn_in", "attn_out", "mlp_in", "mlp_hidden")]
    return [f"resid.{blocks[0] + o}" for o in sel["offsets"]]


def make_params(spec: RunSpec, model: Any, seed: int = 5) -> dict[str, Any]:
    """Random decomposition params as plain numpy, keyed for both writer and reference."""
    rng = np.random.default_rng(seed)
    ci = spec.ci
    if ci["type"] == "global_mlp":
        return _mlp_params(spec, model, rng)
    d, nh = ci["d_model"], ci["attention"]["n_heads"]
    kvh = ci["attention"].get("n_kv_heads", nh)
    kv, h, hd = d // nh * kvh, ci["ffn"]["hidden"], d // nh
    sites = sites_of(spec)
    VU = {}
    for layer, kind in sites:
        mod = model.get_submodule(module_path(spec, layer, kind))
        C = spec.cs[kind]
        VU[(layer, kind)] = (
            _rng_arrays(rng, (mod.in_features, C), 1.0 / mod.in_features**0.25),
            _rng_arrays(rng, (C, mod.out_features), C**-0.5),
        )
    inv_freq = (1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))).astype(np.float32)
    p: dict[str, Any] = {"VU": VU, "inv_freq": inv_freq}
    if ci["type"] == "chunkwise_transformer":
        per = ci["blocks_per_chunk"]
        groups = [list(spec.layers[i : i + per]) for i in range(0, len(spec.layers), per)]
        n = len(groups) + spec.stack_pad
        in_dim = sum(tap_width(t, model) for t in input_taps(ci, groups[0], spec.kinds))
        slots = [(li, k) for li in range(per) for k in spec.kinds]
        p["groups"] = groups
        p["in_w"] = _rng_arrays(rng, (n, in_dim, d), 0.5)
        p["in_b"] = _rng_arrays(rng, (n, d), 0.2)
        p["blocks"] = [_block(rng, (n,), d, kv, h, ci) for _ in range(ci["n_blocks"])]
        p["out_ws"] = [_rng_arrays(rng, (n, d, spec.cs[k]), 0.6) for _, k in slots]
        p["out_bs"] = [0.4 + _rng_arrays(rng, (n, spec.cs[k]), 0.3) for _, k in slots]
        if spec.stack_pad:
            for arr in [p["in_w"], p["in_b"], *p["out_ws"], *p["out_bs"]]:
                arr[len(groups) :] = 0
    else:
        in_dim = sum(tap_width(t, model) for t in input_taps(ci, list(spec.layers), spec.kinds))
        p["in_w"] = _rng_arrays(rng, (in_dim, d), 0.5)
        p["in_b"] = _rng_arrays(rng, (d,), 0.2)
        p["blocks"] = _block(rng, (ci["n_blocks"],), d, kv, h, ci)
        kinds = spec.kinds
        p["heads"] = {
            k: (
                _rng_arrays(rng, (len(spec.layers), d, spec.cs[k]), 0.6),
                0.4 + _rng_arrays(rng, (len(spec.layers), spec.cs[k]), 0.3),
            )
            for k in kinds
        }
    if ci.get("component_conditioning"):
        p["readouts"] = {
            (layer, kind): {
                arm: tuple(
                    (1 + _rng_arrays(rng, (spec.cs[kind],), 0.3))
                    if i != 1
                    else _rng_arrays(rng, (spec.cs[kind],), 0.3)
                    for i in range(3)
                )
                for arm in ("positive", "negative")
            }
            | {"bias": _rng_arrays(rng, (spec.cs[kind],), 0.2)}
            for layer, kind in sites
        }
    return p


def _vu(spec: RunSpec, model: LlamaForCausalLM, rng: np.random.Generator) -> dict:
    VU = {}
    for layer, kind in sites_of(spec):
        mod = model.get_submodule(module_path(spec, layer, kind))
        C = spec.cs[kind]
        VU[(layer, kind)] = (
            _rng_arrays(rng, (mod.in_features, C), 1.0 / mod.in_features**0.25),
            _rng_arrays(rng, (C, mod.out_features), C**-0.5),
        )
    return VU


def _mlp_params(spec: RunSpec, model: Any, rng: np.random.Generator) -> dict:
    ci = spec.ci
    VU = _vu(spec, model, rng)
    in_dim = sum(tap_width(t, model) for t in input_taps(ci, list(spec.layers), spec.kinds))
    total_c = sum(spec.cs[k] for _, k in sites_of(spec))
    dims = [in_dim, *ci["hidden_dims"], total_c]
    weights = [_rng_arrays(rng, (a, b), 1.2 / a**0.5) for a, b in itertools.pairwise(dims)]
    biases = [0.4 + _rng_arrays(rng, (b,), 0.3) for b in dims[1:]]
    return {"VU": VU, "mlp": (weights, biases)}


def _jnp(tree: Any) -> Any:
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _block_tree(b: dict[str, Any], cls: type) -> Any:
    if cls is CIBlock:
        return CIBlock(**{k: b[k] for k in ("wq", "wk", "wv", "wo", "w1", "b1", "w2", "b2")})
    return CIFnBlock(**b)


def decomposition_tree(spec: RunSpec, p: dict[str, Any]) -> Any:
    sites = sites_of(spec)
    legacy = spec.layout == "legacy"
    if legacy:
        components = DecompVU(vu={site_name(*s, spec.family): p["VU"][s] for s in sites})
    else:
        kinds = spec.kinds
        components = ComponentStacks(
            stacks={
                k: (
                    np.stack([p["VU"][(layer, k)][0] for layer in spec.layers]),
                    np.stack([p["VU"][(layer, k)][1] for layer in spec.layers]),
                )
                for k in kinds
            }
        )
    if spec.ci["type"] == "global_mlp":  # GlobalMLPCIFn is not wrapped in a backbone
        weights, biases = p["mlp"]
        return _jnp(
            Decomposition(components=components, ci_fn=GlobalMLPCIFn(SiteMLP(weights, biases)))
        )
    if spec.ci["type"] == "chunkwise_transformer":
        chunk_cls = ChunkTransformer if legacy else CIFnTransformer
        block_cls = CIBlock if legacy else CIFnBlock
        chunks = chunk_cls(
            in_proj_w=p["in_w"],
            in_proj_b=p["in_b"],
            blocks=[_block_tree(b, block_cls) for b in p["blocks"]],
            out_ws=tuple(p["out_ws"]),
            out_bs=tuple(p["out_bs"]),
        )
        net: Any = (
            ChunkwiseTransformerCIFn(chunks=chunks, inv_freq=p["inv_freq"])
            if legacy
            else ChunkwiseTransformerBackbone(chunks=chunks, inv_freq=p["inv_freq"])
        )
    else:
        net = GlobalTransformerBackbone(
            in_proj_w=p["in_w"],
            in_proj_b=p["in_b"],
            blocks=CIFnBlock(**p["blocks"]),
            heads=tuple(CIFnHeadStack(weights=w, biases=b) for w, b in p["heads"].values()),
            inv_freq=p["inv_freq"],
        )
    if "readouts" in p:
        net = ComponentConditioned(
            backbone=net,
            readouts={
                site_name(*s, spec.family): ComponentActivationReadout(
                    positive=ClampedAffineArm(*r["positive"]),
                    negative=ClampedAffineArm(*r["negative"]),
                    bias=r["bias"],
                )
                for s, r in p["readouts"].items()
            },
        )
    ci_fn = net if legacy else BackboneCIFn(backbone=net)
    return _jnp(Decomposition(components=components, ci_fn=ci_fn))


PRETRAINED_SPEC = {
    "kind": "pretrained",
    "model_class": "param_decomp.pretrain.models.llama_simple_mlp.LlamaSimpleMLP",
    "run_path": "goodfire/spd/runs/tinysmlp",
}


def launch_config(spec: RunSpec, target_dir: Path, model: Any) -> dict[str, Any]:
    hf = {
        "kind": "hf",
        "model_class": f"transformers.{type(model).__name__}",
        "model_name": str(target_dir),
    }
    return {
        "run_name": "tiny-pd",
        "target": {
            "spec": spec.target_spec or (PRETRAINED_SPEC if spec.family == "simple_mlp" else hf),
            "weights_dtype": "float32",
            "output_edge": {"kind": "materialized"},
            "attention_implementation": "xla",
        },
        "decomposition": {
            "sites": {
                "kind": spec.family,
                "layers": {"kind": "list", "indices": list(spec.layers)},
                "cs": dict(spec.cs),
            },
            "ci": spec.ci,
        },
        "data": {
            "train": {"kind": "name", "name": "pile_neox_tok_512"},
            "eval": {"kind": "dir", "dir": "/datasets/eval"},
        },
        "pd": {
            "seed": 0,
            "steps": 100,
            "batch_size": 8,
            "loss_metrics": [{"type": "FaithfulnessLoss", "coeff": 1.0}],
        },
        "runtime": {"mesh": {"replicate": 1, "fsdp": 1, "tp": 1}},
        "cadence": {"checkpoint_every": 50},
    }


def save_target(model: LlamaForCausalLM, target_dir: Path) -> None:
    model.save_pretrained(target_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir() / f, target_dir / f)


def _shard(tree: Any) -> Any:
    """Place every leaf on a mesh over all devices, sharding its last axis where it tiles (as
    the trainer's C-sharded V/U) — so the checkpoint records a multi-device sharding."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("dp",))

    def place(a: Any) -> Any:
        spec = (
            P(*([None] * (a.ndim - 1)), "dp") if a.ndim and a.shape[-1] % len(devices) == 0 else P()
        )
        return jax.device_put(a, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(place, tree)


def write_pd_run(
    run_dir: Path,
    spec: RunSpec,
    model: Any,
    *,
    steps: tuple[int, ...] = (50, 100),
    params: dict[str, Any] | None = None,
    sharded: bool = False,
) -> dict[str, Any]:
    """Write ``run_dir`` (config, orbax ckpts at ``steps``, metrics.jsonl); return the params of
    the LAST step (earlier steps get different random params). ``sharded``: save every array
    placed on a mesh over all of this process's devices."""
    run_dir.mkdir(parents=True, exist_ok=True)
    target_dir = run_dir.parent / f"{run_dir.name}-target"
    if spec.family != "simple_mlp":  # a pretrained target comes from its loader
        save_target(model, target_dir)
    (run_dir / spec.config_name).write_text(
        yaml.safe_dump(launch_config(spec, target_dir, model), sort_keys=False)
    )
    mgr = ocp.CheckpointManager(
        (run_dir / "ckpts").resolve(),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
    )
    last: dict[str, Any] = {}
    for i, step in enumerate(steps):
        is_last = i == len(steps) - 1
        p = params if (params is not None and is_last) else make_params(spec, model, seed=step)
        decomposition = decomposition_tree(spec, p)
        if sharded:
            decomposition = _shard(decomposition)
        if spec.layout == "legacy":
            state = TrainState(
                components=decomposition.components,
                ci_fn=decomposition.ci_fn,
                components_opt_state=(jnp.zeros(3), {"mu": jnp.ones(2)}),
                ci_fn_opt_state=(jnp.zeros(2),),
                adversaries={},
                step=jnp.asarray(step),
            )
            mgr.save(step, args=ocp.args.StandardSave(state))
        else:
            training = TrainingItem(objective={"opt": jnp.zeros(4)}, step=jnp.asarray(step))
            mgr.save(
                step,
                args=ocp.args.Composite(
                    decomposition=ocp.args.StandardSave(decomposition),
                    training=ocp.args.StandardSave(training),
                ),
            )
        mgr.wait_until_finished()
        last = p
    mgr.close()
    (run_dir / "metrics.jsonl").write_text('{"step": 100, "loss": 1.0}\n')
    return last
