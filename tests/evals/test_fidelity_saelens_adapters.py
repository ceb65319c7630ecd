"""``--convention saelens`` through the real transcoder adapter on a SAELens-format SAE (on
``blocks.2.hook_resid_pre``), against SAELens' formulas written out here: the SAE
``relu((x - b_dec) W_enc + b_enc) W_dec + b_dec`` spliced only at non-special positions
(``torch.where(mask, sae_out, x)``), zero-ablation everywhere, special positions dropped from
every statistic, MSE as the per-token sum, ``l2_ratio``, ``relative_reconstruction_bias``, L0
(``acts != 0``), L1 and feature density; and the demo transcoder end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from spd_host.evals.configs import FidelityConfig
from spd_host.evals.fidelity import fidelity_on_batches
from spd_host.plugins import get_host

formats = pytest.importorskip("tests.transcoder.test_formats")
SPECIAL = [0, 7]
V = 40


def _model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=formats.D,
            n_head=2,
            n_layer=3,
            vocab_size=V,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()


def _forward(model, tokens, fn):
    """Logits, and the block-2 input before / after ``fn`` (None: clean)."""
    seen: dict[str, torch.Tensor] = {}

    def pre(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen["x"] = x.detach().double()
        if fn is None:
            return None
        new = fn(x)
        seen["y"] = new.detach().double()
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    h = model.transformer.h[2].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(tokens).logits.double()
    finally:
        h.remove()
    return logits, seen


def test_saelens_convention_on_a_saelens_sae(tmp_path: Path) -> None:
    t = formats.write_saelens(tmp_path / "sae", "standard", gen=torch.Generator().manual_seed(3))
    adapter = get_host().load_adapter(f"transcoder:{tmp_path / 'sae'}")
    model = _model()
    adapter.load_base_model = lambda: model  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (5, 12), generator=g)
    tokens[:, 0] = 0
    tokens[2, 5] = 7
    batches = [tokens[:2], tokens[2:]]
    res = fidelity_on_batches(
        adapter,
        batches,
        FidelityConfig(use_harvest=False, convention="saelens"),
        special_ids=SPECIAL,
    )
    keep = ~torch.isin(tokens, torch.tensor(SPECIAL))

    def acts_of(x):
        return F.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])

    def sae(x):
        return acts_of(x) @ t["W_dec"] + t["b_dec"]

    clean, seen_c = _forward(model, tokens, None)
    spl, _ = _forward(model, tokens, lambda x: torch.where(keep[..., None], sae(x), x))
    abl, _ = _forward(model, tokens, torch.zeros_like)
    p = F.softmax(clean, -1)

    def per_ce(lg: torch.Tensor) -> float:
        per = F.cross_entropy(
            lg[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none"
        )
        return per[keep[:, :-1].reshape(-1)].mean().item()

    def kl(o: torch.Tensor) -> float:
        return (p * (F.log_softmax(clean, -1) - F.log_softmax(o, -1))).sum(-1)[keep].mean().item()

    (row,) = res.loss
    assert res.convention == "saelens"
    assert row.ce_spliced == pytest.approx(per_ce(spl), abs=1e-5)
    assert row.ce_ablated == pytest.approx(per_ce(abl), abs=1e-5)
    assert row.ce_clean == pytest.approx(per_ce(clean), abs=1e-5)
    assert row.kl_spliced == pytest.approx(kl(spl), abs=1e-6)
    assert row.kl_div_score == pytest.approx((kl(abl) - kl(spl)) / kl(abl), rel=1e-4)

    k = keep.reshape(-1)
    x = seen_c["x"].reshape(-1, formats.D)[k]
    y = sae(seen_c["x"].float()).double().reshape(-1, formats.D)[k]
    (rec,) = res.recon
    assert rec.n_tokens == int(k.sum())
    assert rec.mse == pytest.approx(((x - y) ** 2).sum(-1).mean().item(), rel=1e-5)
    var = (x**2).sum(-1).mean() - (x.mean(0) ** 2).sum()
    assert rec.explained_variance == pytest.approx(
        (1 - ((x - y) ** 2).sum(-1).mean() / var).item(), abs=1e-5
    )
    assert rec.l2_ratio == pytest.approx((y.norm(dim=-1) / x.norm(dim=-1)).mean().item(), rel=1e-5)
    rrb = []
    for sl in (slice(0, 2), slice(2, 5)):
        kb = keep[sl].reshape(-1)
        xb = seen_c["x"][sl].reshape(-1, formats.D)[kb]
        yb = sae(seen_c["x"][sl].float()).double().reshape(-1, formats.D)[kb]
        rrb.append(((yb.norm(dim=-1) ** 2).mean() / (xb * yb).sum(-1).mean()).item())
    assert rec.relative_reconstruction_bias == pytest.approx(sum(rrb) / 2, rel=1e-5)
    a = acts_of(seen_c["x"].float()).double().reshape(-1, formats.N)[k]
    (sp,) = res.sparsity
    assert sp.l0 == pytest.approx((a != 0).sum(-1).double().mean().item(), abs=1e-9)
    assert sp.l1 == pytest.approx(a.abs().sum(-1).mean().item(), rel=1e-5)
    assert sp.feature_density == pytest.approx((a != 0).double().mean(0).tolist(), abs=1e-12)


@pytest.mark.slow
def test_saelens_convention_on_the_demo_transcoder() -> None:
    from spd_host.evals.fidelity import run_fidelity, special_token_ids

    adapter = get_host().load_adapter("transcoder:demo")
    cfg = FidelityConfig(use_harvest=False, convention="saelens", n_tokens=512, per_site=False)
    res = run_fidelity(adapter, cfg)
    tok = adapter.load_tokenizer()
    assert res.special_token_ids == special_token_ids(tok)
    assert tok.eos_token_id in res.special_token_ids
    # the demo stream separates documents with EOS; the count is what the tokens hold
    assert res.n_excluded_positions >= 0
    for r in res.recon:
        assert r.mse == pytest.approx(r.mse_per_token)
        assert r.n_tokens == res.n_tokens - res.n_excluded_positions
    assert res.loss[0].n_positions == res.n_tokens - res.n_excluded_positions
