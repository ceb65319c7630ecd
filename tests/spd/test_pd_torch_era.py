"""torch-era param-decomp runs (``param_decomp_lab``, before the JAX rewrite): the same
ComponentModel checkpoint as ``spd`` (``model_<step>.pth``), with the config in
``experiment_config.yaml`` — ``target.spec {kind, model_class, model_name | run_path}``,
``target.output_extract``, ``data`` (``LMDataConfig``) and ``pd`` (``PDConfig``: ``ci_config``,
``decomposition_targets``, ``identity_decomposition_targets``, ``sigmoid_type``, ``sampling``)
instead of a flat ``final_config.yaml``. Loaded by ID and checked against the reference of
``test_spd_load``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from spd_adapters.spd.config import migrate_legacy_keys
from spd_host.errors import FormatError
from spd_host.plugins import get_host
from tests.spd.run_writer import write_run
from tests.spd.test_spd_load import CASES, _check, _setup


def to_experiment_config(final: dict[str, Any], *, defaults: bool = False) -> dict[str, Any]:
    """The same run as param_decomp_lab's trainer writes it (``LMExperimentConfig``)."""
    task = final["task_config"]
    pd: dict[str, Any] = {
        "seed": final["seed"],
        "n_mask_samples": 1,
        "ci_config": final["ci_config"],
        "decomposition_targets": final["module_info"],
        "identity_decomposition_targets": final.get("identity_module_info"),
        "use_delta_component": True,
        "tied_weights": None,
        "loss_metrics": [{"type": "ImportanceMinimalityLoss", "coeff": 0.004, "pnorm": 2.0}],
        "steps": 200,
        "batch_size": 64,
    }
    if not defaults:
        pd |= {"sampling": final["sampling"], "sigmoid_type": final["sigmoid_type"]}
    return {
        "target": {
            "spec": {
                "kind": "hf",
                "model_class": final["pretrained_model_class"],
                "model_name": final["pretrained_model_name"],
            },
            **({} if defaults else {"output_extract": "logits"}),
        },
        "data": {
            "dataset_name": task["dataset_name"],
            "tokenizer_name": final["tokenizer_name"],
            "column_name": task["column_name"],
            "max_seq_len": task["max_seq_len"],
        },
        "pd": pd,
        "runtime": {"autocast_bf16": False, "device": "cpu"},
        "cadence": {"train_log_every": 10, "save_every": 100},
    }


def _convert(run_dir: Path, **kw: Any) -> None:
    final = yaml.safe_load((run_dir / "final_config.yaml").read_text())
    (run_dir / "final_config.yaml").unlink()
    (run_dir / "experiment_config.yaml").write_text(
        yaml.safe_dump(to_experiment_config(final, **kw))
    )


@pytest.mark.parametrize(("arch", "fn_type", "hidden"), [CASES[1], CASES[-1]])
def test_experiment_config_run_matches_reference(
    tmp_path: Path, arch: str, fn_type: str, hidden: list[int]
) -> None:
    model, cls, patterns = _setup(arch, fn_type)
    run = tmp_path / "run"
    sd = write_run(run, model, model_class=cls, patterns=patterns, fn_type=fn_type, hidden=hidden)
    _convert(run, defaults=arch == "llama")  # PDConfig / LMTargetConfig defaults too
    adapter = _check(run, model, sd, patterns, fn_type, "leaky_hard")
    assert adapter.defaults.seq_len == 16 and adapter.defaults.dataset_column == "story"


def test_field_mapping_and_errors(tmp_path: Path) -> None:
    raw = {
        "target": {
            "spec": {"kind": "pretrained", "model_class": "m.LlamaSimpleMLP", "run_path": "e/p/r"},
            "output_extract": 0,
        },
        "data": {"dataset_name": "d", "tokenizer_name": "t"},
        "pd": {"ci_config": {"mode": "layerwise"}, "decomposition_targets": [{"C": 2}]},
    }
    got = migrate_legacy_keys(raw)
    assert got["pretrained_model_output_attr"] == "idx_0"  # Goodfire targets return (logits, loss)
    assert got["pretrained_model_name"] == "e/p/r" and got["sigmoid_type"] == "leaky_hard"
    assert got["task_config"]["max_seq_len"] == 512 and got["sampling"] == "continuous"
    model, cls, patterns = _setup("gpt2", "vector_mlp")
    run = tmp_path / "run"
    write_run(run, model, model_class=cls, patterns=patterns, fn_type="vector_mlp", hidden=[4])
    _convert(run)
    cfg = yaml.safe_load((run / "experiment_config.yaml").read_text())
    cfg["pd"]["ci_config"]["fn_type"] = "global_reverse_residual_v9"
    (run / "experiment_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(FormatError, match=r"experiment_config.yaml.*global_reverse_residual_v9"):
        get_host().load_adapter(f"spd:{run}")


@pytest.mark.slow
def test_harvest_fidelity_autointerp_end_to_end(tmp_path: Path) -> None:
    """A torch-era param-decomp run over the bundled demo GPT-2 through info, harvest, eval
    fidelity (every splice variant) and offline autointerp."""
    import json

    import torch
    from typer.testing import CliRunner

    from spd_host.autointerp.api import load_labels
    from spd_host.cli.app import app
    from spd_host.evals import run_suite
    from spd_host.harvest import HarvestConfig, HarvestRepo, run_harvest
    from spd_host.models import load_base_model
    from tests.spd.run_writer import config_dict, expand, make_state_dict

    patterns = {"transformer.h.0.mlp.c_fc": 8, "transformer.h.1.mlp.c_proj": 6}
    model = load_base_model("demo")
    sd = make_state_dict(model, expand(model, patterns), "vector_mlp", [4])
    final = config_dict(
        base_dir=tmp_path,
        model_class="transformers.GPT2LMHeadModel",
        patterns=patterns,
        fn_type="vector_mlp",
        hidden=[4],
    )
    final.update(pretrained_model_name="demo", tokenizer_name="demo")
    final["task_config"].update(dataset_name="demo", max_seq_len=32)
    run = tmp_path / "p-torch01"
    run.mkdir()
    (run / "experiment_config.yaml").write_text(yaml.safe_dump(to_experiment_config(final)))
    torch.save(sd, run / "model_200.pth")
    did = f"spd:{run}"
    info = CliRunner().invoke(app, ["info", did, "--json"])
    assert info.exit_code == 0, info.output
    assert {s["name"] for s in json.loads(info.stdout)["sites"]} == {"0.mlp.up", "1.mlp.down"}
    run_harvest(did, HarvestConfig(dataset="demo", n_tokens=128, batch_size=4, seq_len=16))
    summary = HarvestRepo.open(did).summary()
    assert len(summary) == 8 + 6
    variants = ("ci_masked", "all_ones", "rounded_ci", "zero_mask", "stochastic", "random")
    result = run_suite(
        "fidelity", did, dataset="demo", n_tokens=64, seq_len=16, batch_size=4, variants=variants
    )
    assert sorted(result.variants) == sorted(variants)
    out = CliRunner().invoke(app, ["autointerp", did, "--no-progress"])
    assert out.exit_code == 0, out.output
    fired = {c.key for c in summary if c.firing_count > 0}
    assert fired and {r.component_key for r in load_labels(did)} == fired
