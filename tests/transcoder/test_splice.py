"""Splicing transcoders, SAEs and CLTs into a real (tiny, random) GPT-2, checked against
reconstructions applied by hand with plain PyTorch module hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from spd_host.errors import FormatError
from spd_host.plugins import get_host
from tests.clt.test_formats import reference as clt_reference
from tests.clt.test_formats import write_clt
from tests.transcoder.test_formats import (
    circuit_tracer_reference,
    saelens_reference,
    write_circuit_tracer,
    write_saelens,
)


@pytest.fixture
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=8, n_head=2, n_layer=3, vocab_size=40, n_positions=16)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(0))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def logits_with_mlp_outputs(model, tokens, fns: dict[int, object]) -> torch.Tensor:
    """Replace block i's MLP output by fns[i](MLP input) with forward hooks."""
    handles = []
    for i, fn in fns.items():
        handles.append(
            model.transformer.h[i].mlp.register_forward_hook(
                lambda m, args, out, fn=fn: fn(args[0])
            )
        )
    try:
        with torch.no_grad():
            return model(tokens).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("chosen", [None, ["layer_1"]])
def test_transcoder_splice_matches_hand_applied_hooks(
    tmp_path: Path, model, tokens, chosen
) -> None:
    gen = torch.Generator().manual_seed(5)
    layers = write_circuit_tracer(tmp_path / "ct", 3, gen=gen, threshold=True)
    adapter = get_host().load_adapter(f"transcoder:{tmp_path / 'ct'}")
    adapter.check_hooks(model)
    with torch.no_grad():
        clean = model(tokens).logits
        with adapter.splice(model, sites=chosen):
            spliced = model(tokens).logits
    after = model(tokens).logits
    wanted = range(3) if chosen is None else [1]
    expected = logits_with_mlp_outputs(
        model,
        tokens,
        {
            i: (
                lambda x, t=layers[i]: circuit_tracer_reference(t, x.reshape(-1, 8))[1].reshape(
                    x.shape
                )
            )
            for i in wanted
        },
    )
    assert rel_err(spliced, expected) < 1e-5
    assert rel_err(spliced, clean) > 1e-3
    assert torch.equal(after.detach(), clean)  # hooks removed on exit


def test_sae_splice_replaces_the_hook_point_it_reads(tmp_path: Path, model, tokens) -> None:
    gen = torch.Generator().manual_seed(6)
    t = write_saelens(
        tmp_path / "sae", "jumprelu", gen=gen
    )  # reads and writes blocks.2.hook_resid_pre
    adapter = get_host().load_adapter(f"transcoder:{tmp_path / 'sae'}")
    assert adapter.sites[0].reads_from == adapter.sites[0].writes_to[0] == "2.resid_pre"

    def pre_hook(module, args, kwargs):
        x = args[0]
        new = saelens_reference(t, x.reshape(-1, 8), arch="jumprelu")[1].reshape(x.shape)
        return (new, *args[1:]), kwargs

    h = model.transformer.h[2].register_forward_pre_hook(pre_hook, with_kwargs=True)
    with torch.no_grad():
        expected = model(tokens).logits
    h.remove()
    with torch.no_grad(), adapter.splice(model):
        spliced = model(tokens).logits
    assert rel_err(spliced, expected) < 1e-5


def test_clt_splice_sums_decoders_of_earlier_layers(tmp_path: Path, model, tokens) -> None:
    gen = torch.Generator().manual_seed(7)
    w = write_clt(tmp_path / "clt", gen=gen)  # reads hook_resid_mid, writes hook_mlp_out
    adapter = get_host().load_adapter(f"clt:{tmp_path / 'clt'}")
    resid_mid: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.transformer.h):
        handles.append(
            block.ln_2.register_forward_pre_hook(
                lambda m, args, i=i: resid_mid.__setitem__(i, args[0])
            )
        )

        def mlp_hook(m, args, out, j=i):
            xs = torch.stack(
                [resid_mid[k].reshape(-1, 8) for k in range(j + 1)]
                + [resid_mid[j].reshape(-1, 8)] * (3 - j - 1)
            )
            return clt_reference(w, xs)[1][j].reshape(out.shape)

        handles.append(block.mlp.register_forward_hook(mlp_hook))
    with torch.no_grad():
        expected = model(tokens).logits
    for h in handles:
        h.remove()
    with torch.no_grad(), adapter.splice(model):
        spliced = model(tokens).logits
    assert rel_err(spliced, expected) < 1e-5


def test_config_naming_a_hook_the_model_lacks(tmp_path: Path, model) -> None:
    write_circuit_tracer(
        tmp_path / "ct", 5, gen=torch.Generator().manual_seed(0)
    )  # model has 3 layers
    adapter = get_host().load_adapter(f"transcoder:{tmp_path / 'ct'}")
    with pytest.raises(
        FormatError,
        match=r"config\.yaml: hook 'mlp\.hook_in' \(canonical '3\.mlp_in'\) does not exist in the base model \(gpt2, 3 layers\)",
    ):
        adapter.check_hooks(model)
    write_clt(tmp_path / "clt", gen=torch.Generator().manual_seed(0))
    clt = get_host().load_adapter(f"clt:{tmp_path / 'clt'}")
    clt.check_hooks(model)  # 3 layers: fits
