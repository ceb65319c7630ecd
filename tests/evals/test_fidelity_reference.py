"""Fidelity numbers against a by-hand reference: splice with plain forward hooks, then CE, KL,
explained variance and L0 straight from the published formulas, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spd_host.evals.configs import FidelityConfig
from spd_host.evals.fidelity import FidelityResult, fidelity_on_batches
from spd_host.evals.metrics import next_token_ce_sum
from spd_host.plugins import temporary_plugins
from tests.evals.toy_plugin import N_LAYER, VOCAB, ToyPlugin, reconstruct

TOL = 1e-5


def _forward(model, tokens, replace: dict[int, str]):
    """Logits and every MLP's output, with MLP ``i`` replaced by ``replace[i]`` ('zero' or a variant)."""
    outs: dict[int, torch.Tensor] = {}
    handles = []
    for i in range(N_LAYER):

        def hook(_m, args, out, i=i):
            mode = replace.get(i)
            if mode == "zero":
                new = torch.zeros_like(out)
            elif mode is not None:
                new = reconstruct(model, i, args[0], mode)
            else:
                new = out
            outs[i] = new.detach().double()
            return new

        handles.append(model.transformer.h[i].mlp.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(tokens).logits.double()
    finally:
        for h in handles:
            h.remove()
    return logits, outs


def _ce(logits, tokens):
    # within-sequence next-token pairs only
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
    ).item()


def _kl(clean, other):
    lp, lq = F.log_softmax(clean, -1), F.log_softmax(other, -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def _ev(x, y):
    x = x.reshape(-1, x.shape[-1])
    y = y.reshape(-1, y.shape[-1])
    return 1 - ((x - y) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (7, 12), generator=g)


@pytest.fixture
def result(tokens) -> tuple[FidelityResult, torch.nn.Module]:
    with temporary_plugins(("toytc", ToyPlugin()), entry_points=False) as host:
        adapter = host.load_adapter("toytc:demo")
        batches = [tokens[:3], tokens[3:5], tokens[5:]]  # uneven batches: merging must be exact
        res = fidelity_on_batches(adapter, batches, FidelityConfig(use_harvest=False))
        return res, adapter.load_base_model()


def test_all_sites_ce_kl_match_hand_reference(result, tokens):
    res, model = result
    clean, _ = _forward(model, tokens, {})
    abl, _ = _forward(model, tokens, dict.fromkeys(range(N_LAYER), "zero"))
    spl, _ = _forward(model, tokens, dict.fromkeys(range(N_LAYER), "relu"))
    row = res.loss_row("all", "relu")
    ce_c, ce_a, ce_s = _ce(clean, tokens), _ce(abl, tokens), _ce(spl, tokens)
    assert row.ce_clean == pytest.approx(ce_c, abs=TOL)
    assert row.ce_ablated == pytest.approx(ce_a, abs=TOL)
    assert row.ce_spliced == pytest.approx(ce_s, abs=TOL)
    assert row.ce_loss_score == pytest.approx((ce_a - ce_s) / (ce_a - ce_c), abs=TOL)
    kl_s, kl_a = _kl(clean, spl), _kl(clean, abl)
    assert row.kl_spliced == pytest.approx(kl_s, abs=TOL)
    assert row.kl_ablated == pytest.approx(kl_a, abs=TOL)
    assert row.kl_div_score == pytest.approx((kl_a - kl_s) / kl_a, abs=TOL)
    # the toy splice is lossy but much closer to clean than zero-ablation: not a vacuous test
    assert 1e-4 < row.kl_spliced < row.kl_ablated
    assert abs(ce_s - ce_c) > 1e-3
    assert row.n_predictions == tokens.shape[0] * (tokens.shape[1] - 1)
    assert row.n_positions == tokens.numel()


def test_each_site_alone_matches_hand_reference(result, tokens):
    res, model = result
    clean, clean_outs = _forward(model, tokens, {})
    for i in range(N_LAYER):
        spl, spl_outs = _forward(model, tokens, {i: "relu"})
        abl, _ = _forward(model, tokens, {i: "zero"})
        row = res.loss_row(f"{i}.mlp", "relu")
        assert row.ce_spliced == pytest.approx(_ce(spl, tokens), abs=TOL)
        assert row.ce_ablated == pytest.approx(_ce(abl, tokens), abs=TOL)
        assert row.kl_spliced == pytest.approx(_kl(clean, spl), abs=TOL)
        (rec,) = [r for r in res.recon if r.scope == f"{i}.mlp" and r.variant == "relu"]
        assert rec.target == f"{i}.mlp_out"
        x, y = clean_outs[i], spl_outs[i]
        assert rec.explained_variance == pytest.approx(_ev(x, y), abs=TOL)
        assert rec.mse == pytest.approx(((x - y) ** 2).mean().item(), abs=TOL)
        cos = F.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), -1)
        assert rec.cosine_similarity == pytest.approx(cos.mean().item(), abs=TOL)
        assert 0.0 < rec.explained_variance < 1.0


def test_all_sites_recon_is_measured_under_the_full_splice(result, tokens):
    res, model = result
    _, clean_outs = _forward(model, tokens, {})
    _, spl_outs = _forward(model, tokens, dict.fromkeys(range(N_LAYER), "relu"))
    for i in range(N_LAYER):
        (rec,) = [
            r
            for r in res.recon
            if r.scope == "all" and r.target == f"{i}.mlp_out" and r.variant == "relu"
        ]
        assert rec.explained_variance == pytest.approx(_ev(clean_outs[i], spl_outs[i]), abs=TOL)


def test_exact_variant_recovers_everything(result):
    res, _ = result
    row = res.loss_row("all", "exact")
    assert row.ce_spliced == pytest.approx(row.ce_clean, abs=TOL)
    assert row.ce_loss_score == pytest.approx(1.0, abs=TOL)
    assert row.kl_spliced == pytest.approx(0.0, abs=TOL)
    for r in res.recon:
        if r.variant == "exact":
            assert r.explained_variance == pytest.approx(1.0, abs=TOL)
    assert res.variants == ["relu", "exact"]
    assert [r["variant"] for r in res.table_rows()] == ["relu", "exact"]


def test_l0_and_alive_from_eval_tokens(result, tokens):
    res, model = result
    clean_inputs: dict[int, torch.Tensor] = {}
    hs = [
        model.transformer.h[i].mlp.register_forward_pre_hook(
            lambda _m, a, i=i: clean_inputs.__setitem__(i, a[0])
        )
        for i in range(N_LAYER)
    ]
    with torch.no_grad():
        model(tokens)
    for h in hs:
        h.remove()
    total = 0.0
    for i in range(N_LAYER):
        fc = model.transformer.h[i].mlp.c_fc
        fires = (clean_inputs[i] @ fc.weight + fc.bias) > 0
        l0 = fires.sum(-1).double().mean().item()
        (sp,) = [s for s in res.sparsity if s.site == f"{i}.mlp"]
        assert sp.l0 == pytest.approx(l0, abs=TOL)
        assert sp.n_alive == int(fires.reshape(-1, fires.shape[-1]).any(0).sum())
        total += l0
    assert res.l0_total == pytest.approx(total, abs=TOL)
    assert res.alive_source == "eval_tokens"
    assert any("eval tokens" in n for n in res.notes)


def test_ce_never_pairs_tokens_across_sequences():
    # two sequences; a cross-sequence pair (last of row 0 -> first of row 1) would add a
    # third term with a huge loss
    V = 4
    tokens = torch.tensor([[0, 1], [2, 3]])
    logits = torch.full((2, 2, V), -30.0)
    logits[0, 0, 1] = 30.0  # predicts 1 after 0: correct
    logits[1, 0, 3] = 30.0  # predicts 3 after 2: correct
    logits[0, 1, 0] = 30.0  # would predict 0 for a "next" token 2 that belongs to row 1
    total, count = next_token_ce_sum(logits, tokens)
    assert count == 2
    assert total == pytest.approx(0.0, abs=1e-6)
