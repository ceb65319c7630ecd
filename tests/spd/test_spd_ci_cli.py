"""A transformer-CI run through the CLI: ``info``, ``harvest``, ``eval fidelity`` (every splice
variant) and offline ``autointerp``, end to end, over the bundled demo GPT-2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from spd_host.autointerp.api import load_labels
from spd_host.autointerp.bridge import evidence_from_harvest
from spd_host.cli.app import app
from spd_host.harvest import HarvestRepo
from spd_host.models import load_base_model
from tests.spd.run_writer import config_dict, expand, make_state_dict
from tests.spd.test_spd_ci_sequence import shared_transformer, write_case

runner = CliRunner()
NOTE = "depends on the tokens after it"
DEMO_PATTERNS = {
    "transformer.h.0.mlp.c_fc": 8,
    "transformer.h.0.mlp.c_proj": 8,
    "transformer.h.1.attn.c_attn": 6,
    "transformer.wte": 4,
}


def test_info_lists_sites_of_a_transformer_ci_run(tmp_path: Path) -> None:
    run, *_ = write_case(tmp_path, "llama-reverse-attn")
    out = runner.invoke(app, ["info", f"spd:{run}", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    sites = {s["name"]: s for s in doc["sites"]}
    assert set(sites) == {
        "0.glu.down",
        "1.glu.down",
        "0.glu.up",
        "1.glu.up",
        "0.attn.q",
        "0.attn.k",
    }
    assert sites["1.glu.down"]["reads_from"] == "1.mlp_hidden"
    assert sites["1.glu.down"]["writes_to"] == ["1.mlp_out"]
    assert sites["0.attn.k"]["reads_from"] == "0.attn_in"
    assert sites["0.glu.up"]["reads_from"] == "0.mlp_in"
    assert doc["defaults"]["extra"]["ci_fn_type"] == "global_reverse_residual"
    assert doc["defaults"]["extra"]["ci_causal"] is False
    assert doc["n_components"] == 2 * 6 + 5 + 3 + 2 * 4
    table = runner.invoke(app, ["info", f"spd:{run}"])
    assert table.exit_code == 0, table.output
    assert "0.glu.down" in table.output and "0.attn.k" in table.output


def _demo_run(run: Path) -> None:
    """A transformer-CI run over the demo base model (no target_model.* keys, like the demo)."""
    model = load_base_model("demo")
    module_to_c = expand(model, DEMO_PATTERNS)
    ci = shared_transformer(16, 1, [16], 2, 10000.0)
    ci["simple_transformer_ci_cfg"]["attn_config"]["max_len"] = 64
    sd = make_state_dict(model, module_to_c, ci["fn_type"], [], ci_config=ci)
    sd = {k: v for k, v in sd.items() if not k.startswith("target_model.")}
    cfg = config_dict(
        base_dir=run,
        model_class="transformers.GPT2LMHeadModel",
        patterns=DEMO_PATTERNS,
        fn_type=ci["fn_type"],
        hidden=[],
        ci_config=ci,
    )
    cfg.update(pretrained_model_name="demo", tokenizer_name="demo")
    cfg["task_config"].update(dataset_name="demo", max_seq_len=32)
    run.mkdir(parents=True)
    (run / "final_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.save(sd, run / "model_300.pth")


@pytest.mark.slow
def test_harvest_fidelity_autointerp_end_to_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _demo_run(run)
    did = f"spd:{run}"
    out = runner.invoke(
        app,
        [
            "harvest",
            "run",
            did,
            "--dataset",
            "demo",
            "--n-tokens",
            "512",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--examples-per-component",
            "3",
            "--context-tokens",
            "3",
        ],
    )
    assert out.exit_code == 0, out.output
    repo = HarvestRepo.open(did)
    summary = repo.summary()
    assert {c.site for c in summary} == {"0.mlp.up", "0.mlp.down", "1.attn_fused.qkv", "embed"}
    assert len(summary) == 8 + 8 + 6 + 4
    fired = [c for c in summary if c.firing_count > 0]
    assert fired and len(fired) <= len(summary)

    out = runner.invoke(
        app,
        [
            "eval",
            "fidelity",
            did,
            "--dataset",
            "demo",
            "--n-tokens",
            "256",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--per-site-variants",
            "all",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    (result,) = json.loads(out.output)["results"]
    variants = ["ci_masked", "all_ones", "rounded_ci", "zero_mask"]
    assert result["variants"] == variants
    rows = {(r["scope"], r["variant"]): r for r in result["loss"]}
    scopes = {"all", "0.mlp.up", "0.mlp.down", "1.attn_fused.qkv", "embed"}
    assert set(rows) == {(s, v) for s in scopes for v in variants}
    assert all(math.isfinite(r["ce_spliced"]) and r["n_positions"] == 256 for r in rows.values())

    out = runner.invoke(app, ["autointerp", did, "--no-progress"])
    assert out.exit_code == 0, out.output
    labels = load_labels(did)
    assert {r.component_key for r in labels} == {c.key for c in fired}
    ev = evidence_from_harvest(repo, fired[0].key)
    assert NOTE in ev.method_description  # the prompt says the CI is not causal per token
