"""Splicing components into the base model: exact decompositions and hand-made masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from spd_host.adapter import SupportsSplice
from spd_host.plugins import get_host
from tests.spd import reference as ref
from tests.spd.run_writer import expand, make_state_dict, tiny_gpt2, tiny_llama, write_run

GPT2 = (
    "transformers.GPT2LMHeadModel",
    {"transformer.h.*.mlp.c_fc": 16, "transformer.h.0.mlp.c_proj": 64, "transformer.wte": 61},
)
LLAMA = (
    "transformers.LlamaForCausalLM",
    {"model.layers.*.mlp.down_proj": 24, "model.layers.1.self_attn.o_proj": 16},
)


def _exact(model: nn.Module, sd: dict[str, torch.Tensor], module_to_c: dict[str, int]) -> None:
    """Overwrite components with an exact factorisation: V = I, U = W^T (Linear) or W (Conv1D/Embedding)."""
    for path, C in module_to_c.items():
        mod = model.get_submodule(path)
        W = mod.weight.detach()
        name = path.replace(".", "-")
        U = W.T if isinstance(mod, nn.Linear) else W
        assert U.shape[0] == C
        sd[f"_components.{name}.V"] = torch.eye(C)
        sd[f"_components.{name}.U"] = U.clone()


def _tokens() -> torch.Tensor:
    return torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_all_ones_exact_decomposition_reproduces_logits(tmp_path: Path, arch: str) -> None:
    model = tiny_gpt2() if arch == "gpt2" else tiny_llama()
    cls, patterns = GPT2 if arch == "gpt2" else LLAMA
    module_to_c = expand(model, patterns)
    sd = make_state_dict(model, module_to_c, "mlp", [2])
    _exact(model, sd, module_to_c)
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
    assert isinstance(adapter, SupportsSplice)
    assert set(adapter.splice_variants) == {
        "ci_masked",
        "all_ones",
        "rounded_ci",
        "zero_mask",
        "stochastic",
        "random",
    }
    base = adapter.load_base_model()
    tokens = _tokens()
    with torch.no_grad():
        clean = base(tokens).logits
        with adapter.splice(base, variant="all_ones"):
            spliced = base(tokens).logits
        with adapter.splice(base, variant="zero_mask"):
            zeroed = base(tokens).logits
        after = base(tokens).logits
    torch.testing.assert_close(spliced, clean, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(zeroed, clean, atol=1e-2)
    torch.testing.assert_close(after, clean)  # hooks removed on exit


def _hand_splice(model: nn.Module, fns: dict[str, object]) -> list:
    return [
        model.get_submodule(p).register_forward_hook(lambda m, a, o, _f=f: _f(a[0]))  # type: ignore[misc]
        for p, f in fns.items()
    ]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zero_mask_equals_bias_only_outputs(tmp_path: Path, arch: str) -> None:
    model = tiny_gpt2() if arch == "gpt2" else tiny_llama()
    cls, patterns = GPT2 if arch == "gpt2" else LLAMA
    sd = write_run(
        tmp_path / "run", model, model_class=cls, patterns=patterns, fn_type="mlp", hidden=[2]
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'run'}")
    base = adapter.load_base_model()
    tokens = _tokens()
    module_to_c = expand(model, patterns)

    def zero_out(path: str):
        mod = model.get_submodule(path)
        d_out = mod.weight.shape[1] if not isinstance(mod, nn.Linear) else mod.weight.shape[0]
        bias = getattr(mod, "bias", None)

        def f(x: torch.Tensor) -> torch.Tensor:
            shape = (*x.shape, d_out) if isinstance(mod, nn.Embedding) else (*x.shape[:-1], d_out)
            z = torch.zeros(shape)
            return z + bias if bias is not None else z

        return f

    handles = _hand_splice(model, {p: zero_out(p) for p in module_to_c})
    with torch.no_grad():
        expected = model(tokens).logits
    for h in handles:
        h.remove()
    with torch.no_grad(), adapter.splice(base, variant="zero_mask"):
        got = base(tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    del sd


@pytest.mark.parametrize("variant", ["ci_masked", "rounded_ci"])
@pytest.mark.parametrize("fn_type", ["vector_mlp", "global_shared_mlp"])
def test_ci_masks_match_reference(tmp_path: Path, variant: str, fn_type: str) -> None:
    model = tiny_llama()
    cls, patterns = LLAMA
    sd = write_run(
        tmp_path / "run", model, model_class=cls, patterns=patterns, fn_type=fn_type, hidden=[3]
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'run'}")
    base = adapter.load_base_model()
    tokens = _tokens()
    module_to_c = expand(model, patterns)
    paths = sorted(module_to_c)
    # reference: CI from the clean forward, then ((x V) * m) U + b at every decomposed module
    xs: dict[str, torch.Tensor] = {}
    hs = [
        model.get_submodule(p).register_forward_pre_hook(
            lambda m, a, _p=p: xs.__setitem__(_p, a[0])
        )
        for p in paths
    ]
    with torch.no_grad():
        clean = model(tokens).logits
    for h in hs:
        h.remove()
    if fn_type == "global_shared_mlp":
        z = ref.pre_sigmoid_global(sd, xs, set())
    else:
        z = {p: ref.pre_sigmoid_layerwise(sd, fn_type, p, xs[p], False) for p in paths}
    masks = {p: ref.sigmoid("leaky_hard", z[p]) for p in paths}
    if variant == "rounded_ci":
        masks = {p: (m > 0.5).float() for p, m in masks.items()}

    def masked(path: str):
        name = path.replace(".", "-")
        V, U = sd[f"_components.{name}.V"], sd[f"_components.{name}.U"]
        return lambda x: ((x @ V) * masks[path]) @ U

    handles = _hand_splice(model, {p: masked(p) for p in paths})
    with torch.no_grad():
        expected = model(tokens).logits
    for h in handles:
        h.remove()
    with torch.no_grad(), adapter.splice(base, variant=variant):
        got = base(tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, clean, atol=1e-3)


def test_splice_subset_of_sites(tmp_path: Path) -> None:
    model = tiny_llama()
    cls, patterns = LLAMA
    write_run(
        tmp_path / "run", model, model_class=cls, patterns=patterns, fn_type="mlp", hidden=[2]
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'run'}")
    base = adapter.load_base_model()
    one = adapter.sites[0].name
    path = {n: p for p, n in adapter.site_names_by_path().items()}[one]  # type: ignore[attr-defined]
    tokens = _tokens()
    handles = _hand_splice(model, {path: lambda x: torch.zeros(*x.shape[:-1], 16)})
    with torch.no_grad():
        expected = model(tokens).logits
    for h in handles:
        h.remove()
    with torch.no_grad(), adapter.splice(base, sites=[one], variant="zero_mask"):
        got = base(tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
