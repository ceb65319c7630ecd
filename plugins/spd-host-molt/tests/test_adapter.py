"""The adapter end to end on a tiny GPT-2: loading through the host, HarvestFn, splice.

References are computed with plain torch forward hooks on the Hugging Face modules, not with the
plugin's or the host's hook machinery.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from molt_files import random_molt_tensors, write_molt, write_tiny_gpt2

pytest.importorskip(
    "spd_host.topology", reason="spd_host.topology (branch topology) not merged yet"
)
pytest.importorskip("spd_host.models", reason="spd_host.models (branch demo) not merged yet")

import spd_host_molt.plugin as molt_plugin
from spd_host_molt.adapter import MoltAdapter

import spd_host
from spd_host.adapter import HarvestOptions, validate_harvest_batch

D, LAYER = 16, 1
RANKS = {1: 6, 4: 3}


@pytest.fixture(params=["transformerlens", "canonical"])
def molt_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A MOLT named with Llamascopium's TransformerLens hooks, or with spd-host's own names."""
    base = write_tiny_gpt2(tmp_path / "base", d_model=D)
    sd = random_molt_tensors(D, RANKS, seed=7)
    root = write_molt(
        tmp_path / "molt",
        sd,
        d_model=D,
        ranks=RANKS,
        layer=LAYER,
        lm={"model_name": "gpt2", "model_from_pretrained_path": str(base)},
    )
    if request.param == "canonical":
        cfg = json.loads((root / "config.json").read_text())
        cfg["hook_point_in"], cfg["hook_point_out"] = f"{LAYER}.mlp_in", f"{LAYER}.mlp_out"
        (root / "config.json").write_text(json.dumps(cfg))
    return root


def molt_input(model: torch.nn.Module, adapter: MoltAdapter, x: torch.Tensor) -> torch.Tensor:
    """TransformerLens (fold_ln) reads the MLP input before ln_2's affine: undo it by hand."""
    if not adapter.cfg.hook_point_in.endswith("ln2.hook_normalized"):
        return x
    ln = cast(Any, model).transformer.h[LAYER].ln_2
    return (x - ln.bias) / ln.weight


def load(molt_dir: Path) -> MoltAdapter:
    with spd_host.temporary_plugins(("molt", molt_plugin), entry_points=False):
        adapter = spd_host.load_adapter(f"molt:{molt_dir}")
    assert isinstance(adapter, MoltAdapter)
    return adapter


def mlp_io(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    mlp = cast(Any, model).transformer.h[LAYER].mlp
    handle = mlp.register_forward_hook(
        lambda m, a, out: seen.update(x=a[0].detach(), y=out.detach())
    )
    with torch.no_grad():
        model(tokens)
    handle.remove()
    return seen["x"], seen["y"]


def test_metadata(molt_dir: Path) -> None:
    adapter = load(molt_dir)
    assert isinstance(adapter, spd_host.DecompositionAdapter)
    assert isinstance(adapter, spd_host.SupportsSplice)
    (site,) = adapter.sites
    assert site.n_components == 9
    assert site.reads_from == f"{LAYER}.mlp_in" and site.writes_to == (f"{LAYER}.mlp_out",)
    assert adapter.decomposition_id == f"molt:{molt_dir.resolve()}"


def test_harvest_batch(molt_dir: Path) -> None:
    adapter = load(molt_dir)
    options = HarvestOptions(threshold=0.0)
    run = adapter.harvest_fn(options)
    tokens = torch.randint(0, 64, (2, 7))
    batch = run(tokens)
    validate_harvest_batch(
        batch, sites=adapter.sites, activation_types=adapter.activation_types, plugin="molt"
    )
    model = adapter.load_base_model()
    x, _ = mlp_io(model, tokens)
    x = molt_input(model, adapter, x)
    f, _ = adapter.molt().encode(x)
    site = adapter.sites[0].name
    assert torch.allclose(batch.activations[site]["activation"], f, atol=1e-6)
    assert torch.allclose(
        batch.activations[site]["pre_activation"],
        x @ adapter.molt().w.W_E + adapter.molt().w.b_E,
        atol=1e-5,
    )
    assert torch.equal(batch.firings[site], f > 0)
    assert batch.firings[site].any() and not batch.firings[site].all()
    with torch.no_grad():
        logits = model(tokens).logits
    assert batch.next_token_logits is not None
    assert torch.allclose(batch.next_token_logits, logits, atol=1e-5)


def test_splice_replaces_mlp_output(molt_dir: Path) -> None:
    adapter = load(molt_dir)
    model = adapter.load_base_model()
    tokens = torch.randint(0, 64, (2, 7))
    molt = adapter.molt()
    mlp = cast(Any, model).transformer.h[LAYER].mlp
    handle = mlp.register_forward_hook(
        lambda m, a, out: molt.reconstruct(molt_input(model, adapter, a[0]))
    )
    with torch.no_grad():
        expected = model(tokens).logits
    handle.remove()
    with torch.no_grad():
        clean = model(tokens).logits
        with adapter.splice(model):
            spliced = model(tokens).logits
        after = model(tokens).logits
    assert not torch.allclose(clean, expected, atol=1e-4), "the MOLT must change the output"
    assert torch.allclose(spliced, expected, atol=1e-5)
    assert torch.equal(after, clean)
    with (
        pytest.raises(spd_host.SpdHostError, match="unknown splice variant"),
        adapter.splice(model, variant="nope"),
    ):
        pass


def test_rmsnorm_model_unfolds_the_norm_weight(tmp_path: Path) -> None:
    """On a Llama-style model (RMSNorm, no bias) the TransformerLens input is ``x / weight``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=D,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(cfg)
    norm = model.model.layers[LAYER].post_attention_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(str(tmp_path / "base"))
    root = write_molt(
        tmp_path / "molt",
        random_molt_tensors(D, RANKS, seed=2),
        d_model=D,
        ranks=RANKS,
        layer=LAYER,
        lm={"model_name": "llama", "model_from_pretrained_path": str(tmp_path / "base")},
    )
    adapter = load(root)
    loaded = cast(Any, adapter.load_base_model())
    seen: dict[str, torch.Tensor] = {}
    handle = loaded.model.layers[LAYER].mlp.register_forward_hook(
        lambda m, a, out: seen.update(x=a[0].detach())
    )
    tokens = torch.randint(0, 64, (2, 6))
    batch = adapter.harvest_fn(HarvestOptions())(tokens)
    handle.remove()
    weight = loaded.model.layers[LAYER].post_attention_layernorm.weight.detach()
    f_ref, _ = adapter.molt().encode(seen["x"] / weight)
    assert torch.allclose(batch.activations[adapter.sites[0].name]["activation"], f_ref, atol=1e-5)
