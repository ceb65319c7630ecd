"""param-decomp qwen36_moe runs (CI type ``moe_chunkwise_transformer``, target
``transformers.Qwen3_5MoeForCausalLM``) written with orbax in the trainer's tree layout load by
ID and reproduce CI and component activations against an independent float64 reference.

The reference is written from the formulas in the DENSE-MASKED form (every expert on every
token, multiplied by the token's routing weight or routed mask), whereas the plugin runs the
routed jobs form; routing is re-derived here in numpy and checked against the ids HF's own
router chose in the forward.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("orbax.checkpoint")
jax = pytest.importorskip("jax")
ocp = pytest.importorskip("orbax.checkpoint")
import jax.numpy as jnp  # noqa: E402
from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig  # noqa: E402

from spd_host.adapter import HarvestOptions  # noqa: E402
from spd_host.demo import demo_model_dir  # noqa: E402
from spd_host.errors import ConfigError, FormatError  # noqa: E402
from spd_host.plugins import get_host  # noqa: E402
from tests.spd import pd_reference as ref  # noqa: E402

N_LAYER, INTERVAL, E, K, D = 8, 4, 4, 2, 16
DI, DS = 8, 8  # target expert / shared-expert hidden
CS = {
    "gdn_q": 2,
    "gdn_v": 3,
    "attn_q": 2,
    "attn_o": 3,
    "experts_gate": 8,  # 2 per expert
    "experts_up": 4,  # 1 per expert
    "experts_down": 8,
    "shared_gate": 3,
    "shared_down": 2,
}
ORDER = list(CS)  # already the family's canonical kind order
EXPERT_KINDS = {"experts_gate", "experts_up", "experts_down"}
SUFFIX = {
    "gdn_q": "linear_attn.in_proj_qkv.q",
    "gdn_v": "linear_attn.in_proj_qkv.v",
    "attn_q": "self_attn.q_proj",
    "attn_o": "self_attn.o_proj",
    "experts_gate": "mlp.experts.gate_proj",
    "experts_up": "mlp.experts.up_proj",
    "experts_down": "mlp.experts.down_proj",
    "shared_gate": "mlp.shared_expert.gate_proj",
    "shared_down": "mlp.shared_expert.down_proj",
}
CI = {
    "type": "moe_chunkwise_transformer",
    "expert_implementation": "ragged_dot",
    "blocks_per_chunk": INTERVAL,
    "input_tap": "first_block_resid",
    "d_model": 8,
    "n_blocks": 2,
    "attention": {"kind": "mha", "implementation": "xla", "mask": "bidirectional", "n_heads": 2},
    "expert_ffn_hidden": 4,
    "shared_ffn_hidden": 6,
}


def _dc(name: str, fields: list[str]) -> type:
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


# param-decomp's module/dataclass field names (static fields are not leaves, so not written)
Decomposition = _dc("Decomposition", ["components", "ci_fn"])
ComponentStacks = _dc("ComponentStacks", ["stacks"])
MoEChunkwiseTransformerCIFn = _dc("MoEChunkwiseTransformerCIFn", ["chunks", "inv_freq"])
MoEChunkTransformer = _dc("MoEChunkTransformer", ["in_proj_w", "in_proj_b", "blocks", "heads"])
MoECIBlock = _dc(
    "MoECIBlock",
    [
        "wq",
        "wk",
        "wv",
        "wo",
        "expert_gate",
        "expert_up",
        "expert_down",
        "shared_gate",
        "shared_up",
        "shared_down",
        "norm_scales",
    ],
)
DenseCIHead = _dc("DenseCIHead", ["w", "b"])
ExpertCIHead = _dc("ExpertCIHead", ["w"])
TrainingItem = _dc("TrainingItem", ["objective", "step"])


def is_full(layer: int) -> bool:
    return (layer + 1) % INTERVAL == 0


def has(kind: str, layer: int) -> bool:
    if kind.startswith("gdn_"):
        return not is_full(layer)
    if kind.startswith("attn_"):
        return is_full(layer)
    return True


def sites() -> list[tuple[int, str]]:
    return [(b, k) for b in range(N_LAYER) for k in ORDER if has(k, b)]


def tiny_target(seed: int = 0) -> Qwen3_5MoeForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3_5MoeTextConfig(
        vocab_size=2048,
        hidden_size=D,
        num_hidden_layers=N_LAYER,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        linear_num_key_heads=2,
        linear_key_head_dim=4,
        linear_num_value_heads=2,
        linear_value_head_dim=4,
        linear_conv_kernel_dim=4,
        num_experts=E,
        num_experts_per_tok=K,
        moe_intermediate_size=DI,
        shared_expert_intermediate_size=DS,
        full_attention_interval=INTERVAL,
        max_position_embeddings=64,
    )
    model = Qwen3_5MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits some weights to zero/one; make every path non-trivial
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    return model


def _dims(layer: int, kind: str) -> tuple[int, int]:
    """(d_in, d_out) of a dense site, or of ONE expert block."""
    key_dim, value_dim = 2 * 4, 2 * 4
    return {
        "gdn_q": (D, key_dim),
        "gdn_v": (D, value_dim),
        "attn_q": (D, 2 * 2 * 8),
        "attn_o": (2 * 8, D),
        "experts_gate": (D, DI),
        "experts_up": (D, DI),
        "experts_down": (DI, D),
        "shared_gate": (D, DS),
        "shared_down": (DS, D),
    }[kind]


CI_GQA = {  # grouped-query, causal, learned norm scales, every block's residual
    **CI,
    "input_tap": "all_block_resids",
    "attention": {"kind": "gqa", "n_heads": 2, "n_kv_heads": 1, "mask": "causal"},
    "learned_norm_scale": True,
}


def make_params(seed: int = 5, pad: int = 1, ci: dict[str, Any] = CI) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def r(*shape: int, scale: float = 0.35) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    stacks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for kind in ORDER:
        layers = [b for b in range(N_LAYER) if has(kind, b)]
        d_in, d_out = _dims(layers[0], kind)
        g = len(layers) + pad  # trailing all-zero placement pad slot
        if kind in EXPERT_KINDS:
            c = CS[kind] // E
            Vs, Us = r(g, E, d_in, c), r(g, E, c, d_out)
        else:
            Vs, Us = r(g, d_in, CS[kind]), r(g, CS[kind], d_out)
        Vs[len(layers) :] = 0
        Us[len(layers) :] = 0
        stacks[kind] = (Vs, Us)
    dm, f, s = ci["d_model"], ci["expert_ffn_hidden"], ci["shared_ffn_hidden"]
    n = N_LAYER // INTERVAL
    if ci["input_tap"] == "all_block_taps":  # attn_in, attn_out (mixer core), mlp_in per layer
        in_dim = sum(D + (2 * 8 if is_full(b) else 2 * 4) + D for b in range(INTERVAL))
    else:
        in_dim = (INTERVAL if ci["input_tap"] == "all_block_resids" else 1) * D
    in_dim += INTERVAL * E
    att = ci["attention"]
    kv = dm // att["n_heads"] * att.get("n_kv_heads", att["n_heads"])
    blocks = [
        {
            "wq": r(n, dm, dm),
            "wk": r(n, kv, dm),
            "wv": r(n, kv, dm),
            "wo": r(n, dm, dm),
            "expert_gate": [r(n, E, dm, f) for _ in range(INTERVAL)],
            "expert_up": [r(n, E, dm, f) for _ in range(INTERVAL)],
            "expert_down": [r(n, E, f, dm) for _ in range(INTERVAL)],
            "shared_gate": r(n, dm, s),
            "shared_up": r(n, dm, s),
            "shared_down": r(n, s, dm),
            "norm_scales": (1 + r(n, dm), 1 + r(n, dm)) if ci.get("learned_norm_scale") else None,
        }
        for _ in range(ci["n_blocks"])
    ]
    heads = []
    for _, kind in [(b, k) for b, k in sites() if b < INTERVAL]:  # one chunk's slots
        if kind in EXPERT_KINDS:
            heads.append({"w": r(n, E, f, CS[kind] // E, scale=1.0)})
        else:
            heads.append({"w": r(n, dm, CS[kind], scale=0.7), "b": r(n, CS[kind], scale=0.3) + 0.4})
    hd = dm // att["n_heads"]
    inv_freq = (1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))).astype(np.float32)
    return {
        "ci": ci,
        "stacks": stacks,
        "in_proj_w": r(n, in_dim, dm, scale=0.4),
        "in_proj_b": r(n, dm, scale=0.1),
        "blocks": blocks,
        "heads": heads,
        "inv_freq": inv_freq,
    }


def decomposition_tree(p: dict[str, Any], *, wrap: bool = False) -> Any:
    j = jnp.asarray
    blocks = [
        MoECIBlock(
            **{k: j(b[k]) for k in ("wq", "wk", "wv", "wo", "shared_gate", "shared_up")},
            shared_down=j(b["shared_down"]),
            expert_gate=tuple(j(a) for a in b["expert_gate"]),
            expert_up=tuple(j(a) for a in b["expert_up"]),
            expert_down=tuple(j(a) for a in b["expert_down"]),
            norm_scales=None
            if b["norm_scales"] is None
            else (j(b["norm_scales"][0]), j(b["norm_scales"][1])),
        )
        for b in p["blocks"]
    ]
    heads = tuple(
        ExpertCIHead(w=j(h["w"])) if "b" not in h else DenseCIHead(w=j(h["w"]), b=j(h["b"]))
        for h in p["heads"]
    )
    chunks = MoEChunkTransformer(
        in_proj_w=j(p["in_proj_w"]), in_proj_b=j(p["in_proj_b"]), blocks=blocks, heads=heads
    )
    ci_fn: Any = MoEChunkwiseTransformerCIFn(chunks=chunks, inv_freq=j(p["inv_freq"]))
    if wrap:
        ci_fn = _dc("BackboneCIFn", ["backbone"])(backbone=ci_fn)
    stacks = {k: (j(v), j(u)) for k, (v, u) in p["stacks"].items()}
    return Decomposition(components=ComponentStacks(stacks=stacks), ci_fn=ci_fn)


def launch_config(target_dir: Path, ci: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_name": "tiny-qwen36-moe",
        "target": {
            "spec": {
                "kind": "hf",
                "model_class": "transformers.Qwen3_5MoeForCausalLM",
                "model_name": str(target_dir),
            },
            "weights_dtype": "float32",
            "attention_implementation": "xla",
            "experts_execution": "routed",
            "output_edge": {"kind": "materialized"},
        },
        "decomposition": {
            "sites": {"kind": "qwen36_moe", "layers": {"kind": "all"}, "cs": dict(CS)},
            "ci": dict(ci),
        },
        "data": {"train": {"kind": "name", "name": "pile"}, "eval": {"kind": "dir", "dir": "/x"}},
        "pd": {"seed": 0, "steps": 10, "batch_size": 8, "loss_metrics": []},
        "runtime": {"mesh": {"replicate": 1, "fsdp": 1, "tp": 1}},
    }


def write_run(
    run_dir: Path, model: Any, p: dict[str, Any], *, wrap: bool = False, saved: Any = None
) -> None:
    """``saved``: the model to save as the target (default ``model``)."""
    run_dir.mkdir(parents=True)
    target_dir = run_dir.parent / f"{run_dir.name}-target"
    (saved or model).save_pretrained(target_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_dir() / f, target_dir / f)
    (run_dir / "launch_config.yaml").write_text(yaml.safe_dump(launch_config(target_dir, p["ci"])))
    mgr = ocp.CheckpointManager(
        (run_dir / "ckpts").resolve(),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
    )
    mgr.save(
        10,
        args=ocp.args.Composite(
            decomposition=ocp.args.StandardSave(decomposition_tree(p, wrap=wrap)),
            training=ocp.args.StandardSave(
                TrainingItem(objective={"opt": jnp.zeros(2)}, step=jnp.asarray(10))
            ),
        ),
    )
    mgr.wait_until_finished()
    mgr.close()


# ------------------------------ the float64 reference ------------------------------


def capture(model: Any, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """The test's own hooks: residual stream (hidden_states), module inputs, HF's router ids."""
    got: dict[str, np.ndarray] = {}
    handles = []
    layers = model.model.layers

    def pre(name: str) -> Any:
        def hook(_m: Any, args: Any) -> None:
            got[name] = args[0].detach().double().numpy()

        return hook

    def router_out(name: str) -> Any:
        def hook(_m: Any, _a: Any, out: Any) -> None:
            got[name] = out[2].detach().numpy()

        return hook

    for b in range(N_LAYER):
        mods = {"mlp": layers[b].mlp, "shared_down": layers[b].mlp.shared_expert.down_proj}
        if is_full(b):
            mods |= {"attn_in": layers[b].self_attn.q_proj, "attn_o": layers[b].self_attn.o_proj}
        else:
            mods |= {
                "gdn_in": layers[b].linear_attn.in_proj_qkv,
                "gdn_out": layers[b].linear_attn.out_proj,
            }
        for k, m in mods.items():
            handles.append(m.register_forward_pre_hook(pre(f"{k}.{b}")))
        handles.append(layers[b].mlp.gate.register_forward_hook(router_out(f"hf_ids.{b}")))
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    for h in handles:
        h.remove()
    for b in range(N_LAYER):
        got[f"resid.{b}"] = out.hidden_states[b].double().numpy()
    return got


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def ref_routing(h: np.ndarray, wr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [.., K] (descending prob), renormalised weights, and the dense weight table [.., E]."""
    logits = h @ wr.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1, kind="stable")[..., :K]
    top = np.take_along_axis(probs, ids, -1)
    w = top / top.sum(-1, keepdims=True)
    table = np.zeros(probs.shape)
    np.put_along_axis(table, ids, w, -1)
    return ids, w, table


def reference(model: Any, p: dict[str, Any], got: dict[str, np.ndarray]) -> tuple[dict, dict]:
    f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    layers = model.model.layers
    tables, routed = {}, {}
    for b in range(N_LAYER):
        wr = layers[b].mlp.gate.weight.detach().double().numpy()
        ids, _, table = ref_routing(got[f"mlp.{b}"], wr)
        np.testing.assert_array_equal(ids.reshape(-1, K), got[f"hf_ids.{b}"])
        tables[b], routed[b] = table, table > 0
    ci_out: dict[str, np.ndarray] = {}
    acts: dict[str, np.ndarray] = {}
    # component activations
    rank: dict[str, int] = {}
    for b, kind in sites():
        s = rank.get(kind, 0)
        rank[kind] = s + 1
        V = f64(p["stacks"][kind][0][s])
        name = f"layers.{b}.{SUFFIX[kind]}"
        h = got[f"mlp.{b}"]
        if kind in ("experts_gate", "experts_up"):
            a = np.einsum("btd,edc->btec", h, V) * routed[b][..., None]
        elif kind == "experts_down":
            gu = layers[b].mlp.experts.gate_up_proj.detach().double().numpy()  # [E, 2di, d]
            hid = _silu(np.einsum("btd,efd->btef", h, gu[:, :DI])) * np.einsum(
                "btd,efd->btef", h, gu[:, DI:]
            )
            a = np.einsum("btef,efc->btec", hid * tables[b][..., None], V)
        else:
            if kind.startswith("gdn_"):
                x = got[f"gdn_in.{b}"]
            elif kind == "attn_q":
                x = got[f"attn_in.{b}"]
            elif kind == "attn_o":
                x = got[f"attn_o.{b}"]
            elif kind == "shared_gate":
                x = h
            else:  # HF runs the shared expert on the flattened tokens
                x = got[f"shared_down.{b}"].reshape(*h.shape[:-1], DS)
            acts[name] = x @ V
            continue
        acts[name] = a.reshape(*a.shape[:2], -1)
    # CI, one chunk per stage
    ci_cfg = p["ci"]
    nh = ci_cfg["attention"]["n_heads"]
    nkv = ci_cfg["attention"].get("n_kv_heads", nh)
    causal = ci_cfg["attention"].get("mask") == "causal"
    for c, start in enumerate(range(0, N_LAYER, INTERVAL)):
        stage = list(range(start, start + INTERVAL))
        if ci_cfg["input_tap"] == "all_block_taps":
            names = [
                (f"attn_in.{b}", f"attn_o.{b}") if is_full(b) else (f"gdn_in.{b}", f"gdn_out.{b}")
                for b in stage
            ]
            taps = [t for b, (i, o) in zip(stage, names, strict=True) for t in (i, o, f"mlp.{b}")]
        else:
            tap_layers = stage if ci_cfg["input_tap"] == "all_block_resids" else [start]
            taps = [f"resid.{b}" for b in tap_layers]
        parts = [ref._rms(got[t]) for t in taps] + [tables[b] * K for b in stage]
        x = np.concatenate(parts, -1) @ f64(p["in_proj_w"][c]) + f64(p["in_proj_b"][c])
        B, T, dm = x.shape
        hd = dm // nh
        hidden_all: list[np.ndarray] = []
        for blk in p["blocks"]:
            ns = blk["norm_scales"]
            h = ref._rms(x, None if ns is None else f64(ns[0][c]))
            q, k, v = (h @ f64(blk[w][c]).T for w in ("wq", "wk", "wv"))
            y = np.zeros_like(x)
            for bi in range(B):
                for head in range(nh):
                    sl = slice(head * hd, (head + 1) * hd)
                    kvh = head // (nh // nkv)
                    kv_sl = slice(kvh * hd, (kvh + 1) * hd)
                    qh = ref._rope(q[bi, :, sl], p["inv_freq"])
                    kh = ref._rope(k[bi, :, kv_sl], p["inv_freq"])
                    sc = qh @ kh.T / math.sqrt(hd)
                    if causal:
                        sc = np.where(np.tril(np.ones((T, T))) > 0, sc, -np.inf)
                    sc = np.exp(sc - sc.max(-1, keepdims=True))
                    y[bi, :, sl] = (sc / sc.sum(-1, keepdims=True)) @ v[bi, :, kv_sl]
            x = x + y @ f64(blk["wo"][c]).T
            h = ref._rms(x, None if ns is None else f64(ns[1][c]))
            total = np.zeros_like(x)
            hidden_all = []
            for r, b in enumerate(stage):  # dense-masked: every expert, times its weight
                hid = _silu(np.einsum("btd,edf->btef", h, f64(blk["expert_gate"][r][c]))) * (
                    np.einsum("btd,edf->btef", h, f64(blk["expert_up"][r][c]))
                )
                out = np.einsum("btef,efd->bted", hid, f64(blk["expert_down"][r][c]))
                total += (out * tables[b][..., None]).sum(-2)
                hidden_all.append(hid)
            sh = _silu(h @ f64(blk["shared_gate"][c])) * (h @ f64(blk["shared_up"][c]))
            x = x + total / INTERVAL + sh @ f64(blk["shared_down"][c])
        chunk_sites = [(b, k) for b, k in sites() if b in stage]
        for j, (b, kind) in enumerate(chunk_sites):
            head = p["heads"][j]
            if kind in EXPERT_KINDS:
                pre = np.einsum("btef,efc->btec", hidden_all[b - start], f64(head["w"][c]))
                ci = np.clip(pre, 0, 1) * routed[b][..., None]
                ci = ci.reshape(B, T, -1)
            else:
                ci = np.clip(x @ f64(head["w"][c]) + f64(head["b"][c]), 0, 1)
            ci_out[f"layers.{b}.{SUFFIX[kind]}"] = ci
    return ci_out, acts


def _tokens(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (2, 7), generator=g)


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("moe") / "runs" / "p-0e0e0e0e"
    model, params = tiny_target(), make_params()
    write_run(run_dir, model, params)
    return run_dir, model, params


def _load(run_dir: Path) -> Any:
    return get_host().load_adapter(get_host().parse_id(f"spd:{run_dir}"))


def test_ci_and_component_acts_match_reference(moe_run: tuple[Path, Any, dict]) -> None:
    run_dir, model, params = moe_run
    adapter = _load(run_dir)
    tokens = _tokens()
    want_ci, want_acts = reference(model, params, capture(model, tokens))
    batch = get_host().harvest_fn(adapter, HarvestOptions(threshold=0.1))(tokens)
    paths = adapter.defaults.extra["module_paths"]
    assert set(batch.activations) == {s.name for s in adapter.sites}
    assert {paths[s].removeprefix("model.") for s in batch.activations} == set(want_ci)
    n_mid = n_zero_routed = 0
    for site, acts in batch.activations.items():
        name = paths[site].removeprefix("model.")
        ci = acts["causal_importance"].numpy()
        np.testing.assert_allclose(ci, want_ci[name], atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(
            acts["component_activation"].numpy(),
            want_acts[name],
            atol=1e-5,
            rtol=1e-5,
            err_msg=name,
        )
        assert torch.equal(batch.firings[site], acts["causal_importance"] > 0.1)
        n_mid += int(((ci > 0.01) & (ci < 0.99)).sum())
        if "experts" in name:
            n_zero_routed += int((want_acts[name] == 0).sum())
    assert n_mid > 0, "the CI never leaves the clamp: the comparison would be vacuous"
    assert n_zero_routed > 0  # unrouted experts' blocks are zero (and differ from dense x V)
    assert batch.next_token_logits is not None and batch.next_token_logits.shape[:2] == (2, 7)


def test_sites_metadata_and_splice_variants(moe_run: tuple[Path, Any, dict]) -> None:
    run_dir, _, _ = moe_run
    adapter = _load(run_dir)
    names = adapter.defaults.extra["module_paths"]
    want = [f"model.layers.{b}.{SUFFIX[k]}" for b, k in sites()]
    assert sorted(names.values()) == sorted(want)
    assert sum(s.n_components for s in adapter.sites) == sum(CS[k] for _, k in sites())
    assert adapter.non_causal and adapter.defaults.extra["ci_fn_type"] == CI["type"]
    assert "ci_masked" in adapter.splice_variants  # splice: test_param_decomp_moe_splice.py
    with pytest.raises(ConfigError, match="unknown sites"):
        adapter.splice(adapter.load_base_model(), sites=["layers.0.nope"])


def test_backbone_wrapped_ci_fn_loads_the_same(tmp_path: Path, moe_run: tuple) -> None:
    _, model, params = moe_run
    run_dir = tmp_path / "runs" / "p-1e1e1e1e"
    write_run(run_dir, model, params, wrap=True)
    tokens = _tokens(seed=4)
    want_ci, _ = reference(model, params, capture(model, tokens))
    batch = get_host().harvest_fn(_load(run_dir), HarvestOptions())(tokens)
    paths = _load(run_dir).defaults.extra["module_paths"]
    for site, acts in batch.activations.items():
        want = want_ci[paths[site].removeprefix("model.")]
        np.testing.assert_allclose(acts["causal_importance"].numpy(), want, atol=1e-5, rtol=0)


def _edit(run_dir: Path, edit: Any) -> None:
    path = run_dir / "launch_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))


def test_bad_runs_name_the_real_cause(tmp_path: Path, moe_run: tuple) -> None:
    _, model, params = moe_run
    run_dir = tmp_path / "runs" / "p-2e2e2e2e"
    write_run(run_dir, model, params)
    _edit(run_dir, lambda c: c["decomposition"]["sites"]["cs"].update(experts_up=6))
    with pytest.raises(FormatError, match=r"C=6 is not a multiple of the target's 4 experts"):
        _load(run_dir)
    _edit(run_dir, lambda c: c["decomposition"]["sites"]["cs"].update(experts_up=8))
    with pytest.raises(FormatError, match=r"V of layers.0.mlp.experts.up_proj has shape"):
        _load(run_dir)
    _edit(run_dir, lambda c: c["decomposition"]["sites"]["cs"].update(experts_up=4))
    _edit(run_dir, lambda c: c["decomposition"]["ci"].update(blocks_per_chunk=2))
    with pytest.raises(FormatError, match=r"launch_config.yaml: .*full_attention_interval"):
        _load(run_dir)
    _edit(run_dir, lambda c: c["decomposition"]["ci"].update(blocks_per_chunk=4, n_blocks=1))
    with pytest.raises(FormatError, match=r"ci_fn.chunks.blocks holds 2 blocks.*n_blocks=1"):
        _load(run_dir)
    _edit(
        run_dir, lambda c: c["decomposition"]["ci"].update(n_blocks=2, input_tap="all_block_taps")
    )
    with pytest.raises(FormatError, match=r"in_proj_w has shape"):  # the checkpoint's width
        _load(run_dir)
    _edit(run_dir, lambda c: c["decomposition"]["ci"].update(input_tap="first_block_resid"))
    _edit(
        run_dir,
        lambda c: c["decomposition"]["sites"].update(layers={"kind": "list", "indices": [0]}),
    )
    with pytest.raises(FormatError, match=r"launch_config.yaml: qwen36_moe sites cover every"):
        _load(run_dir)


def test_hub_snapshot_layout_composite_config(tmp_path: Path) -> None:
    """The Hub snapshot is the image-text ``Qwen3_5MoeForConditionalGeneration`` checkpoint
    (``model_type: qwen3_5_moe``, ``text_config``); the run's ``Qwen3_5MoeForCausalLM`` target
    is its text decoder."""
    from transformers import AutoModelForCausalLM, Qwen3_5MoeConfig
    from transformers import Qwen3_5MoeForConditionalGeneration as Composite

    text = tiny_target(seed=1).config.to_dict()
    vision = {"depth": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 16}
    torch.manual_seed(2)
    composite = Composite(Qwen3_5MoeConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        for name, prm in composite.named_parameters():
            if "norm" not in name:
                prm.normal_(0, 0.3)
    params = make_params(seed=6)
    run_dir = tmp_path / "runs" / "p-3e3e3e3e"
    write_run(run_dir, None, params, saved=composite)
    model = AutoModelForCausalLM.from_pretrained(run_dir.parent / f"{run_dir.name}-target").eval()
    assert type(model).__name__ == "Qwen3_5MoeForCausalLM"
    adapter = _load(run_dir)
    tokens = _tokens(seed=5)
    want_ci, want_acts = reference(model, params, capture(model, tokens))
    batch = get_host().harvest_fn(adapter, HarvestOptions())(tokens)
    paths = adapter.defaults.extra["module_paths"]
    assert len(batch.activations) == len(want_ci)
    for site, acts in batch.activations.items():
        name = paths[site].removeprefix("model.")
        np.testing.assert_allclose(
            acts["causal_importance"].numpy(), want_ci[name], atol=1e-5, rtol=0
        )
        np.testing.assert_allclose(
            acts["component_activation"].numpy(), want_acts[name], atol=1e-5, rtol=1e-5
        )


def test_info_harvest_autointerp_fidelity_end_to_end(
    tmp_path: Path, moe_run: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from typer.testing import CliRunner

    from spd_host.autointerp.api import load_labels
    from spd_host.cli.app import app
    from spd_host.evals import run_suite
    from spd_host.harvest import HarvestConfig, HarvestRepo, run_harvest

    _, model, params = moe_run
    run_dir = tmp_path / "runs" / "p-4e4e4e4e"
    write_run(run_dir, model, params)
    monkeypatch.setenv("SPD_HOST_PD_RUNS_DIR", str(tmp_path / "runs"))
    out = CliRunner().invoke(app, ["info", "p-4e4e4e4e", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["n_components"] == sum(CS[k] for _, k in sites())
    assert len(doc["sites"]) == len(sites())
    did = f"spd:{run_dir}"
    cfg = HarvestConfig(dataset="demo", n_tokens=128, batch_size=4, seq_len=16)
    run_harvest(did, cfg, progress=False)
    summary = HarvestRepo.open(did).summary()
    assert len(summary) == sum(CS[k] for _, k in sites())
    fired = [c for c in summary if c.firing_count > 0]
    assert fired
    out = CliRunner().invoke(app, ["autointerp", did, "--no-progress"])
    assert out.exit_code == 0, out.output
    assert {r.component_key for r in load_labels(did)} == {c.key for c in fired}
    result = run_suite("fidelity", did, dataset="demo", n_tokens=64, seq_len=16, batch_size=4)
    assert sorted(result.variants) == ["all_ones", "ci_masked", "rounded_ci", "zero_mask"]
    for v in result.variants:
        row = result.loss_row(variant=v)
        assert np.isfinite(row.ce_spliced) and np.isfinite(row.kl_spliced)


def test_gqa_causal_learned_norms_all_block_resids(tmp_path: Path, moe_run: tuple) -> None:
    _, model, _ = moe_run
    params = make_params(seed=7, ci=CI_GQA)
    run_dir = tmp_path / "runs" / "p-5e5e5e5e"
    write_run(run_dir, model, params)
    adapter = _load(run_dir)
    assert not adapter.non_causal
    tokens = _tokens(seed=8)
    want_ci, _ = reference(model, params, capture(model, tokens))
    batch = get_host().harvest_fn(adapter, HarvestOptions())(tokens)
    paths = adapter.defaults.extra["module_paths"]
    n_mid = 0
    for site, acts in batch.activations.items():
        ci = acts["causal_importance"].numpy()
        np.testing.assert_allclose(
            ci, want_ci[paths[site].removeprefix("model.")], atol=1e-5, rtol=0
        )
        n_mid += int(((ci > 0.01) & (ci < 0.99)).sum())
    assert n_mid > 0


def test_all_block_taps(tmp_path: Path, moe_run: tuple) -> None:
    """``input_tap: all_block_taps`` on qwen36_moe: per layer the mixer input, the mixer core
    its out/o projection reads (DeltaNet value_dim or attention n_head*head_dim wide) and the
    MoE input; no dense MLP hidden (param-decomp's tap grammar)."""
    _, model, _ = moe_run
    params = make_params(seed=15, ci={**CI, "input_tap": "all_block_taps"})
    run_dir = tmp_path / "runs" / "p-6f6f6f6f"
    write_run(run_dir, model, params)
    adapter = _load(run_dir)
    assert adapter.defaults.extra["ci_input_taps"][:3] == ["attn_in.0", "attn_out.0", "mlp_in.0"]
    tokens = _tokens(seed=16)
    want_ci, _ = reference(model, params, capture(model, tokens))
    batch = get_host().harvest_fn(adapter, HarvestOptions())(tokens)
    paths = adapter.defaults.extra["module_paths"]
    n_mid = 0
    for site, acts in batch.activations.items():
        ci = acts["causal_importance"].numpy()
        want = want_ci[paths[site].removeprefix("model.")]
        np.testing.assert_allclose(ci, want, atol=1e-5, rtol=0)
        n_mid += int(((ci > 0.01) & (ci < 0.99)).sum())
    assert n_mid > 0
