"""``spd-host topology``: local directories, the offline Hub cache, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spd_host.cli.app import app
from tests.conftest import add_to_offline_hub
from tests.topology.conftest import CONFIGS

runner = CliRunner()


def _flat(text: str) -> str:
    """Rich wraps long error lines; compare on whitespace-normalised text."""
    return " ".join(text.split())


def _save_config(arch: str, directory: Path) -> Path:
    CONFIGS[arch]().save_pretrained(directory)  # config.json only: no weights are needed
    return directory


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "olmo2"])
def test_topology_json_from_local_config_dir(arch: str, tmp_path: Path) -> None:
    model_dir = _save_config(arch, tmp_path / arch)
    result = runner.invoke(app, ["topology", str(model_dir), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["architecture"] == arch and doc["n_layers"] == 2
    expected = {
        "gpt2": ("1.mlp.down", "transformer.h.1.mlp.c_proj"),
        "phi3": ("0.glu_fused.gate_up", "model.layers.0.mlp.gate_up_proj"),
        "olmo2": ("1.norm.mlp_post", "model.layers.1.post_feedforward_layernorm"),
    }[arch]
    assert doc["addresses"][expected[0]]["module_path"] == expected[1]
    assert (
        doc["hook_points"]["1.mlp_in"]["description"]
        == "MLP input (after its layer norm) in block 1 of 2"
    )


def test_topology_table_output(tmp_path: Path) -> None:
    model_dir = _save_config("gpt_neox", tmp_path / "neox")
    result = runner.invoke(app, ["topology", str(model_dir)])
    assert result.exit_code == 0, result.output
    assert "gpt_neox" in result.stdout and "parallel attention+MLP" in result.stdout
    assert "0.attn_fused.qkv" in result.stdout


def test_topology_from_offline_hub_cache(offline_hub: Path) -> None:
    config = CONFIGS["qwen3"]().to_json_string()
    add_to_offline_hub(offline_hub, "tiny-org/tiny-qwen3", {"config.json": config})
    result = runner.invoke(app, ["topology", "tiny-org/tiny-qwen3", "--json"])
    assert result.exit_code == 0, result.output
    assert (
        json.loads(result.stdout)["addresses"]["0.attn.q"]["module_path"]
        == "model.layers.0.self_attn.q_proj"
    )


def test_topology_errors(tmp_path: Path, offline_hub: Path) -> None:
    missing = runner.invoke(app, ["topology", "nobody/no-such-model"])
    assert missing.exit_code != 0
    assert "neither a local directory nor in the Hugging Face cache" in _flat(missing.stderr)
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, ["topology", str(tmp_path / "empty")])
    assert empty.exit_code != 0 and "has no config.json" in _flat(empty.stderr)
    # a real config of an architecture no spec describes (encoder-only BERT is not a causal LM)
    from transformers import BertConfig

    BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path / "bert")
    bert = runner.invoke(app, ["topology", str(tmp_path / "bert")])
    assert bert.exit_code != 0 and "error:" in bert.stderr
    assert "Traceback" not in bert.output
