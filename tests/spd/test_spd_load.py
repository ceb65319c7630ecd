"""SPD runs in the exact on-disk layout load by ID and reproduce the published formulas."""

from __future__ import annotations

from pathlib import Path

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
    expand,
    tiny_gpt2,
    tiny_llama,
    write_run,
)

CASES = [
    # (arch, fn_type, hidden)
    ("gpt2", "mlp", [3, 2]),
    ("gpt2", "vector_mlp", [4]),
    ("gpt2", "shared_mlp", [5]),
    ("gpt2", "shared_mlp", []),
    ("gpt2", "global_shared_mlp", [7]),
    ("llama", "mlp", [3]),
    ("llama", "vector_mlp", [3, 2]),
    ("llama", "shared_mlp", [4]),
    ("llama", "global_shared_mlp", [6, 5]),
]


def _setup(arch: str, fn_type: str) -> tuple[nn.Module, str, dict[str, int]]:
    if arch == "gpt2":
        patterns = dict(GPT2_PATTERNS)
        if fn_type in ("vector_mlp", "shared_mlp"):
            patterns.pop("transformer.wte")  # embeddings only take the scalar 'mlp' CI fn
        return tiny_gpt2(), "transformers.GPT2LMHeadModel", patterns
    return tiny_llama(), "transformers.LlamaForCausalLM", dict(LLAMA_PATTERNS)


def _tokens(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 9), generator=g)


def _module_inputs(
    model: nn.Module, paths: list[str], tokens: torch.Tensor
) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    hs = [
        model.get_submodule(p).register_forward_pre_hook(
            lambda m, a, _p=p: got.__setitem__(_p, a[0])
        )
        for p in paths
    ]
    with torch.no_grad():
        model(tokens)
    for h in hs:
        h.remove()
    return got


def _reference(
    sd: dict[str, torch.Tensor],
    model: nn.Module,
    module_to_c: dict[str, int],
    fn_type: str,
    sigmoid: str,
    tokens: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    paths = sorted(module_to_c)
    xs = _module_inputs(model, paths, tokens)
    emb = {p for p in paths if isinstance(model.get_submodule(p), nn.Embedding)}
    if fn_type == "global_shared_mlp":
        z = ref.pre_sigmoid_global(sd, xs, emb)
    else:
        z = {p: ref.pre_sigmoid_layerwise(sd, fn_type, p, xs[p], p in emb) for p in paths}
    ci = {p: ref.sigmoid(sigmoid, z[p]) for p in paths}
    acts = {p: ref.reported_component_activation(sd, p, xs[p], p in emb) for p in paths}
    return ci, acts


def _check(
    run_dir: Path,
    model: nn.Module,
    sd,
    patterns,
    fn_type: str,
    sigmoid: str,
    threshold: float = 0.0,
):
    host = get_host()
    adapter = host.load_adapter(f"spd:{run_dir}")
    module_to_c = expand(model, patterns)
    names = adapter.site_names_by_path()  # type: ignore[attr-defined]
    assert set(names) == set(module_to_c)
    assert {s.name: s.n_components for s in adapter.sites} == {
        names[p]: c for p, c in module_to_c.items()
    }
    tokens = _tokens()
    fn = host.harvest_fn(adapter, HarvestOptions(threshold=threshold))
    batch = fn(tokens)
    ci_ref, acts_ref = _reference(sd, model, module_to_c, fn_type, sigmoid, tokens)
    some_fired = some_zero = False
    for path in module_to_c:
        site = names[path]
        got_ci = batch.activations[site]["causal_importance"]
        torch.testing.assert_close(got_ci, ci_ref[path], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            batch.activations[site]["component_activation"], acts_ref[path], atol=1e-5, rtol=1e-5
        )
        assert torch.equal(batch.firings[site], ci_ref[path] > threshold)
        some_fired |= bool(batch.firings[site].any())
        some_zero |= bool((~batch.firings[site]).any())
    assert some_fired and some_zero, "test weights should make some components fire and some not"
    with torch.no_grad():
        torch.testing.assert_close(batch.next_token_logits, model(tokens).logits)
    return adapter


@pytest.mark.parametrize(("arch", "fn_type", "hidden"), CASES)
def test_ci_and_component_acts_match_reference(
    tmp_path: Path, arch: str, fn_type: str, hidden: list[int]
) -> None:
    model, cls, patterns = _setup(arch, fn_type)
    sd = write_run(
        tmp_path / "run", model, model_class=cls, patterns=patterns, fn_type=fn_type, hidden=hidden
    )
    _check(tmp_path / "run", model, sd, patterns, fn_type, "leaky_hard")


@pytest.mark.parametrize(
    "sigmoid", ["hard", "normal", "upper_leaky_hard", "swish_hard", "lower_leaky_hard"]
)
def test_sigmoid_types(tmp_path: Path, sigmoid: str) -> None:
    model, cls, patterns = _setup("llama", "shared_mlp")
    sd = write_run(
        tmp_path / "run",
        model,
        model_class=cls,
        patterns=patterns,
        fn_type="shared_mlp",
        hidden=[4],
        sigmoid_type=sigmoid,
    )
    _check(tmp_path / "run", model, sd, patterns, "shared_mlp", sigmoid, threshold=0.1)


@pytest.mark.parametrize(("arch", "fn_type"), [("gpt2", "mlp"), ("llama", "vector_mlp")])
def test_legacy_prefixed_run(tmp_path: Path, arch: str, fn_type: str) -> None:
    """Old key names (patched_model., .original.weight, .components.V, _gates.) and old config keys."""
    model, cls, _ = _setup(arch, fn_type)
    patterns = (
        {"transformer.h.*.mlp.c_fc": 4} if arch == "gpt2" else {"model.layers.*.mlp.up_proj": 4}
    )
    sd = write_run(
        tmp_path / "run",
        model,
        model_class=cls,
        patterns=patterns,
        fn_type=fn_type,
        hidden=[3],
        legacy=True,
    )
    raw = torch.load(next((tmp_path / "run").glob("model_*.pth")), weights_only=True)
    assert any(k.startswith("patched_model.") for k in raw) and any(
        k.startswith("_gates.") for k in raw
    )
    assert not any(k.startswith(("target_model.", "_components.", "ci_fn.")) for k in raw)
    _check(tmp_path / "run", model, sd, patterns, fn_type, "leaky_hard")


def test_gate_era_config_keys(tmp_path: Path) -> None:
    """spd before the gate -> ci_fn rename: ``gate_type`` / ``gate_hidden_dims`` (and the
    ``_gates.`` state-dict prefix of that era)."""
    import yaml

    model, cls, _ = _setup("gpt2", "vector_mlp")
    patterns = {"transformer.h.*.mlp.c_fc": 4}
    run = tmp_path / "run"
    sd = write_run(
        run, model, model_class=cls, patterns=patterns, fn_type="mlp", hidden=[3], legacy=True
    )
    cfg_path = run / "final_config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["gate_type"], cfg["gate_hidden_dims"] = cfg.pop("ci_fn_type"), cfg.pop("ci_fn_hidden_dims")
    cfg_path.write_text(yaml.safe_dump(cfg))
    _check(run, model, sd, patterns, "mlp", "leaky_hard")


def test_latest_checkpoint_wins(tmp_path: Path) -> None:
    model, cls, patterns = _setup("llama", "shared_mlp")
    run = tmp_path / "run"
    sd = write_run(
        run, model, model_class=cls, patterns=patterns, fn_type="shared_mlp", hidden=[4], step=1000
    )
    # an older checkpoint with different (wrong) weights must be ignored: 1000 > 900 numerically
    stale = {k: (v * 0 if k.startswith("_components.") else v) for k, v in sd.items()}
    torch.save(stale, run / "model_900.pth")
    adapter = _check(run, model, sd, patterns, "shared_mlp", "leaky_hard")
    assert adapter.defaults.extra["step"] == 1000


def test_metadata_and_defaults(tmp_path: Path) -> None:
    model, cls, patterns = _setup("gpt2", "mlp")
    write_run(
        tmp_path / "run", model, model_class=cls, patterns=patterns, fn_type="mlp", hidden=[3]
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'run'}")
    assert adapter.activation_types[0] == "causal_importance"
    assert adapter.defaults.dataset == "SimpleStories/SimpleStories"
    assert adapter.defaults.seq_len == 16
    assert adapter.defaults.extra["ci_fn_type"] == "mlp"
    assert adapter.base_model_name == str(tmp_path / "run" / "base_model")
    assert sum(s.n_components for s in adapter.sites) == 6 * 2 + 5 + 4


def test_sites_are_named_by_canonical_address(tmp_path: Path) -> None:
    model, cls, patterns = _setup("gpt2", "mlp")
    write_run(
        tmp_path / "run", model, model_class=cls, patterns=patterns, fn_type="mlp", hidden=[3]
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'run'}")
    sites = {s.name: s for s in adapter.sites}
    assert set(sites) == {"0.mlp.up", "1.mlp.up", "1.attn_fused.o", "embed"}
    assert sites["1.mlp.up"].address == "1.mlp.up" and sites["1.mlp.up"].reads_from == "1.mlp_in"
    assert sites["1.attn_fused.o"].writes_to == ("1.attn_out",)
    assert sites["embed"].n_components == 4
    # the embedding writes the `embed` hook point (its output), not 0.resid_pre (+ positions)
    assert (sites["embed"].reads_from, sites["embed"].writes_to) == ("embed", ("embed",))
    assert adapter.defaults.extra["module_paths"]["1.mlp.up"] == "transformer.h.1.mlp.c_fc"

    model, cls, patterns = _setup("llama", "mlp")
    write_run(
        tmp_path / "run2", model, model_class=cls, patterns=patterns, fn_type="mlp", hidden=[3]
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'run2'}")
    assert {s.name for s in adapter.sites} == {"0.glu.down", "1.glu.down", "0.attn.q"}
    by_name = {s.name: s for s in adapter.sites}
    # down projections read the MLP hidden state, q/k/v the attention input: canonical hook
    # points that hold the same tensors, so SPD sites line up with transcoders on those points
    assert (by_name["1.glu.down"].reads_from, by_name["1.glu.down"].writes_to) == (
        "1.mlp_hidden",
        ("1.mlp_out",),
    )
    assert (by_name["0.attn.q"].reads_from, by_name["0.attn.q"].writes_to) == (
        "0.attn_in",
        ("0.attn.q",),
    )


def test_binomial_runs_harvest_noiseless_and_deterministic(tmp_path: Path) -> None:
    import yaml

    model, cls, patterns = _setup("llama", "vector_mlp")
    run = tmp_path / "run"
    sd = write_run(run, model, model_class=cls, patterns=patterns, fn_type="vector_mlp", hidden=[3])
    cfg = yaml.safe_load((run / "final_config.yaml").read_text())
    cfg["sampling"] = "binomial"
    (run / "final_config.yaml").write_text(yaml.safe_dump(cfg))
    adapter = _check(run, model, sd, patterns, "vector_mlp", "leaky_hard")  # noiseless reference
    fn = get_host().harvest_fn(adapter)
    a, b = fn(_tokens()), fn(_tokens())
    for site in a.activations:
        assert torch.equal(
            a.activations[site]["causal_importance"], b.activations[site]["causal_importance"]
        )


def test_checkpoint_file_as_source(tmp_path: Path) -> None:
    model, cls, patterns = _setup("llama", "mlp")
    run = tmp_path / "run"
    sd = write_run(
        run, model, model_class=cls, patterns=patterns, fn_type="mlp", hidden=[2], step=7
    )
    adapter = get_host().load_adapter(f"spd:{run / 'model_7.pth'}")
    assert adapter.defaults.extra["step"] == 7
    assert len(sd) > 0 and len(adapter.sites) == 3


def test_site_inputs_equal_their_hook_points(tmp_path: Path) -> None:
    """What each SPD site reads is, tensor for tensor, the hook point it names."""
    from spd_host.topology import topology_of

    for arch in ("gpt2", "llama"):
        model, cls, patterns = _setup(arch, "mlp")
        if arch == "gpt2":
            patterns = {
                **patterns,
                "transformer.h.*.mlp.c_proj": 3,
                "transformer.h.0.attn.c_attn": 3,
            }
        else:
            patterns = {
                **patterns,
                "model.layers.1.self_attn.v_proj": 3,
                "model.layers.0.mlp.up_proj": 3,
            }
        run = tmp_path / arch
        write_run(run, model, model_class=cls, patterns=patterns, fn_type="mlp", hidden=[2])
        adapter = get_host().load_adapter(f"spd:{run}")
        paths = adapter.site_names_by_path()  # type: ignore[attr-defined]
        hooked = {s.name: s.reads_from for s in adapter.sites if s.reads_from != s.address}
        assert len(hooked) >= 4
        inputs = _module_inputs(model, list(paths), _tokens())
        topo = topology_of(model)
        with topo.capture(list(set(hooked.values()))) as acts, torch.no_grad():
            model(_tokens())
            for path, name in paths.items():
                if name in hooked:
                    torch.testing.assert_close(acts[hooked[name]], inputs[path])
