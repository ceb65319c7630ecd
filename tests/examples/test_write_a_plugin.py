"""The write_a_plugin example: its entry point is declared right, it loads through the host, and
its HarvestFn produces a valid batch whose activations match the SAE formula on the residual
stream read with a plain torch hook."""

from __future__ import annotations

import importlib
import json
import sys
import tomllib
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import save_file

import spd_host
from spd_host.adapter import HarvestOptions, validate_harvest_batch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "write_a_plugin"
D, N, LAYER = 16, 24, 1


@pytest.fixture
def plugin_module(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    for name in [m for m in sys.modules if m == "resid_sae" or m.startswith("resid_sae.")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module("resid_sae.plugin")


def test_entry_point_names_the_plugin_module(plugin_module) -> None:
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    eps = project["project"]["entry-points"]["spd_host"]
    assert eps == {"resid-sae": "resid_sae.plugin"}
    assert importlib.import_module(eps["resid-sae"]) is plugin_module
    with spd_host.temporary_plugins(("resid-sae", plugin_module), entry_points=False) as host:
        assert host.method_names == ["resid-sae"]


def test_harvest_fn_produces_a_valid_batch(plugin_module, tmp_path: Path) -> None:
    pytest.importorskip(
        "spd_host.topology", reason="spd_host.topology (branch topology) not merged yet"
    )
    pytest.importorskip("spd_host.models", reason="spd_host.models (branch demo) not merged yet")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "base"
    GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=D, n_head=2, n_positions=32, vocab_size=50)
    ).save_pretrained(base)
    sae = tmp_path / "sae"
    sae.mkdir()
    hook = f"{LAYER}.resid_post"
    (sae / "sae.json").write_text(json.dumps({"base_model": str(base), "hook_point": hook}))
    w = {
        "W_enc": torch.randn(D, N) / D**0.5,
        "b_enc": torch.randn(N) * 0.1,
        "W_dec": torch.randn(N, D) / D**0.5,
        "b_dec": torch.randn(D) * 0.1,
    }
    save_file(w, str(sae / "sae.safetensors"))

    with spd_host.temporary_plugins(("resid-sae", plugin_module), entry_points=False) as host:
        adapter = spd_host.load_adapter(f"resid-sae:{sae}")
        run = host.harvest_fn(adapter, HarvestOptions())  # the host validates every batch too
    assert isinstance(adapter, spd_host.DecompositionAdapter)
    assert isinstance(adapter, spd_host.SupportsSplice)

    tokens = torch.randint(0, 50, (2, 9))
    batch = run(tokens)
    validate_harvest_batch(
        batch, sites=adapter.sites, activation_types=adapter.activation_types, plugin="resid-sae"
    )
    # independent reference: the residual stream after block LAYER via a plain forward hook
    model = adapter.load_base_model()
    seen: dict[str, torch.Tensor] = {}
    h = (
        cast(Any, model)
        .transformer.h[LAYER]
        .register_forward_hook(
            lambda m, a, out: seen.update(x=out[0] if isinstance(out, tuple) else out)
        )
    )
    with torch.no_grad():
        model(tokens)
    h.remove()
    f_ref = torch.relu((seen["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    acts = batch.activations[hook]["activation"]
    assert torch.allclose(acts, f_ref, atol=1e-5)
    assert torch.equal(batch.firings[hook], f_ref > 0)
    assert batch.firings[hook].any() and not batch.firings[hook].all()
