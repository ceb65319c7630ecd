"""Fidelity over the real first-party adapters (circuit-tracer transcoder, CLT) on a tiny GPT-2:
what the suite captures at each write target must be what the adapter's splice put there,
read independently with a plain forward hook on the MLP module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from spd_host.evals.configs import FidelityConfig
from spd_host.evals.fidelity import fidelity_on_batches
from spd_host.plugins import get_host

transcoder_formats = pytest.importorskip("tests.transcoder.test_formats")
clt_formats = pytest.importorskip("tests.clt.test_formats")


@pytest.mark.parametrize("kind", ["transcoder", "clt"])
def test_fidelity_reads_what_the_adapter_spliced(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            n_embd=8,
            n_head=2,
            n_layer=3,
            vocab_size=40,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()
    if kind == "transcoder":
        transcoder_formats.write_circuit_tracer(
            tmp_path / "d", 3, gen=torch.Generator().manual_seed(5), threshold=True
        )
    else:
        clt_formats.write_clt(tmp_path / "d", gen=torch.Generator().manual_seed(7))
    adapter = get_host().load_adapter(f"{kind}:{tmp_path / 'd'}")
    adapter.load_base_model = lambda: model  # type: ignore[method-assign]
    tokens = torch.randint(0, 40, (5, 12), generator=torch.Generator().manual_seed(0))
    res = fidelity_on_batches(adapter, [tokens[:2], tokens[2:]], FidelityConfig(use_harvest=False))
    (variant,) = res.variants

    outs: dict[int, torch.Tensor] = {}
    hs = [
        model.transformer.h[i].mlp.register_forward_hook(
            lambda _m, _a, out, i=i: outs.__setitem__(i, out.detach().double())
        )
        for i in range(3)
    ]
    with torch.no_grad():
        clean_logits = model(tokens).logits.double()
        clean = dict(outs)
        with adapter.splice(model, variant=variant):
            spliced_logits = model(tokens).logits.double()
        spliced = dict(outs)
    for h in hs:
        h.remove()
    row = res.loss_row("all", variant)
    ce = F.cross_entropy(spliced_logits[:, :-1].reshape(-1, 40), tokens[:, 1:].reshape(-1)).item()
    assert row.ce_spliced == pytest.approx(ce, abs=1e-5)
    ce0 = F.cross_entropy(clean_logits[:, :-1].reshape(-1, 40), tokens[:, 1:].reshape(-1)).item()
    assert row.ce_clean == pytest.approx(ce0, abs=1e-5)
    for i in range(3):
        (rec,) = [r for r in res.recon if r.scope == "all" and r.target == f"{i}.mlp_out"]
        x, y = clean[i].reshape(-1, 8), spliced[i].reshape(-1, 8)
        assert not torch.allclose(x, y)
        assert rec.mse == pytest.approx(((x - y) ** 2).mean().item(), rel=1e-5, abs=1e-9)


def test_spd_rows_per_variant_and_exact_all_ones(tmp_path: Path) -> None:
    spd_splice = pytest.importorskip("tests.spd.test_spd_splice")
    from tests.spd.run_writer import expand, make_state_dict, tiny_gpt2, write_run

    model = tiny_gpt2()
    cls, patterns = spd_splice.GPT2
    module_to_c = expand(model, patterns)
    sd = make_state_dict(model, module_to_c, "mlp", [2])
    spd_splice._exact(model, sd, module_to_c)
    write_run(
        tmp_path / "run",
        model,
        model_class=cls,
        patterns=patterns,
        fn_type="mlp",
        hidden=[2],
        state_dict=sd,
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'run'}")
    tokens = torch.randint(0, 61, (4, 7), generator=torch.Generator().manual_seed(5))
    res = fidelity_on_batches(adapter, [tokens[:2], tokens[2:]], FidelityConfig(use_harvest=False))
    assert set(res.variants) == {"ci_masked", "all_ones", "rounded_ci", "zero_mask"}
    assert [r["variant"] for r in res.table_rows()] == res.variants
    exact = res.loss_row("all", "all_ones")
    assert exact.ce_loss_score == pytest.approx(1.0, abs=1e-3)
    for r in res.recon:
        if r.variant == "all_ones":
            assert r.explained_variance == pytest.approx(1.0, abs=1e-4), r
    zero = res.loss_row("all", "zero_mask")
    assert zero.kl_spliced > exact.kl_spliced + 1e-3
    assert {s.site for s in res.sparsity} == {s.name for s in adapter.sites}
