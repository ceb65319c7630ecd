"""HarvestFns of both plugins on a real (tiny, random) GPT-2 saved as a Hugging Face directory,
through the host (which validates every batch against the HarvestBatch contract)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel

from spd_host.adapter import HarvestOptions
from spd_host.errors import FormatError
from spd_host.plugins import get_host
from tests.clt.test_formats import reference as clt_reference
from tests.clt.test_formats import write_clt
from tests.transcoder.test_formats import circuit_tracer_reference, write_circuit_tracer


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_embd=8, n_head=2, n_layer=3, vocab_size=40, n_positions=16)
    )
    model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def set_model_name(cfg_path: Path, name: str) -> None:
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model_name"] = name
    cfg_path.write_text(yaml.safe_dump(cfg))


def ln2_outputs_and_resid_mid(model, tokens):
    ln2, mid = {}, {}
    hs = []
    for i, block in enumerate(model.transformer.h):
        hs.append(block.ln_2.register_forward_hook(lambda m, a, out, i=i: ln2.__setitem__(i, out)))
        hs.append(block.ln_2.register_forward_pre_hook(lambda m, a, i=i: mid.__setitem__(i, a[0])))
    with torch.no_grad():
        logits = model(tokens).logits
    for h in hs:
        h.remove()
    return logits, ln2, mid


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_transcoder_harvest(tmp_path: Path, model_dir: Path, threshold: float) -> None:
    layers = write_circuit_tracer(
        tmp_path / "ct", 3, gen=torch.Generator().manual_seed(0), threshold=True
    )
    set_model_name(tmp_path / "ct" / "config.yaml", str(model_dir))
    host = get_host()
    adapter = host.load_adapter(f"transcoder:{tmp_path / 'ct'}")
    assert adapter.input_hook_points() == ["0.mlp_in", "1.mlp_in", "2.mlp_in"]
    fn = host.harvest_fn(adapter, HarvestOptions(threshold=threshold))
    tokens = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    batch = fn(tokens)
    logits, ln2, _ = ln2_outputs_and_resid_mid(adapter.load_base_model(), tokens)
    assert torch.allclose(batch.next_token_logits, logits, atol=1e-6)
    for i in range(3):
        acts_ref, _ = circuit_tracer_reference(layers[i], ln2[i].reshape(-1, 8))
        acts = batch.activations[f"layer_{i}"]["activation"]
        assert acts.shape == (2, 7, 32)
        assert torch.allclose(acts.reshape(-1, 32), acts_ref, atol=1e-5)
        assert torch.equal(batch.firings[f"layer_{i}"], acts > threshold)


def test_clt_harvest(tmp_path: Path, model_dir: Path) -> None:
    w = write_clt(tmp_path / "clt", gen=torch.Generator().manual_seed(0))
    set_model_name(tmp_path / "clt" / "config.yaml", str(model_dir))
    host = get_host()
    adapter = host.load_adapter(f"clt:{tmp_path / 'clt'}")
    batch = host.harvest_fn(adapter, HarvestOptions())(torch.randint(0, 40, (2, 5)))
    logits, _, mid = ln2_outputs_and_resid_mid(adapter.load_base_model(), batch.tokens)
    acts_ref, _ = clt_reference(w, torch.stack([mid[i].reshape(-1, 8) for i in range(3)]))
    for i in range(3):
        assert torch.allclose(
            batch.activations[f"layer_{i}"]["activation"].reshape(-1, 24), acts_ref[i], atol=1e-5
        )
    assert torch.allclose(batch.next_token_logits, logits, atol=1e-6)


def test_load_base_model_checks_hooks(tmp_path: Path, model_dir: Path) -> None:
    write_circuit_tracer(
        tmp_path / "ct", 4, gen=torch.Generator().manual_seed(0)
    )  # model has 3 layers
    set_model_name(tmp_path / "ct" / "config.yaml", str(model_dir))
    adapter = get_host().load_adapter(f"transcoder:{tmp_path / 'ct'}")
    with pytest.raises(
        FormatError,
        match=r"config\.yaml: hook 'mlp\.hook_in' \(canonical '3\.mlp_in'\) does not exist",
    ):
        adapter.load_base_model()


def test_unknown_base_model_is_actionable(tmp_path: Path) -> None:
    write_circuit_tracer(tmp_path / "ct", 1, gen=torch.Generator().manual_seed(0))
    cfg = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    del cfg["model_name"]
    (tmp_path / "ct" / "config.yaml").write_text(yaml.safe_dump(cfg))
    adapter = get_host().load_adapter(f"transcoder:{tmp_path / 'ct'}")
    assert adapter.base_model_name == "unknown"
    with pytest.raises(FormatError, match=r"does not name its base model"):
        adapter.load_base_model()
