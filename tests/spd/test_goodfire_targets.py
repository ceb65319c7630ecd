"""SPD runs over Goodfire's own target models (``spd.pretrain.models``) load and compute exactly.

Every run here is written in the on-disk layout of Goodfire's trainers (tests/spd/goodfire_pretrain
for the pretrain run, tests/spd/run_writer for the SPD run); logits, CI and component activations
are checked against the formulas in tests/spd/goodfire_pretrain.reference_forward and
tests/spd/reference.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from spd_host.adapter import HarvestOptions
from spd_host.cli.app import app
from spd_host.errors import FormatError, SourceNotFoundError
from spd_host.plugins import get_host
from spd_host.topology import topology_of
from tests.spd import goodfire_pretrain as gp
from tests.spd import reference as ref
from tests.spd.run_writer import config_dict, expand, make_state_dict

VARIANTS = {
    "llama_simple": gp.LLAMA_SIMPLE,
    "llama_simple_fused_qkv": gp.LLAMA_SIMPLE_FUSED,
    "llama_simple_mlp": gp.LLAMA_SIMPLE_MLP,
    "gpt2_simple": gp.GPT2_SIMPLE,
}
PATTERNS = {
    "LlamaSimple": {"h.*.mlp.down_proj": 5, "h.0.mlp.gate_proj": 4, "h.1.attn.q_proj": 3},
    "LlamaSimpleMLP": {"h.*.mlp.c_fc": 5, "h.1.mlp.down_proj": 4, "h.0.attn.k_proj": 3},
    "GPT2Simple": {"h.*.mlp.down_proj": 5, "h.0.mlp.c_fc": 4, "h.1.attn.o_proj": 3},
}
FUSED_PATTERNS = {"h.*.mlp.down_proj": 5, "h.0.attn.c_attn": 4}
EXPECTED_SITES = {
    "llama_simple": {"0.glu.down", "1.glu.down", "0.glu.gate", "1.attn.q"},
    "llama_simple_fused_qkv": {"0.glu.down", "1.glu.down", "0.attn_fused.qkv"},
    "llama_simple_mlp": {"0.mlp.up", "1.mlp.up", "1.mlp.down", "0.attn.k"},
    "gpt2_simple": {"0.mlp.down", "1.mlp.down", "0.mlp.up", "1.attn.o"},
}
SEQ = 12  # longer than LLAMA_SIMPLE's n_ctx (8): clamped RoPE positions are exercised


def _tokens(seed: int = 5) -> torch.Tensor:
    return torch.randint(0, gp.VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _patterns(variant: str) -> dict[str, int]:
    cfg = VARIANTS[variant]
    return FUSED_PATTERNS if variant.endswith("fused_qkv") else PATTERNS[cfg["model_type"]]


def _write_spd_run(
    run_dir: Path,
    model_cfg: dict[str, Any],
    name: str,
    patterns: dict[str, int],
    *,
    fn_type: str = "mlp",
    hidden: list[int] | None = None,
    with_target: bool = True,
    class_path: str | None = None,
    target_sd: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """An SPD run (final_config.yaml + model_<step>.pth) whose target is pretrain run ``name``.

    ``target_model.*`` holds ``target_sd`` (the pretrain weights, as in a real run; default: the
    final checkpoint of ``name`` when it is a local file).
    """
    from spd_adapters.spd.targets.configs import CONFIG_CLASSES
    from spd_adapters.spd.targets.models import build_model

    hidden = [3] if hidden is None else hidden
    model = build_model(CONFIG_CLASSES[model_cfg["model_type"]].model_validate(model_cfg))
    if target_sd is None and Path(name).is_file():
        target_sd = torch.load(name, weights_only=True)
    if target_sd is not None:
        model.load_state_dict(target_sd)
    module_to_c = expand(model, patterns)
    sd = make_state_dict(model, module_to_c, fn_type, hidden)
    if not with_target:
        sd = {k: v for k, v in sd.items() if not k.startswith("target_model.")}
    cfg = config_dict(
        base_dir=run_dir,
        model_class=class_path or gp.CLASS_PATHS[model_cfg["model_type"]],
        patterns=patterns,
        fn_type=fn_type,
        hidden=hidden,
    )
    cfg["pretrained_model_name"] = name
    cfg["pretrained_model_output_attr"] = "idx_0"
    cfg["tokenizer_name"] = "SimpleStories/test-SimpleStories-gpt2-1.25M"  # not cached: offline
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "final_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.save(sd, run_dir / "model_300.pth")
    return sd


def _pretrain(tmp_path: Path, variant: str) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path / "pretrain" / "2025-01-01_00-00-00"
    sd = gp.write_pretrain_run(out, VARIANTS[variant])
    return out / "checkpoints" / "model_step_100.pt", sd


def _check_harvest(
    adapter: Any, target_sd: dict[str, torch.Tensor], spd_sd: dict[str, torch.Tensor], cfg: dict
) -> None:
    """CI, component activations and next-token logits against the independent formulas."""
    tokens = _tokens()
    batch = get_host().harvest_fn(adapter, HarvestOptions(threshold=0.0))(tokens)
    logits_ref, inputs = gp.reference_forward(target_sd, cfg, tokens)
    torch.testing.assert_close(batch.next_token_logits, logits_ref, atol=1e-5, rtol=1e-5)
    names = adapter.site_names_by_path()
    fired = 0
    for path, site in names.items():
        emb = path == "wte"
        z = ref.pre_sigmoid_layerwise(spd_sd, "mlp", path, inputs[path], emb)
        got = batch.activations[site]
        torch.testing.assert_close(
            got["causal_importance"], ref.sigmoid("leaky_hard", z), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            got["component_activation"],
            ref.reported_component_activation(spd_sd, path, inputs[path], emb),
            atol=1e-5,
            rtol=1e-5,
        )
        fired += int(batch.firings[site].sum())
    assert fired > 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_target_logits_match_the_formulas(tmp_path: Path, variant: str) -> None:
    """Local checkpoint path form; the highest model_step_N wins; forward is (logits, loss)."""
    ckpt, target_sd = _pretrain(tmp_path, variant)
    cfg = VARIANTS[variant]
    spd_sd = _write_spd_run(tmp_path / "spd", cfg, str(ckpt), _patterns(variant))
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'spd'}")
    assert {s.name for s in adapter.sites} == EXPECTED_SITES[variant]
    model = adapter.load_base_model()
    tokens = _tokens()
    with torch.no_grad():
        out = model(tokens, targets=tokens)
    assert isinstance(out, tuple) and len(out) == 2  # pretrained_model_output_attr: idx_0
    expected = gp.reference_logits(target_sd, cfg, tokens)
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)
    ce = torch.nn.functional.cross_entropy(expected.flatten(0, 1), tokens.flatten())
    torch.testing.assert_close(out[1], ce, atol=1e-5, rtol=1e-5)
    _check_harvest(adapter, target_sd, spd_sd, cfg)


def test_weights_come_from_the_pretrain_checkpoint_without_target_model(tmp_path: Path) -> None:
    ckpt, target_sd = _pretrain(tmp_path, "llama_simple_mlp")
    cfg = VARIANTS["llama_simple_mlp"]
    spd_sd = _write_spd_run(
        tmp_path / "spd", cfg, str(ckpt), {"h.*.mlp.c_fc": 4, "wte": 3}, with_target=False
    )
    assert not any(k.startswith("target_model.") for k in spd_sd)
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'spd'}")
    assert {s.name for s in adapter.sites} == {"0.mlp.up", "1.mlp.up", "embed"}
    _check_harvest(adapter, target_sd, spd_sd, cfg)


@pytest.mark.parametrize(
    "form",
    [
        "wandb:goodfire/spd/runs/ab12cd34",
        "wandb:goodfire/spd/ab12cd34",
        "goodfire/spd/runs/ab12cd34",
        "goodfire/spd/ab12cd34",
        "https://wandb.ai/goodfire/spd/runs/ab12cd34?nw=x",
    ],
)
def test_wandb_name_reads_the_offline_cache(tmp_path: Path, form: str) -> None:
    """A wandb pretrain run: the same files flat in the run's files, read from spd-host's cache."""
    from spd_host.paths import cache_dir

    cached = cache_dir("wandb") / "goodfire__spd__ab12cd34"
    target_sd = gp.write_pretrain_run(cached, gp.GPT2_SIMPLE, flat=True)
    (cached / ".complete").write_text("goodfire/spd/ab12cd34")
    assert not (cached / "checkpoints").exists() and (cached / "model_step_100.pt").is_file()
    spd_sd = _write_spd_run(
        tmp_path / "spd", gp.GPT2_SIMPLE, form, PATTERNS["GPT2Simple"], with_target=False
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'spd'}")
    assert adapter.base_model_name == form
    _check_harvest(adapter, target_sd, spd_sd, gp.GPT2_SIMPLE)
    tok = adapter.load_tokenizer()  # Hub name not cached (offline): the run's tokenizer.json
    assert tok.convert_ids_to_tokens([5, 1]) == ["w5", "[EOS]"]


def test_wandb_run_not_cached_offline_is_a_clear_error(tmp_path: Path) -> None:
    _write_spd_run(
        tmp_path / "spd", gp.GPT2_SIMPLE, "wandb:goodfire/spd/runs/zz99yy88", PATTERNS["GPT2Simple"]
    )
    with pytest.raises(SourceNotFoundError, match=r"zz99yy88.*not in the local cache.*WANDB_MODE"):
        list(get_host().load_adapter(f"spd:{tmp_path / 'spd'}").sites)


@pytest.mark.parametrize(
    "class_path",
    [
        "param_decomp.pretrain.models.llama_simple_mlp.LlamaSimpleMLP",
        "param_decomp.experiments.lm.pretrain.models.llama_simple_mlp.LlamaSimpleMLP",
        "simple_stories_train.models.llama_simple_mlp.LlamaSimpleMLP",
        "spd.pretrain.models.LlamaSimpleMLP",
    ],
)
def test_renamed_class_paths(tmp_path: Path, class_path: str) -> None:
    ckpt, _ = _pretrain(tmp_path, "llama_simple_mlp")
    _write_spd_run(
        tmp_path / "spd",
        gp.LLAMA_SIMPLE_MLP,
        str(ckpt),
        PATTERNS["LlamaSimpleMLP"],
        class_path=class_path,
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'spd'}")
    assert {s.name for s in adapter.sites} == EXPECTED_SITES["llama_simple_mlp"]


def test_run_dir_and_flat_dir_pick_the_highest_step(tmp_path: Path) -> None:
    from spd_adapters.spd.targets.run_reader import locate

    ckpt, _ = _pretrain(tmp_path, "gpt2_simple")
    run_dir = ckpt.parent.parent
    assert locate(str(run_dir)).checkpoint == ckpt  # 100 > 4 > 0 numerically
    flat = tmp_path / "flat"
    gp.write_pretrain_run(flat, gp.GPT2_SIMPLE, flat=True)
    found = locate(str(flat))
    assert found.checkpoint == flat / "model_step_100.pt"
    assert found.model_config == flat / "model_config.yaml" and found.tokenizer_dir == flat


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_topology_maps_the_canonical_structure(tmp_path: Path, variant: str) -> None:
    """Canonical addresses and hook points hold the tensors they define on these models."""
    ckpt, target_sd = _pretrain(tmp_path, variant)
    cfg = VARIANTS[variant]
    _write_spd_run(tmp_path / "spd", cfg, str(ckpt), _patterns(variant))
    model = get_host().load_adapter(f"spd:{tmp_path / 'spd'}").load_base_model()
    topo = topology_of(model)
    assert topo.spec.name.startswith("goodfire_") and topo.architecture == cfg["model_type"]
    assert topo.n_layers == 2
    mlp = "glu" if cfg["model_type"] == "LlamaSimple" else "mlp"
    assert topo.module_path(f"1.{mlp}.down") == "h.1.mlp.down_proj"
    assert topo.module_path("embed") == "wte" and topo.module_path("output") == "lm_head"
    points = ["0.resid_pre", "0.attn_in", "0.attn_out", "0.resid_mid", "0.mlp_in"]
    points += ["0.mlp_hidden", "0.mlp_out", "0.resid_post", "1.resid_pre", "unembed_in"]
    tokens = _tokens()
    _, inputs = gp.reference_forward(target_sd, cfg, tokens)
    with torch.no_grad(), topo.capture(points) as acts:
        logits = model(tokens)[0]
    attn_in = "h.0.attn.c_attn" if variant.endswith("fused_qkv") else "h.0.attn.q_proj"
    torch.testing.assert_close(acts["0.attn_in"], inputs[attn_in], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        acts["0.mlp_hidden"], inputs["h.0.mlp.down_proj"], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        acts["0.attn_out"],
        inputs["h.0.attn.o_proj"] @ target_sd["h.0.attn.o_proj.weight"].T
        + target_sd.get("h.0.attn.o_proj.bias", torch.zeros(())),
        atol=1e-5,
        rtol=1e-5,
    )
    torch.testing.assert_close(acts["0.resid_mid"], acts["0.resid_pre"] + acts["0.attn_out"])
    torch.testing.assert_close(acts["0.resid_post"], acts["0.resid_mid"] + acts["0.mlp_out"])
    torch.testing.assert_close(acts["0.resid_post"], acts["1.resid_pre"])
    torch.testing.assert_close(acts["unembed_in"] @ target_sd["wte.weight"].T, logits)


def test_info_lists_the_sites(tmp_path: Path) -> None:
    ckpt, _ = _pretrain(tmp_path, "llama_simple")
    _write_spd_run(tmp_path / "spd", gp.LLAMA_SIMPLE, str(ckpt), PATTERNS["LlamaSimple"])
    result = CliRunner().invoke(app, ["info", f"spd:{tmp_path / 'spd'}", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    sites = {s["name"]: s for s in doc["sites"]}
    assert set(sites) == EXPECTED_SITES["llama_simple"]
    # A down-projection reads the canonical MLP-hidden hook point (issue #11 §5).
    assert sites["1.glu.down"]["reads_from"] == "1.mlp_hidden"
    assert sites["1.attn.q"]["reads_from"] == "1.attn_in"
    assert sites["1.glu.down"]["writes_to"] == ["1.mlp_out"]
    assert sites["0.glu.gate"]["reads_from"] == "0.mlp_in"
    assert sites["1.attn.q"]["n_components"] == 3


# -- errors ------------------------------------------------------------------------------------


def _error_run(tmp_path: Path, variant: str = "llama_simple_mlp") -> tuple[Path, Path]:
    ckpt, _ = _pretrain(tmp_path, variant)
    _write_spd_run(tmp_path / "spd", VARIANTS[variant], str(ckpt), _patterns(variant))
    return ckpt, tmp_path / "spd"


def _load(spd_dir: Path) -> nn.Module:
    adapter = get_host().load_adapter(f"spd:{spd_dir}")
    list(adapter.sites)
    return adapter.load_base_model()


def test_missing_model_config(tmp_path: Path) -> None:
    ckpt, spd = _error_run(tmp_path)
    (ckpt.parent.parent / "model_config.yaml").unlink()
    with pytest.raises(FormatError, match=r"no model_config\.yaml next to checkpoint"):
        _load(spd)


def test_unknown_model_type(tmp_path: Path) -> None:
    ckpt, spd = _error_run(tmp_path)
    path = ckpt.parent.parent / "model_config.yaml"
    path.write_text(yaml.dump({**gp.LLAMA_SIMPLE_MLP, "model_type": "Mamba"}))
    with pytest.raises(FormatError, match=r"model_config\.yaml: unknown model_type 'Mamba'"):
        _load(spd)


def test_model_type_must_match_the_class(tmp_path: Path) -> None:
    ckpt, spd = _error_run(tmp_path)
    path = ckpt.parent.parent / "model_config.yaml"
    path.write_text(yaml.dump({**gp.LLAMA_SIMPLE_MLP, "model_type": "LlamaSimple"}))
    with pytest.raises(FormatError, match="does not match pretrained_model_class"):
        _load(spd)


def test_old_runs_without_model_type_take_it_from_the_class(tmp_path: Path) -> None:
    ckpt, spd = _error_run(tmp_path)
    path = ckpt.parent.parent / "model_config.yaml"
    path.write_text(yaml.dump({k: v for k, v in gp.LLAMA_SIMPLE_MLP.items() if k != "model_type"}))
    assert type(_load(spd)).__name__ == "LlamaSimpleMLP"


def test_unknown_model_config_field(tmp_path: Path) -> None:
    ckpt, spd = _error_run(tmp_path)
    path = ckpt.parent.parent / "model_config.yaml"
    path.write_text(yaml.dump({**gp.LLAMA_SIMPLE_MLP, "sliding_window": 4}))
    with pytest.raises(FormatError, match=r"sliding_window: Extra inputs are not permitted"):
        _load(spd)


@pytest.mark.parametrize("with_target", [False, True])
def test_wrong_shaped_weight_names_file_and_tensor(tmp_path: Path, with_target: bool) -> None:
    ckpt, _ = _pretrain(tmp_path, "gpt2_simple")
    spd = tmp_path / "spd"
    _write_spd_run(spd, gp.GPT2_SIMPLE, str(ckpt), {"h.0.mlp.c_fc": 3}, with_target=with_target)
    if with_target:
        file = spd / "model_300.pth"
        # The error names the key as it is stored in the SPD checkpoint.
        key = stored = "target_model.h.1.attn.v_proj.weight"
    else:
        file, key = ckpt, "h.1.attn.v_proj.weight"
        stored = key
    sd = torch.load(file, weights_only=True)
    sd[key] = torch.zeros(16, 15)
    torch.save(sd, file)
    with pytest.raises(
        FormatError, match=rf"{file.name}.*tensor '?{re.escape(stored)}'? has shape \[16, 15\]"
    ):
        _load(spd)


def test_missing_weight_is_named(tmp_path: Path) -> None:
    ckpt, spd = _error_run(tmp_path, "gpt2_simple")
    _write_spd_run(spd, gp.GPT2_SIMPLE, str(ckpt), {"h.0.mlp.c_fc": 3}, with_target=False)
    sd = torch.load(ckpt, weights_only=True)
    del sd["h.0.ln_2.bias"]
    torch.save(sd, ckpt)
    with pytest.raises(FormatError, match=r"model_step_100\.pt.*missing \['h\.0\.ln_2\.bias'\]"):
        _load(spd)


@pytest.mark.parametrize(
    ("class_path", "message"),
    [
        ("spd.pretrain.models.gpt2.GPT2", "this Goodfire target model is not supported"),
        ("spd.pretrain.models.llama_simple.LlamaSimpleMLP", "not supported"),
        ("transformers.pipeline", "is not a transformers model class"),
        ("os.system", "is not a transformers class nor one of Goodfire's target models"),
    ],
)
def test_unknown_classes_are_refused_without_import(
    tmp_path: Path, class_path: str, message: str
) -> None:
    ckpt, spd = _error_run(tmp_path)
    _write_spd_run(
        spd, gp.LLAMA_SIMPLE_MLP, str(ckpt), PATTERNS["LlamaSimpleMLP"], class_path=class_path
    )
    with pytest.raises(FormatError, match=message):
        _load(spd)


def test_missing_pretrain_run(tmp_path: Path) -> None:
    spd = tmp_path / "spd"
    _write_spd_run(spd, gp.GPT2_SIMPLE, str(tmp_path / "nope.pt"), {"h.0.mlp.c_fc": 3})
    with pytest.raises(SourceNotFoundError, match="neither a local checkpoint"):
        _load(spd)
