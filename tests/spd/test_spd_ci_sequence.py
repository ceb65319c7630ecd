"""Runs with the dev branch's sequence-level CI functions and with inserted identity modules.

Each test writes a run in the exact on-disk layout (``final_config.yaml`` with the real field
names, nulls included; ``model_<step>.pth`` with the real keys, RoPE buffers included), loads it
by ID and compares causal importance and component activations with the independent formulas of
``tests/spd/reference.py`` to 1e-5 (fp32).
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from spd_host.adapter import HarvestOptions
from spd_host.plugins import get_host
from tests.spd import reference as ref
from tests.spd.run_writer import (
    GPT2_PATTERNS,
    LLAMA_PATTERNS,
    VOCAB,
    tiny_gpt2,
    tiny_llama,
    write_run,
)

GPT2 = "transformers.GPT2LMHeadModel"
LLAMA = "transformers.LlamaForCausalLM"
NULLS = {
    "hidden_dims": None,
    "reader_hidden_dims": None,
    "d_resid_ci_fn": None,
    "block_groups": None,
    "transition_attn_config": None,
    "transition_hidden_dim": None,
    "simple_transformer_ci_cfg": None,
}
IDENT = ".pre_identity"


def shared_transformer(d_model: int, n_blocks: int, mlp: list[int], heads: int, base: float):
    return {
        **NULLS,
        "mode": "global",
        "fn_type": "global_shared_transformer",
        "simple_transformer_ci_cfg": {
            "d_model": d_model,
            "n_blocks": n_blocks,
            "mlp_hidden_dim": mlp,
            "attn_config": {"n_heads": heads, "max_len": 32, "rope_base": base},
        },
    }


def reverse_residual(groups, d: int, reader: list[int], hidden: int | None, attn: dict | None):
    return {
        **NULLS,
        "mode": "global",
        "fn_type": "global_reverse_residual",
        "block_groups": [{"name": n, "patterns": p} for n, p in groups],
        "d_resid_ci_fn": d,
        "reader_hidden_dims": reader,
        "transition_hidden_dim": hidden,
        "transition_attn_config": attn,
    }


# The reference orders decomposed modules by pattern (module_info, then identity patterns), then
# by named_modules; a block's members follow its patterns in that order (not sorted).
LLAMA_RR_PATTERNS = {
    "model.layers.*.mlp.down_proj": 6,
    "model.layers.0.self_attn.q_proj": 5,
    "model.layers.0.self_attn.k_proj": 3,
    "model.layers.*.mlp.up_proj": 4,
}
LLAMA_RR_GROUPS = [
    ("layer.1", ["model.layers.1.*"]),
    ("layer_0", ["model.layers.0.self_attn.*", "model.layers.0.mlp.*"]),
]
GPT2_RR_GROUPS = [
    ("unembed_side", ["transformer.h.1.*"]),
    ("l0", ["transformer.h.0.*"]),
    ("embed", ["transformer.wte"]),
]
ATTN = {"n_heads": 2, "max_len": 32, "rope_base": 10000.0}

CASES: dict[str, tuple[str, dict[str, int], dict[str, Any], list]] = {
    "gpt2-transformer": (
        "gpt2",
        dict(GPT2_PATTERNS),
        shared_transformer(8, 2, [12], 2, 10000.0),
        [],
    ),
    "llama-transformer": (
        "llama",
        dict(LLAMA_PATTERNS),
        shared_transformer(12, 1, [], 3, 500.0),
        [],
    ),
    "llama-reverse-attn": (
        "llama",
        LLAMA_RR_PATTERNS,
        reverse_residual(LLAMA_RR_GROUPS, 8, [6], 10, ATTN),
        LLAMA_RR_GROUPS,
    ),
    "gpt2-reverse-mlp": (
        "gpt2",
        dict(GPT2_PATTERNS),
        reverse_residual(GPT2_RR_GROUPS, 6, [], None, None),
        GPT2_RR_GROUPS,
    ),
}


def reference_order(model: nn.Module, patterns: dict[str, int], identity: dict[str, int]):
    names = [n for n, _ in model.named_modules() if n]
    order = [n for p in patterns for n in names if fnmatch.fnmatch(n, p)]
    order += [n + IDENT for p in identity for n in names if fnmatch.fnmatch(n, p)]
    return order


def members(order: list[str], groups: list) -> list[tuple[str, list[str]]]:
    return [
        (name, [m for p in pats for m in order if fnmatch.fnmatch(m, p)]) for name, pats in groups
    ]


def tokens(seed: int = 3, seq: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seed))


def module_inputs(
    model: nn.Module, paths: list[str], toks: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Each site's input on the clean model (an identity's input is its module's input)."""
    got: dict[str, torch.Tensor] = {}
    hs = [
        model.get_submodule(p.removesuffix(IDENT)).register_forward_pre_hook(
            lambda m, a, _p=p: got.__setitem__(_p, a[0])
        )
        for p in paths
    ]
    with torch.no_grad():
        model(toks)
    for h in hs:
        h.remove()
    return got


def reference_ci(model, sd, order, sizes, ci, blocks, toks, sigmoid="leaky_hard"):
    xs = module_inputs(model, order, toks)
    emb = {p for p in order if isinstance(model.get_submodule(p.removesuffix(IDENT)), nn.Embedding)}
    acts = {p: ref.component_acts(sd, p, xs[p], p in emb) for p in order}
    ci_in = {p: acts[p] if p in emb else xs[p].float() for p in order}
    fn = ci["fn_type"]
    if fn == "global_shared_transformer":
        z = ref.pre_sigmoid_shared_transformer(sd, ci_in, sizes, ci["simple_transformer_ci_cfg"])
    elif fn == "global_reverse_residual":
        z = ref.pre_sigmoid_reverse_residual(sd, ci_in, sizes, blocks, ci)
    elif fn == "global_shared_mlp":
        z = ref.pre_sigmoid_global(sd, xs, emb)
    else:
        z = {p: ref.pre_sigmoid_layerwise(sd, fn, p, xs[p], p in emb) for p in order}
    reported = {p: ref.reported_component_activation(sd, p, xs[p], p in emb) for p in order}
    return {p: ref.sigmoid(sigmoid, z[p]) for p in order}, reported


def write_case(tmp_path: Path, case: str, *, inv_freq_scale: float = 1.0):
    arch, patterns, ci, groups = CASES[case]
    model = tiny_gpt2() if arch == "gpt2" else tiny_llama()
    order = reference_order(model, patterns, {})
    blocks = members(order, groups)
    run = tmp_path / case
    sd = write_run(
        run,
        model,
        model_class=GPT2 if arch == "gpt2" else LLAMA,
        patterns=patterns,
        fn_type=ci["fn_type"],
        hidden=[],
        ci_config=ci,
        blocks=blocks,
    )
    if inv_freq_scale != 1.0:  # the checkpoint's RoPE buffer, not a recomputation, is the truth
        for k in sd:
            if k.endswith("rope.inv_freq"):
                sd[k] = sd[k] * inv_freq_scale
        torch.save(sd, run / "model_200.pth")
    sizes = {p: patterns_c(patterns, p) for p in order}
    return run, model, sd, order, sizes, ci, blocks


def patterns_c(patterns: dict[str, int], path: str) -> int:
    return next(c for p, c in patterns.items() if fnmatch.fnmatch(path.removesuffix(IDENT), p))


def check_against_reference(run, model, sd, order, sizes, ci, blocks, threshold=0.0):
    host = get_host()
    adapter = host.load_adapter(f"spd:{run}")
    names = adapter.site_names_by_path()  # type: ignore[attr-defined]
    assert set(names) == set(order)
    assert {s.name: s.n_components for s in adapter.sites} == {names[p]: sizes[p] for p in order}
    toks = tokens()
    batch = host.harvest_fn(adapter, HarvestOptions(threshold=threshold))(toks)
    ci_ref, acts_ref = reference_ci(model, sd, order, sizes, ci, blocks, toks)
    inside = 0
    for p in order:
        got = batch.activations[names[p]]
        torch.testing.assert_close(got["causal_importance"], ci_ref[p], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["component_activation"], acts_ref[p], atol=1e-5, rtol=1e-5)
        assert torch.equal(batch.firings[names[p]], ci_ref[p] > threshold)
        inside += int(((ci_ref[p] > 0.02) & (ci_ref[p] < 0.98)).sum())
    total = sum(int(ci_ref[p].numel()) for p in order)
    assert inside > total // 4, "test weights must put many CIs strictly inside (0, 1)"
    with torch.no_grad():
        torch.testing.assert_close(batch.next_token_logits, model(toks).logits)
    return adapter


@pytest.mark.parametrize("case", list(CASES))
def test_sequence_ci_matches_reference(tmp_path: Path, case: str) -> None:
    check_against_reference(*write_case(tmp_path, case))


@pytest.mark.parametrize("case", ["gpt2-transformer", "llama-reverse-attn"])
def test_rope_buffer_from_checkpoint_is_used(tmp_path: Path, case: str) -> None:
    check_against_reference(*write_case(tmp_path, case, inv_freq_scale=1.37))


@pytest.mark.parametrize(
    ("case", "causal"),
    [("gpt2-transformer", False), ("llama-reverse-attn", False), ("gpt2-reverse-mlp", True)],
)
def test_non_causal_ci_is_flagged_and_sees_later_tokens(
    tmp_path: Path, case: str, causal: bool
) -> None:
    run, *_ = write_case(tmp_path, case)
    host = get_host()
    adapter = host.load_adapter(f"spd:{run}")
    assert adapter.defaults.extra["ci_causal"] is causal
    note = "depends on the tokens after it"
    assert (note in adapter.method.description) is not causal
    assert all((note in s.description) is not causal for s in adapter.sites)
    fn = host.harvest_fn(adapter)
    a = tokens()
    b = a.clone()
    b[:, -1] = (b[:, -1] + 1) % VOCAB  # change only the last token
    ca, cb = fn(a), fn(b)
    early_changed = any(
        not torch.allclose(
            ca.activations[s]["causal_importance"][:, :-1],
            cb.activations[s]["causal_importance"][:, :-1],
        )
        for s in ca.activations
    )
    assert early_changed is not causal


def test_seq_longer_than_rope_max_len_is_a_clear_error(tmp_path: Path) -> None:
    from spd_host.errors import ConfigError

    run, *_ = write_case(tmp_path, "llama-transformer")
    host = get_host()
    fn = host.harvest_fn(host.load_adapter(f"spd:{run}"))
    with pytest.raises(ConfigError, match="exceeds the CI function's attention max_len 32"):
        fn(tokens(seq=33))


# ------------------------------------------------------------------------------ identity modules
def test_identity_modules_layerwise(tmp_path: Path) -> None:
    model = tiny_llama()
    patterns = {"model.layers.0.self_attn.q_proj": 5}
    identity = {"model.layers.*.mlp.down_proj": 4}
    run = tmp_path / "run"
    sd = write_run(
        run,
        model,
        model_class=LLAMA,
        patterns=patterns,
        fn_type="shared_mlp",
        hidden=[4],
        identity=identity,
    )
    assert "_components.model-layers-0-mlp-down_proj-pre_identity.V" in sd
    assert sd["_components.model-layers-0-mlp-down_proj-pre_identity.U"].shape == (4, 24)
    order = reference_order(model, patterns, identity)
    sizes = {p: 5 if "q_proj" in p else 4 for p in order}
    ci = {"mode": "layerwise", "fn_type": "shared_mlp", "hidden_dims": [4]}
    adapter = check_against_reference(run, model, sd, order, sizes, ci, [])
    sites = {s.name: s for s in adapter.sites}
    assert set(sites) == {"0.attn.q", "0.glu.down.pre_identity", "1.glu.down.pre_identity"}
    ident = sites["1.glu.down.pre_identity"]
    assert (ident.reads_from, ident.writes_to, ident.address) == (
        "1.mlp_hidden",
        ("1.mlp_hidden",),
        None,
    )
    assert sites["0.attn.q"].reads_from == "0.attn_in"
    assert adapter.defaults.extra["identity_modules"] == [
        "model.layers.0.mlp.down_proj.pre_identity",
        "model.layers.1.mlp.down_proj.pre_identity",
    ]


def test_identity_modules_in_reverse_residual_blocks(tmp_path: Path) -> None:
    """A Conv1D identity (GPT-2), ordered inside its block by the patterns, not sorted."""
    model = tiny_gpt2()
    patterns = {"transformer.h.*.mlp.c_fc": 6}
    identity = {"transformer.h.0.mlp.c_proj": 3}
    groups = [("b1", ["transformer.h.1.*"]), ("b0", ["*.pre_identity", "transformer.h.0.mlp.c_fc"])]
    ci = reverse_residual(groups, 8, [5], 7, ATTN)
    order = reference_order(model, patterns, identity)
    blocks = members(order, groups)
    assert blocks[1][1] == ["transformer.h.0.mlp.c_proj.pre_identity", "transformer.h.0.mlp.c_fc"]
    run = tmp_path / "run"
    sd = write_run(
        run,
        model,
        model_class=GPT2,
        patterns=patterns,
        fn_type=ci["fn_type"],
        hidden=[],
        ci_config=ci,
        identity=identity,
        blocks=blocks,
    )
    assert sd["_components.transformer-h-0-mlp-c_proj-pre_identity.V"].shape == (64, 3)
    sizes = {p: 3 if p.endswith(IDENT) else 6 for p in order}
    check_against_reference(run, model, sd, order, sizes, ci, blocks)


def test_identity_splice_replaces_the_module_input(tmp_path: Path) -> None:
    """ci_masked on an identity site: the down projection sees ((x V) * ci) U instead of x."""
    model = tiny_llama()
    patterns = {"model.layers.0.self_attn.q_proj": 5}
    identity = {"model.layers.1.mlp.down_proj": 4}
    run = tmp_path / "run"
    sd = write_run(
        run,
        model,
        model_class=LLAMA,
        patterns=patterns,
        fn_type="shared_mlp",
        hidden=[4],
        identity=identity,
    )
    order = reference_order(model, patterns, identity)
    ci = {"mode": "layerwise", "fn_type": "shared_mlp", "hidden_dims": [4]}
    toks = tokens()
    ci_ref, _ = reference_ci(model, sd, order, {p: 4 for p in order}, ci, [], toks)
    path = "model.layers.1.mlp.down_proj.pre_identity"
    V, U = (
        sd[f"_components.{path.replace('.', '-')}.V"],
        sd[f"_components.{path.replace('.', '-')}.U"],
    )

    def hook(_m: nn.Module, args: tuple) -> tuple:
        return (((args[0] @ V) * ci_ref[path]) @ U,)

    h = model.get_submodule("model.layers.1.mlp.down_proj").register_forward_pre_hook(hook)
    with torch.no_grad():
        want = model(toks).logits
    h.remove()
    adapter = get_host().load_adapter(f"spd:{run}")
    base = adapter.load_base_model()
    with torch.no_grad(), adapter.splice(base, sites=["1.glu.down.pre_identity"]):  # type: ignore[attr-defined]
        got = base(toks).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_identity_modules_from_legacy_config_keys(tmp_path: Path) -> None:
    """Old configs: one global C, target_module_patterns and identity_module_patterns."""
    import yaml

    model = tiny_llama()
    patterns = {"model.layers.0.self_attn.q_proj": 4}
    identity = {"model.layers.1.mlp.down_proj": 4}
    run = tmp_path / "run"
    sd = write_run(
        run,
        model,
        model_class=LLAMA,
        patterns=patterns,
        fn_type="vector_mlp",
        hidden=[3],
        identity=identity,
    )
    path = run / "final_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    for key in ("module_info", "identity_module_info", "ci_config"):
        cfg.pop(key)
    cfg.update(
        C=4,
        target_module_patterns=list(patterns),
        identity_module_patterns=list(identity),
        ci_fn_type="vector_mlp",
        ci_fn_hidden_dims=[3],
    )
    path.write_text(yaml.safe_dump(cfg))
    order = reference_order(model, patterns, identity)
    ci = {"mode": "layerwise", "fn_type": "vector_mlp", "hidden_dims": [3]}
    adapter = check_against_reference(run, model, sd, order, {p: 4 for p in order}, ci, [])
    assert "1.glu.down.pre_identity" in {s.name for s in adapter.sites}
