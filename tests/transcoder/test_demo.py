"""The shipped demos: ``transcoder:demo`` and ``clt:demo`` load through the real circuit-tracer
readers, describe themselves, harvest valid batches, and splice better than zero-ablation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from spd_adapters._demo_training import heldout_batches, zero_ablate_mlps
from spd_adapters.clt.plugin import DEMO_DIR as CLT_DEMO_DIR
from spd_adapters.transcoder.plugin import DEMO_DIR as TC_DEMO_DIR
from spd_host.adapter import HarvestOptions
from spd_host.cli.app import app
from spd_host.plugins import get_host

METHODS = ["transcoder", "clt"]
N_LAYERS = 4


@pytest.mark.parametrize("method", METHODS)
def test_info_json(method: str) -> None:
    result = CliRunner().invoke(app, ["info", f"{method}:demo", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["decomposition_id"] == f"{method}:demo"
    assert doc["base_model"] == "demo"
    assert doc["activation_types"] == ["activation"]
    assert doc["method"]["name"] == method and "feature" in doc["method"]["description"]
    assert [s["name"] for s in doc["sites"]] == [f"layer_{i}" for i in range(N_LAYERS)]
    assert doc["n_components"] == sum(s["n_components"] for s in doc["sites"]) > 0
    for i, s in enumerate(doc["sites"]):
        assert s["reads_from"] == f"{i}.mlp_in"
        expected = (
            [f"{i}.mlp_out"]
            if method == "transcoder"
            else [f"{j}.mlp_out" for j in range(i, N_LAYERS)]
        )
        assert s["writes_to"] == expected
    assert doc["defaults"]["extra"]["format"] == "circuit-tracer"


@pytest.mark.parametrize("method", METHODS)
def test_demo_is_small_and_in_circuit_tracer_layout(method: str) -> None:
    root = TC_DEMO_DIR if method == "transcoder" else CLT_DEMO_DIR
    size = sum(p.stat().st_size for p in root.iterdir())
    assert size < 6 * 2**20
    names = {p.name for p in root.iterdir()}
    assert "config.yaml" in names
    expected = (
        {f"layer_{i}.safetensors" for i in range(N_LAYERS)}
        if method == "transcoder"
        else {f"W_{k}_{i}.safetensors" for k in ("enc", "dec") for i in range(N_LAYERS)}
    )
    assert expected <= names


@pytest.mark.parametrize("method", METHODS)
def test_demo_harvest_and_splice(method: str) -> None:
    host = get_host()
    adapter = host.load_adapter(f"{method}:demo")
    model = adapter.load_base_model()
    harvest = host.harvest_fn(adapter, HarvestOptions())  # host validates each batch
    tokens = next(heldout_batches(adapter.load_tokenizer(), n_sequences=4))[:4]
    batch = harvest(tokens)
    n = adapter.sites[0].n_components
    for site in adapter.sites:
        l0 = batch.firings[site.name].float().sum(-1).mean()
        assert 0 < l0 < n / 8, f"{site.name}: mean L0 {l0} is not sparse"

    def ce(logits: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()))

    with torch.no_grad():
        clean = ce(model(tokens).logits)
        with adapter.splice(model):
            spliced = ce(model(tokens).logits)
        with zero_ablate_mlps(model):
            ablated = ce(model(tokens).logits)
    assert clean <= spliced < ablated
    assert spliced - clean < 0.5 * (ablated - clean)
