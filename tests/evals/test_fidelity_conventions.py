"""The saelens and goodfire conventions against the peers' published formulas, recomputed by
hand here (plain forward hooks, float64), on the toy ReLU transcoder of a tiny GPT-2.

SAELens (``sae_lens/evals.py``, ``run_evals(exclude_special_tokens=True)``): special positions
keep the model's own activation (``torch.where(mask, sae_out, original)``), zero-ablation is
everywhere; CE pairs whose input is special and KL at special positions are dropped, pooled
mean over all tokens; MSE = per-token sum of squares; ``l2_ratio`` = mean ||x_hat|| / ||x||;
``relative_reconstruction_bias`` = mean over batches of mean ||x_hat||^2 / mean x.x_hat; L0 /
L1 / feature density over kept tokens. Goodfire (``spd/metrics/ce_and_kl_losses.py``): per
batch mean CE / KL / ``(CE - CE_target) / (CE_zero - CE_target)``, then the mean weighted by
``B*S``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spd_host.evals.configs import FidelityConfig
from spd_host.evals.fidelity import (
    fidelity_on_batches,
    resolve_prepend_bos,
    special_token_ids,
    with_bos,
)
from spd_host.plugins import temporary_plugins
from tests.evals.toy_plugin import N_LAYER, VOCAB, ToyPlugin, build_tokenizer, pre_acts, reconstruct

SPECIAL = [0, 7]


def _run(model, tokens, mode: str, keep=None):
    """Logits, MLP outputs and MLP inputs; ``mode`` 'clean', 'zero' or 'relu' at every MLP, or
    ('relu', i) for MLP i alone. With ``keep``, the splice applies only where keep is True."""
    outs: dict[int, torch.Tensor] = {}
    ins: dict[int, torch.Tensor] = {}
    handles = []
    for i in range(N_LAYER):

        def hook(_m, args, out, i=i):
            ins[i] = args[0].detach().double()
            here = mode if isinstance(mode, str) else (mode[0] if mode[1] == i else "clean")
            if here == "zero":
                new = torch.zeros_like(out)
            elif here == "relu":
                new = reconstruct(model, i, args[0], "relu")
                if keep is not None:
                    new = torch.where(keep[..., None], new, out)
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
    return logits, outs, ins


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, VOCAB, (6, 10), generator=g)
    t[:, 0] = 0  # a BOS-like special token starts every sequence
    t[1, 4] = 7
    t[3, 9] = 7
    t[4, 2] = 0
    return t


@pytest.fixture
def toy():
    with temporary_plugins(("toytc", ToyPlugin()), entry_points=False) as host:
        yield host.load_adapter("toytc:demo")


def test_saelens_convention_matches_saelens_formulas(toy) -> None:
    tokens = _tokens()
    batches = [tokens[:4], tokens[4:]]
    cfg = FidelityConfig(use_harvest=False, convention="saelens", variants=("relu",))
    res = fidelity_on_batches(toy, batches, cfg, special_ids=SPECIAL)
    model = toy.load_base_model()
    keep = ~torch.isin(tokens, torch.tensor(SPECIAL))
    assert res.convention == "saelens" and res.n_excluded_positions == int((~keep).sum()) >= 8

    clean, clean_outs, _ = _run(model, tokens, "clean")
    spl, _, _ = _run(model, tokens, "relu", keep)
    abl, _, _ = _run(model, tokens, "zero")  # SAELens ablates everywhere

    def ce(logits):
        per = F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="none"
        )
        return per[keep[:, :-1].reshape(-1)].mean().item()

    def kl(other):
        p = F.softmax(clean, -1)
        k = (p * (F.log_softmax(clean, -1) - F.log_softmax(other, -1))).sum(-1)
        return k[keep].mean().item()

    row = res.loss_row("all", "relu")
    assert row.ce_clean == pytest.approx(ce(clean), abs=1e-6)
    assert row.ce_spliced == pytest.approx(ce(spl), abs=1e-5)
    assert row.ce_ablated == pytest.approx(ce(abl), abs=1e-5)
    assert row.kl_spliced == pytest.approx(kl(spl), abs=1e-6)
    assert row.kl_ablated == pytest.approx(kl(abl), abs=1e-5)
    assert row.n_predictions == int(keep[:, :-1].sum())
    # a splice that ignored the mask would give a different CE: the exclusion is observable
    spl_everywhere, _, _ = _run(model, tokens, "relu")
    assert abs(ce(spl_everywhere) - ce(spl)) > 1e-4

    for i in range(N_LAYER):
        # per site, SAELens' SAE-on-clean-activations numbers
        (rec,) = [r for r in res.recon if r.scope == f"{i}.mlp"]
        _, outs, ins = _run(model, tokens, ("relu", i), keep)
        k = keep.reshape(-1)
        x = clean_outs[i].reshape(-1, clean_outs[i].shape[-1])[k]
        y = outs[i].reshape(-1, x.shape[-1])[k]
        assert rec.n_tokens == int(k.sum())
        assert rec.mse == pytest.approx(((x - y) ** 2).sum(-1).mean().item(), rel=1e-6)
        var = (x**2).sum(-1).mean() - (x.mean(0) ** 2).sum()
        ev = 1 - ((x - y) ** 2).sum(-1).mean() / var
        assert rec.explained_variance == pytest.approx(ev.item(), abs=1e-6)
        cos = ((x / x.norm(dim=-1, keepdim=True)) * (y / y.norm(dim=-1, keepdim=True))).sum(-1)
        assert rec.cosine_similarity == pytest.approx(cos.mean().item(), abs=1e-6)
        assert rec.l2_ratio == pytest.approx(
            (y.norm(dim=-1) / x.norm(dim=-1)).mean().item(), rel=1e-6
        )
        rrbs = []
        for sl in (slice(0, 4), slice(4, 6)):
            kb = keep[sl].reshape(-1)
            xb = clean_outs[i][sl].reshape(-1, x.shape[-1])[kb]
            yb = outs[i][sl].reshape(-1, x.shape[-1])[kb]
            rrbs.append(((yb.norm(dim=-1) ** 2).mean() / (xb * yb).sum(-1).mean()).item())
        assert rec.relative_reconstruction_bias == pytest.approx(sum(rrbs) / 2, rel=1e-6)
        # L0 / L1 / density of the toy's ReLU activations over kept tokens
        acts = F.relu(pre_acts(model, i, ins[i].float())).double().reshape(-1, 32)[k]
        (sp,) = [s for s in res.sparsity if s.site == f"{i}.mlp"]
        assert sp.l0 == pytest.approx((acts > 0).sum(-1).double().mean().item(), abs=1e-9)
        assert sp.l1 == pytest.approx(acts.abs().sum(-1).mean().item(), rel=1e-5)
        density = (acts > 0).double().mean(0)
        assert sp.feature_density == pytest.approx(density.tolist(), abs=1e-12)
        assert sum(sp.density_histogram or []) == 32


def test_goodfire_convention_weights_per_batch_means_by_batch_size(toy) -> None:
    tokens = _tokens()
    batches = [tokens[:1], tokens[1:6]]  # very uneven: per-batch averaging differs from pooling
    cfg = FidelityConfig(use_harvest=False, convention="goodfire", variants=("relu",))
    res = fidelity_on_batches(toy, batches, cfg)
    model = toy.load_base_model()
    sums = {"ce": 0.0, "unrec": 0.0, "diff": 0.0, "kl": 0.0, "ce_target": 0.0}
    n = 0
    for b in batches:
        clean, _, _ = _run(model, b, "clean")
        spl, _, _ = _run(model, b, "relu")
        zero, _, _ = _run(model, b, "zero")

        def ce(logits, b=b):
            # Goodfire: flatten, mask the first token of every row, shift by one
            labels = b.clone()
            labels[:, 0] = -100
            flat = logits.reshape(-1, VOCAB)
            return F.cross_entropy(flat[:-1], labels.reshape(-1)[1:], ignore_index=-100).item()

        def kl(pred, clean=clean):
            return (
                F.kl_div(F.log_softmax(pred, -1), F.softmax(clean, -1), reduction="none")
                .sum(-1)
                .mean()
                .item()
            )

        t, s, z = ce(clean), ce(spl), ce(zero)
        w = b.shape[0] * b.shape[1]
        sums["ce"] += s * w
        sums["ce_target"] += t * w
        sums["unrec"] += (s - t) / (z - t) * w
        sums["diff"] += (s - t) * w
        sums["kl"] += kl(spl) * w
        n += w
    row = res.loss_row("all", "relu")
    assert row.ce_unrecovered == pytest.approx(sums["unrec"] / n, abs=1e-6)
    assert row.ce_difference == pytest.approx(sums["diff"] / n, abs=1e-6)
    assert row.ce_spliced == pytest.approx(sums["ce"] / n, abs=1e-6)
    assert row.ce_clean == pytest.approx(sums["ce_target"] / n, abs=1e-6)
    assert row.kl_spliced == pytest.approx(sums["kl"] / n, abs=1e-6)
    pooled = fidelity_on_batches(toy, batches, cfg.model_copy(update={"convention": "spd-host"}))
    # equal S: the B*S weighting of per-batch CE means is the pooled mean, but the per-batch
    # ratio is not the ratio of the pooled means
    p = pooled.loss_row("all", "relu")
    assert p.ce_spliced == pytest.approx(row.ce_spliced, abs=1e-9)
    assert p.ce_loss_score is not None
    assert abs((1 - p.ce_loss_score) - row.ce_unrecovered) > 1e-4
    assert res.convention == "goodfire" and pooled.convention == "spd-host"


def test_special_token_ids_are_saelens_set() -> None:
    tok = build_tokenizer()
    # every *_token_id that is set (unk and eos here) and the special_tokens_map entries
    assert special_token_ids(tok) == sorted({tok.unk_token_id, tok.eos_token_id})


def test_bos_option_prepends_and_keeps_length() -> None:
    b = torch.arange(12).reshape(2, 6)
    (out,) = list(with_bos([b], 99))
    assert out.shape == b.shape
    assert out[:, 0].tolist() == [99, 99] and torch.equal(out[:, 1:], b[:, :-1])
    tok = build_tokenizer()  # no BOS and adds none
    assert resolve_prepend_bos(FidelityConfig(), {}, tok) is False
    assert resolve_prepend_bos(FidelityConfig(), {"prepend_bos": True}, tok) is True
    assert (
        resolve_prepend_bos(FidelityConfig(prepend_bos=False), {"prepend_bos": True}, tok) is False
    )


def test_fused_ce_kl_equals_the_separate_definitions() -> None:
    from spd_host.evals.metrics import ce_and_kl_sums, kl_sum, next_token_ce_sum

    g = torch.Generator().manual_seed(0)
    logits_clean, logits = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    keep = torch.rand(3, 5, generator=g) > 0.3
    lp = F.log_softmax(logits_clean, -1)
    for k in (None, keep):
        ce, kl = ce_and_kl_sums(lp, lp.exp(), logits, tokens, k)
        ce_ref, kl_ref = next_token_ce_sum(logits, tokens, k), kl_sum(lp, logits, k)
        assert ce[1] == ce_ref[1] and kl[1] == kl_ref[1]
        assert ce[0] == pytest.approx(ce_ref[0], rel=1e-6)
        assert kl[0] == pytest.approx(kl_ref[0], rel=1e-6)


def test_fused_gelu_is_the_same_formula_and_is_undone() -> None:
    from transformers.activations import NewGELUActivation

    from spd_host.evals.fidelity import _fused_gelu

    model = torch.nn.Sequential(NewGELUActivation())
    x = torch.linspace(-6, 6, 1001)
    with torch.no_grad():
        ref = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
        with _fused_gelu(model, True):
            assert "forward" in vars(model[0])
            fused = model(x)
        assert "forward" not in vars(model[0])
    assert torch.allclose(fused, ref, atol=1e-6)


def test_progress_is_reported_through_the_callback(toy) -> None:
    from spd_host.evals.fidelity import reporting_progress

    seen: list[tuple[int, int | None, str]] = []
    tokens = _tokens()
    with reporting_progress(lambda d, t, w: seen.append((d, t, w))):
        fidelity_on_batches(
            toy, [tokens[:2], tokens[2:]], FidelityConfig(use_harvest=False), n_batches_hint=2
        )
    assert seen == [(1, 2, "toytc:demo"), (2, 2, "toytc:demo")]
