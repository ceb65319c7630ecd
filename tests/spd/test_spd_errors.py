"""Bad SPD runs fail with clear, specific errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml

from spd_host.errors import FormatError, SourceNotFoundError
from spd_host.plugins import get_host
from tests.spd.run_writer import LLAMA_PATTERNS, tiny_llama, write_run

CLS = "transformers.LlamaForCausalLM"


def _run(tmp_path: Path, **kw) -> tuple[Path, dict[str, torch.Tensor]]:
    run = tmp_path / "run"
    kw.setdefault("fn_type", "shared_mlp")
    kw.setdefault("hidden", [4])
    sd = write_run(run, tiny_llama(), model_class=CLS, patterns=dict(LLAMA_PATTERNS), **kw)
    return run, sd


def _load_full(run: Path) -> None:
    host = get_host()
    adapter = host.load_adapter(f"spd:{run}")
    host.harvest_fn(adapter)


def test_missing_config(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    (run / "final_config.yaml").unlink()
    with pytest.raises(FormatError, match=r"no final_config\.yaml"):
        get_host().load_adapter(f"spd:{run}")


def test_no_checkpoint(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    for p in run.glob("*.pth"):
        p.unlink()
    with pytest.raises(FormatError, match=r"no checkpoint named model_<step>\.pth"):
        get_host().load_adapter(f"spd:{run}")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError):
        get_host().load_adapter(f"spd:{tmp_path / 'nope'}")


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    run, sd = _run(tmp_path)
    evil = dict(sd)
    evil["_extra_state"] = argparse.Namespace(cmd="echo pwned")  # type: ignore[assignment]
    torch.save(evil, run / "model_300.pth")
    with pytest.raises(
        FormatError,
        match=r"refused to unpickle the checkpoint: it holds an object of type argparse\.Namespace",
    ) as err:
        get_host().load_adapter(f"spd:{run}")
    assert "model_300.pth" in str(err.value)


def test_non_state_dict_checkpoint(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    torch.save([torch.zeros(2)], run / "model_300.pth")
    with pytest.raises(FormatError, match="expected a state dict"):
        get_host().load_adapter(f"spd:{run}")


def _edit_config(run: Path, **changes) -> None:
    path = run / "final_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.update(changes)
    path.write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize(
    ("mode", "fn_type"),
    [
        ("layerwise", "fancy_mlp"),
        ("global", "global_fancy_transformer"),
        ("global", "mlp"),
        ("layerwise", "global_shared_transformer"),
    ],
)
def test_unknown_ci_fn_type(tmp_path: Path, mode: str, fn_type: str) -> None:
    """The unsupported fn type is the error, ahead of the fields it would need (hidden_dims
    null here used to surface as 'hidden_dims: Input should be a valid list')."""
    run, _ = _run(tmp_path)
    _edit_config(run, ci_config={"mode": mode, "fn_type": fn_type, "hidden_dims": None})
    with pytest.raises(
        FormatError, match=f"unsupported ci_config.fn_type '{fn_type}' for mode '{mode}'"
    ) as err:
        get_host().load_adapter(f"spd:{run}")
    assert "final_config.yaml" in str(err.value)


def test_c_mismatch(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    _edit_config(
        run,
        module_info=[
            {"module_pattern": "model.layers.*.mlp.down_proj", "C": 7},
            {"module_pattern": "model.layers.0.self_attn.q_proj", "C": 5},
        ],
    )
    with pytest.raises(FormatError, match=r"do not have C=7"):
        get_host().load_adapter(f"spd:{run}")


def test_config_module_without_components(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    _edit_config(
        run,
        module_info=[
            {"module_pattern": "model.layers.*.mlp.down_proj", "C": 6},
            {"module_pattern": "model.layers.*.self_attn.q_proj", "C": 5},
        ],
    )
    with pytest.raises(FormatError, match=r"missing for \['model.layers.1.self_attn.q_proj'\]"):
        get_host().load_adapter(f"spd:{run}")


def test_pattern_matching_nothing(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    _edit_config(run, module_info=[{"module_pattern": "transformer.h.*.mlp.c_fc", "C": 6}])
    with pytest.raises(FormatError, match="matches no module of the base model"):
        get_host().load_adapter(f"spd:{run}")


def test_ci_hidden_dims_mismatch(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    _edit_config(run, ci_config={"mode": "layerwise", "fn_type": "shared_mlp", "hidden_dims": [5]})
    with pytest.raises(
        FormatError, match=r"ci_fn\._ci_fns\.model-layers-0-mlp-down_proj: layers\.0\.W"
    ):
        _load_full(run)


def test_ci_mode_mismatch(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    _edit_config(
        run, ci_config={"mode": "global", "fn_type": "global_shared_mlp", "hidden_dims": [4]}
    )
    with pytest.raises(
        FormatError, match=r"config says global CI but the checkpoint has ci_fn\._ci_fns"
    ):
        _load_full(run)


def test_unknown_keys(tmp_path: Path) -> None:
    run, sd = _run(tmp_path)
    torch.save({**sd, "mystery.weight": torch.zeros(1)}, run / "model_300.pth")
    with pytest.raises(FormatError, match="unrecognised checkpoint keys"):
        get_host().load_adapter(f"spd:{run}")


def test_short_id_needs_default_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPD_HOST_WANDB_ENTITY", raising=False)
    monkeypatch.delenv("SPD_HOST_WANDB_PROJECT", raising=False)
    with pytest.raises(SourceNotFoundError, match="SPD_HOST_WANDB_ENTITY"):
        get_host().load_adapter("s-1a2b3c4d")


def test_short_id_resolves_against_default_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short ID reads the wandb cache of <entity>/<project>/<id> (pre-filled here: no network)."""
    from spd_host.paths import cache_dir

    monkeypatch.setenv("SPD_HOST_WANDB_ENTITY", "goodfire")
    monkeypatch.setenv("SPD_HOST_WANDB_PROJECT", "spd")
    cached = cache_dir("wandb") / "goodfire__spd__s-1a2b3c4d"
    write_run(
        cached,
        tiny_llama(),
        model_class=CLS,
        patterns=dict(LLAMA_PATTERNS),
        fn_type="mlp",
        hidden=[2],
    )
    (cached / ".complete").write_text("goodfire/spd/s-1a2b3c4d")
    adapter = get_host().load_adapter("s-1a2b3c4d")
    assert adapter.decomposition_id == "spd:s-1a2b3c4d"
    assert len(adapter.sites) == 3


def test_hub_source(tmp_path: Path, offline_hub: Path) -> None:
    """spd:hf:<repo>/<subdir> reads a run from the (offline) Hub cache."""
    from tests.conftest import add_to_offline_hub

    run, _ = _run(tmp_path)
    files = {f"runs/a/{p.name}": p.read_bytes() for p in run.iterdir() if p.is_file()}
    add_to_offline_hub(offline_hub, "goodfire/spd-runs", files)
    adapter = get_host().load_adapter("spd:hf:goodfire/spd-runs/runs/a")
    assert {s.name for s in adapter.sites} == {"0.glu.down", "1.glu.down", "0.attn.q"}


def test_wandb_source_uses_cache(tmp_path: Path) -> None:
    from spd_host.paths import cache_dir

    cached = cache_dir("wandb") / "goodfire__spd__abcd1234"
    write_run(
        cached,
        tiny_llama(),
        model_class=CLS,
        patterns=dict(LLAMA_PATTERNS),
        fn_type="mlp",
        hidden=[2],
    )
    (cached / ".complete").write_text("goodfire/spd/abcd1234")
    adapter = get_host().load_adapter("spd:wandb:goodfire/spd/abcd1234")
    assert adapter.decomposition_id == "spd:wandb:goodfire/spd/abcd1234"


def test_unknown_base_model_class(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    _edit_config(run, pretrained_model_class="spd.experiments.tms.models.TMSModel")
    with pytest.raises(FormatError, match="is not a transformers class"):
        list(get_host().load_adapter(f"spd:{run}").sites)


def test_missing_base_model_config(tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    _edit_config(run, pretrained_model_name=str(tmp_path / "gone"))
    with pytest.raises(SourceNotFoundError, match="gone"):
        list(get_host().load_adapter(f"spd:{run}").sites)
