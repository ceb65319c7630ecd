"""The demo trainer's output is a valid SPD run that the real loader reads."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from spd_adapters.spd.train_demo import DemoSpdConfig, run_config, train
from spd_host.adapter import HarvestOptions
from spd_host.plugins import get_host
from tests.spd.run_writer import tiny_gpt2


def test_trainer_writes_a_loadable_run(tmp_path: Path) -> None:
    model = tiny_gpt2()
    base = tmp_path / "base"
    model.save_pretrained(base)
    cfg = DemoSpdConfig(C=8, ci_hidden=4, steps=3, warmup_steps=5, batch_size=2, seq_len=8)
    batches = [
        torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)
    ]
    sd, metrics = train(cfg, model, batches)
    run = tmp_path / "run"
    run.mkdir()
    (run / "final_config.yaml").write_text(yaml.safe_dump(run_config(cfg, str(base))))
    torch.save(sd, run / "model_3.pth")
    assert len(metrics["history"]) >= 1

    host = get_host()
    adapter = host.load_adapter(f"spd:{run}")
    assert {s.name: s.n_components for s in adapter.sites} == {
        "0.mlp.up": 8,
        "0.mlp.down": 8,
        "1.mlp.up": 8,
        "1.mlp.down": 8,
    }
    batch = host.harvest_fn(adapter, HarvestOptions())(batches[0])
    # the trainer's CI function (Linear -> GELU -> Linear, then clamp) read back through the loader
    x = {}
    h = model.transformer.h[0].mlp.c_fc.register_forward_pre_hook(
        lambda m, a: x.__setitem__("x", a[0])
    )
    with torch.no_grad():
        model(batches[0])
    h.remove()
    W0, b0 = (
        sd["ci_fn._ci_fns.transformer-h-0-mlp-c_fc.layers.0.W"],
        sd["ci_fn._ci_fns.transformer-h-0-mlp-c_fc.layers.0.b"],
    )
    W2, b2 = (
        sd["ci_fn._ci_fns.transformer-h-0-mlp-c_fc.layers.2.W"],
        sd["ci_fn._ci_fns.transformer-h-0-mlp-c_fc.layers.2.b"],
    )
    hidden = x["x"] @ W0 + b0
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / 2**0.5))
    expected = (hidden @ W2 + b2).clamp(0, 1)
    torch.testing.assert_close(
        batch.activations["0.mlp.up"]["causal_importance"], expected, atol=1e-5, rtol=1e-5
    )
