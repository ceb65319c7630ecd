"""Splicing (and so ``eval fidelity``) on param-decomp qwen36_moe runs, against a masked forward
written here in the DENSE-MASKED form (every expert on every token, weighted by the pinned
routing's dense weight table), whereas the plugin runs the routed per-slot form.

What the reference encodes (param-decomp ``targets/qwen36_moe.py``): the masked forward keeps
the clean forward's top-k expert ids in every layer and recomputes the mixing weights from its
own router softmax at those ids; a spliced expert kind computes ``((x V_e) * mask_e) U_e`` per
expert block; the routing weight folds into the down site's input; the shared expert's output
is scaled by its sigmoid gate; the DeltaNet q/k/v sites are row blocks of ``in_proj_qkv``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("orbax.checkpoint")
pytest.importorskip("jax")

from spd_host.evals.configs import FidelityConfig
from tests.spd import test_param_decomp_moe as moe

KEY_DIM = 2 * 4  # linear_num_key_heads * linear_key_head_dim of moe.tiny_target
ROWS = {"gdn_q": slice(0, KEY_DIM), "gdn_k": slice(KEY_DIM, 2 * KEY_DIM)}
ROWS["gdn_v"] = slice(2 * KEY_DIM, None)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("moe-splice") / "runs" / "p-6e6e6e6e"
    model, params = moe.tiny_target(), moe.make_params(seed=9)
    moe.write_run(run_dir, model, params)
    return run_dir, model, params


def _factors(p: dict[str, Any], layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    slot = [b for b in range(moe.N_LAYER) if moe.has(kind, b)].index(layer)
    V, U = p["stacks"][kind]
    return torch.from_numpy(V[slot]), torch.from_numpy(U[slot])


def _mask(variant: str, ci: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(ci).float()
    return {
        "ci_masked": t,
        "rounded_ci": torch.from_numpy(np.round(ci)).float(),
        "all_ones": torch.ones_like(t),
        "zero_mask": torch.zeros_like(t),
    }[variant]


def reference_logits(
    model: Any,
    p: dict[str, Any],
    tokens: torch.Tensor,
    variant: str,
    spliced: set[tuple[int, str]],
) -> torch.Tensor:
    """The masked forward, written from the formulas with the test's own hooks."""
    got = moe.capture(model, tokens)
    ci, _ = moe.reference(model, p, got)
    ids = {
        b: torch.from_numpy(got[f"hf_ids.{b}"]).reshape(*tokens.shape, moe.K)
        for b in range(moe.N_LAYER)
    }
    mask = {(b, k): _mask(variant, ci[f"layers.{b}.{moe.SUFFIX[k]}"]) for b, k in spliced}
    layers = model.model.layers
    handles = []

    def lin(x: torch.Tensor, b: int, kind: str, m: torch.Tensor) -> torch.Tensor:
        V, U = _factors(p, b, kind)
        return ((x @ V) * m) @ U

    def dense_hook(b: int, kind: str) -> Any:
        def hook(_m: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            y = lin(x, b, kind, mask[(b, kind)].reshape(*x.shape[:-1], -1))
            if kind in ROWS:
                out = out.clone()
                out[..., ROWS[kind]] = y
                return out
            return y

        return hook

    def moe_hook(b: int) -> Any:
        mlp = layers[b].mlp

        def hook(_m: Any, args: Any, _out: Any) -> torch.Tensor:
            h = args[0]  # [B, T, d]
            probs = F.softmax(h @ mlp.gate.weight.T, dim=-1)
            table = torch.zeros_like(probs)
            top = probs.gather(-1, ids[b])
            table.scatter_(-1, ids[b], top / top.sum(-1, keepdim=True))
            gu, dn = mlp.experts.gate_up_proj, mlp.experts.down_proj
            routed = torch.zeros_like(h)
            for e in range(moe.E):

                def site(
                    kind: str, x: torch.Tensor, frozen: torch.Tensor, e: int = e
                ) -> torch.Tensor:
                    if (b, kind) not in spliced:
                        return x @ frozen.T
                    V, U = _factors(p, b, kind)
                    c = V.shape[-1]
                    return ((x @ V[e]) * mask[(b, kind)][..., e * c : (e + 1) * c]) @ U[e]

                g = site("experts_gate", h, gu[e, : moe.DI])
                u = site("experts_up", h, gu[e, moe.DI :])
                hid = F.silu(g) * u * table[..., e : e + 1]
                routed = routed + site("experts_down", hid, dn[e])
            se = mlp.shared_expert
            g = (
                se.gate_proj(h)
                if (b, "shared_gate") not in spliced
                else lin(h, b, "shared_gate", mask[(b, "shared_gate")])
            )
            hid = F.silu(g) * se.up_proj(h)
            sd = (
                se.down_proj(hid)
                if (b, "shared_down") not in spliced
                else lin(hid, b, "shared_down", mask[(b, "shared_down")])
            )
            return routed + torch.sigmoid(mlp.shared_expert_gate(h)) * sd

        return hook

    module_of = {
        "gdn_q": lambda b: layers[b].linear_attn.in_proj_qkv,
        "gdn_v": lambda b: layers[b].linear_attn.in_proj_qkv,
        "attn_q": lambda b: layers[b].self_attn.q_proj,
        "attn_o": lambda b: layers[b].self_attn.o_proj,
    }
    for b, kind in spliced:
        if kind in module_of:
            handles.append(module_of[kind](b).register_forward_hook(dense_hook(b, kind)))
    for b in range(moe.N_LAYER):  # every MoE layer runs pinned
        handles.append(layers[b].mlp.register_forward_hook(moe_hook(b)))
    try:
        with torch.no_grad():
            return model(tokens).logits
    finally:
        for h in handles:
            h.remove()


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """1e-5 relative to the largest logit: the reference's masks come from the float64 CI, the
    plugin's from its float32 CI (equal to 1e-5, ``test_param_decomp_moe``), and eight random
    layers amplify that ~1e-7 difference (with mask-free variants the two agree to ~1e-6)."""
    diff = (got - want).abs().max().item()
    assert diff <= 1e-5 * max(1.0, want.abs().max().item()), diff


def _spliced_logits(adapter: Any, tokens: torch.Tensor, variant: str, sites: Any) -> torch.Tensor:
    model = adapter.load_base_model()
    with torch.no_grad(), adapter.splice(model, sites=sites, variant=variant):
        return model(tokens).logits


@pytest.mark.parametrize("variant", ["ci_masked", "rounded_ci", "all_ones", "zero_mask"])
def test_all_sites_splice_matches_dense_reference(run: tuple, variant: str) -> None:
    run_dir, model, params = run
    adapter = moe._load(run_dir)
    tokens = moe._tokens(seed=11)
    want = reference_logits(model, params, tokens, variant, set(moe.sites()))
    got = _spliced_logits(adapter, tokens, variant, None)
    with torch.no_grad():
        clean = model(tokens).logits
    assert_logits_close(got, want)
    assert not torch.allclose(got, clean, atol=1e-3)  # the splice changed something


def test_one_expert_site_splice_pins_downstream_routing(run: tuple) -> None:
    """Only layer 1's experts_down spliced: later layers see a perturbed residual, keep the
    clean ids and reweight them (the reference pins them the same way)."""
    run_dir, model, params = run
    adapter = moe._load(run_dir)
    paths = adapter.defaults.extra["module_paths"]
    site = next(n for n, p in paths.items() if p.endswith("layers.1.mlp.experts.down_proj"))
    tokens = moe._tokens(seed=12)
    want = reference_logits(model, params, tokens, "ci_masked", {(1, "experts_down")})
    got = _spliced_logits(adapter, tokens, "ci_masked", [site])
    assert_logits_close(got, want)
    with torch.no_grad():
        clean = model(tokens).logits
    assert not torch.allclose(got, clean, atol=1e-3)  # the one site changed the output
    # the reference with nothing spliced is the clean forward (its MoE form is HF's)
    assert_logits_close(reference_logits(model, params, tokens, "all_ones", set()), clean)


def test_sites_read_and_write_canonical_hook_points(run: tuple) -> None:
    run_dir, _, _ = run
    adapter = moe._load(run_dir)
    by_path = {p.removeprefix("model."): s for s in adapter.sites for p in [_path(adapter, s)]}
    assert by_path["layers.3.self_attn.q_proj"].name == "3.attn.q"
    assert by_path["layers.3.self_attn.o_proj"].writes_to == ("3.attn_out",)
    gdn_q = by_path["layers.0.linear_attn.in_proj_qkv.q"]
    assert (gdn_q.reads_from, gdn_q.writes_to) == ("0.attn_in", ("0.attn_out",))
    up = by_path["layers.2.mlp.experts.up_proj"]
    assert (up.reads_from, up.writes_to) == ("2.mlp_in", ("2.mlp_out",))
    assert by_path["layers.2.mlp.shared_expert.down_proj"].writes_to == ("2.mlp_out",)
    topo = adapter._addresses  # every addressed site resolves through the registered topology
    assert "model.layers.3.self_attn.q_proj" in topo


def _path(adapter: Any, site: Any) -> str:
    return adapter.defaults.extra["module_paths"][site.name]


def test_fidelity_all_variants_equals_reference_ce(run: tuple) -> None:
    from spd_host.evals.fidelity import fidelity_on_batches
    from spd_host.evals.metrics import next_token_ce_sum

    run_dir, model, params = run
    adapter = moe._load(run_dir)
    tokens = moe._tokens(seed=13)
    variants = ("ci_masked", "all_ones", "rounded_ci", "zero_mask", "stochastic", "random")
    result = fidelity_on_batches(
        adapter, [tokens], FidelityConfig(variants=variants, per_site=False)
    )
    assert sorted(result.variants) == sorted(variants)
    for v in variants:
        row = result.loss_row(variant=v)
        assert np.isfinite(row.ce_spliced) and np.isfinite(row.kl_spliced), v
    for v in ("ci_masked", "zero_mask"):
        s, n = next_token_ce_sum(
            reference_logits(model, params, tokens, v, set(moe.sites())), tokens
        )
        assert result.loss_row(variant=v).ce_spliced == pytest.approx(s / n, abs=1e-5)


@pytest.mark.slow
def test_eval_fidelity_cli_end_to_end(
    tmp_path: Path, run: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from spd_host.cli.app import app

    run_dir, _, _ = run
    monkeypatch.setenv("SPD_HOST_PD_RUNS_DIR", str(run_dir.parent))
    args = ["eval", "fidelity", "p-6e6e6e6e", "--dataset", "demo", "--n-tokens", "64"]
    args += ["--seq-len", "16", "--batch-size", "4", "--no-per-site", "--json"]
    for v in ("ci_masked", "all_ones", "rounded_ci", "zero_mask", "stochastic", "random"):
        args += ["--variant", v]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    text = json.dumps(doc)
    for v in ("ci_masked", "all_ones", "rounded_ci", "zero_mask", "stochastic", "random"):
        assert f'"{v}"' in text, v
