"""Goodfire transcoder sets whose harvest config names one of Goodfire's own pretrain runs as the
base model (``base_model_path: wandb:<entity>/<project>/<run id>`` or a local run directory):
the base model is Goodfire's LlamaSimpleMLP, its logits equal the formulas in
``tests/spd/goodfire_pretrain.py``, and the transcoder reads that model's MLP input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spd_host.plugins import get_host
from tests.spd import goodfire_pretrain as gp
from tests.transcoder.goodfire_files import (
    transcoder_reference,
    write_harvest_config,
    write_transcoder,
)

CFG = gp.LLAMA_SIMPLE_MLP
D = CFG["n_embd"]


def _base_model_path(tmp_path: Path, form: str) -> tuple[str, dict[str, torch.Tensor]]:
    if form == "local":
        sd = gp.write_pretrain_run(tmp_path / "pretrain", CFG)
        return str(tmp_path / "pretrain"), sd
    from spd_host.paths import cache_dir

    cached = cache_dir("wandb") / "goodfire__spd__ab12cd34"  # as a download leaves it
    sd = gp.write_pretrain_run(cached, CFG, flat=True)
    (cached / ".complete").write_text("goodfire/spd/ab12cd34")
    return "wandb:goodfire/spd/ab12cd34", sd


@pytest.mark.parametrize("form", ["local", "wandb"])
def test_transcoder_over_a_goodfire_pretrain_run(tmp_path: Path, form: str) -> None:
    base, target_sd = _base_model_path(tmp_path, form)
    gen = torch.Generator().manual_seed(3)
    tc_sd = write_transcoder(tmp_path / "L1", gen=gen, input_size=D, output_size=D, top_k=3)
    config = write_harvest_config(tmp_path / "tc.yaml", base, {"h.1.mlp": "L1"})
    adapter = get_host().load_adapter(f"transcoder:{config}")

    model = adapter.load_base_model()  # also checks the transcoder's hook points exist
    assert type(model).__name__ == "LlamaSimpleMLP"
    tokens = torch.randint(0, CFG["vocab_size"], (2, 12), generator=gen)
    want_logits, inputs = gp.reference_forward(target_sd, CFG, tokens)
    with torch.no_grad():
        logits = model(tokens)[0]  # Goodfire's forward returns (logits, loss)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)

    # the MLP's input is what its first projection (LlamaSimpleMLP: c_fc) reads
    x = inputs["h.1.mlp.c_fc"].reshape(-1, D)
    (site,) = [s.name for s in adapter.sites]
    want_acts, _ = transcoder_reference(tc_sd, x, encoder_type="batchtopk", k=3)
    got = adapter.encode(site, x)
    torch.testing.assert_close(got.double(), want_acts, atol=1e-5, rtol=1e-5)
    assert int((got > 0).sum()) == 3 * x.shape[0]  # BatchTopK over the whole block

    tok = adapter.load_tokenizer()  # the pretrain run's own tokenizer files
    assert len(tok("hello world")["input_ids"]) > 0
