"""``target.spec.kind: pretrained_qwen35_moe``: a lab-pretrained ``Qwen35Moe`` toy, read from
param-decomp's pretrain-cache entry ``<data_root>/pretrain_cache/<project>-<run_id>/``
(``model_config.yaml`` with the pretrainer's field names + one ``model_step_<N>.safetensors``
keyed as transformers' text-only ``Qwen3_5MoeForCausalLM``), as the qwen36_moe target.

Checked against the model the entry was written from (logits) and against the float64
reference of ``test_param_decomp_moe`` (CI, component activations); the other target kinds of
param-decomp's schema each load or fail naming the kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("orbax.checkpoint")
pytest.importorskip("jax")

from safetensors.torch import save_file

from spd_host.adapter import HarvestOptions
from spd_host.errors import FormatError, SourceNotFoundError
from spd_host.plugins import get_host
from tests.spd import test_param_decomp_moe as moe

RUN_PATH = "goodfire/spd/runs/t-0a0a0a0a"


def write_pretrain_entry(data_root: Path, model: Any, *, tied_head: bool = False) -> Path:
    """The entry as param-decomp's pretrain cache holds it (its model_config.yaml fields)."""
    c = model.config
    entry = data_root / "pretrain_cache" / "spd-t-0a0a0a0a"
    entry.mkdir(parents=True)
    rope = c.rope_parameters
    config = {
        "model_type": "Qwen35Moe",
        "vocab_size": c.vocab_size,
        "n_layer": c.num_hidden_layers,
        "full_attention_interval": moe.INTERVAL,
        "n_embd": c.hidden_size,
        "n_head": c.num_attention_heads,
        "n_kv_head": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "partial_rotary_factor": rope["partial_rotary_factor"],
        "rope_theta": rope["rope_theta"],
        "linear_num_key_heads": c.linear_num_key_heads,
        "linear_key_head_dim": c.linear_key_head_dim,
        "linear_num_value_heads": c.linear_num_value_heads,
        "linear_value_head_dim": c.linear_value_head_dim,
        "linear_conv_kernel_dim": c.linear_conv_kernel_dim,
        "n_experts": c.num_experts,
        "n_experts_per_tok": c.num_experts_per_tok,
        "moe_intermediate": c.moe_intermediate_size,
        "shared_expert_intermediate": c.shared_expert_intermediate_size,
        "rms_norm_eps": c.rms_norm_eps,
        "n_ctx": c.max_position_embeddings,
        "block_size": 32,  # training facts the loader ignores
        "tied_head": tied_head,
        "router_aux_loss_coef": 0.01,
    }
    (entry / "model_config.yaml").write_text(yaml.safe_dump(config))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(entry / "model_step_100.safetensors"))
    return entry


def _write(tmp_path: Path, model: Any, params: dict[str, Any], run_id: str) -> Path:
    run_dir = tmp_path / "runs" / run_id
    moe.write_run(run_dir, model, params)
    cfg_path = run_dir / "launch_config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["target"]["spec"] = {"kind": "pretrained_qwen35_moe", "run_path": RUN_PATH}
    cfg_path.write_text(yaml.safe_dump(cfg))
    return run_dir


def test_pretrained_qwen35_moe_target_loads_and_matches(tmp_path: Path) -> None:
    model, params = moe.tiny_target(seed=3), moe.make_params(seed=10)
    write_pretrain_entry(tmp_path, model)
    run_dir = _write(tmp_path, model, params, "p-7e7e7e7e")
    import json

    from typer.testing import CliRunner

    from spd_host.cli.app import app

    out = CliRunner().invoke(app, ["info", f"spd:{run_dir}", "--json"])
    assert out.exit_code == 0, out.output
    assert len(json.loads(out.stdout)["sites"]) == len(moe.sites())
    adapter = moe._load(run_dir)
    assert adapter.base_model_name == RUN_PATH
    assert len(adapter.sites) == len(moe.sites())
    tokens = moe._tokens(seed=14)
    target = adapter.load_base_model()
    with torch.no_grad():
        torch.testing.assert_close(target(tokens).logits, model(tokens).logits, atol=1e-5, rtol=0)
    want_ci, want_acts = moe.reference(model, params, moe.capture(model, tokens))
    batch = get_host().harvest_fn(adapter, HarvestOptions())(tokens)
    paths = adapter.defaults.extra["module_paths"]
    for site, acts in batch.activations.items():
        name = paths[site].removeprefix("model.")
        np.testing.assert_allclose(
            acts["causal_importance"].numpy(), want_ci[name], atol=1e-5, rtol=0
        )
        np.testing.assert_allclose(
            acts["component_activation"].numpy(), want_acts[name], atol=1e-5, rtol=1e-5
        )


def test_pretrained_qwen35_moe_errors_name_the_cause(tmp_path: Path) -> None:
    model, params = moe.tiny_target(seed=3), moe.make_params(seed=10)
    run_dir = _write(tmp_path, model, params, "p-8e8e8e8e")
    with pytest.raises(SourceNotFoundError, match=r"no pretrain-cache entry.*spd-t-0a0a0a0a"):
        moe._load(run_dir)
    entry = write_pretrain_entry(tmp_path, model)
    cfg = yaml.safe_load((entry / "model_config.yaml").read_text())
    (entry / "model_config.yaml").write_text(yaml.safe_dump({**cfg, "model_type": "LlamaSimple"}))
    with pytest.raises(FormatError, match=r"model_type=.LlamaSimple.*Qwen35Moe"):
        moe._load(run_dir)
    (entry / "model_config.yaml").write_text(yaml.safe_dump({**cfg, "n_embd": 8}))
    with pytest.raises(FormatError, match=r"V of layers.0.linear_attn.in_proj_qkv.q has shape"):
        moe._load(run_dir)  # a config that disagrees with the checkpoint: caught from metadata
    (entry / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    del state["lm_head.weight"]
    save_file(state, str(entry / "model_step_100.safetensors"))
    adapter = moe._load(run_dir)
    with pytest.raises(FormatError, match=r"model_step_100.safetensors: missing tensor lm_head"):
        adapter.load_base_model()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"kind": "gpt2_hub", "model_name": "x"}, r"target.spec.kind='gpt2_hub' is not a target"),
        ({"kind": "pretrained_qwen35_moe"}, r"pretrained_qwen35_moe\) needs run_path"),
    ],
)
def test_unknown_target_kinds_are_named(tmp_path: Path, spec: dict, match: str) -> None:
    model, params = moe.tiny_target(seed=3), moe.make_params(seed=10)
    run_dir = tmp_path / "runs" / "p-9e9e9e9e"
    moe.write_run(run_dir, model, params)
    cfg_path = run_dir / "launch_config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["target"]["spec"] = spec
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(FormatError, match=match):
        moe._load(run_dir)
