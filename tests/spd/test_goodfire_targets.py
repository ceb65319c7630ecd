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
    "llama_simple_mlp_untied_sinks": gp.LLAMA_SIMPLE_MLP_SINKS,
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
    "llama_simple_mlp_untied_sinks": {"0.mlp.up", "1.mlp.up", "1.mlp.down", "0.attn.k"},
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
    ci_config: dict[str, Any] | None = None,
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
    sd = make_state_dict(model, module_to_c, fn_type, hidden, ci_config=ci_config)
    if not with_target:
        sd = {k: v for k, v in sd.items() if not k.startswith("target_model.")}
    cfg = config_dict(
        base_dir=run_dir,
        model_class=class_path or gp.CLASS_PATHS[model_cfg["model_type"]],
        patterns=patterns,
        fn_type=fn_type,
        hidden=hidden,
        ci_config=ci_config,
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
    adapter: Any,
    target_sd: dict[str, torch.Tensor],
    spd_sd: dict[str, torch.Tensor],
    cfg: dict,
    fn_type: str = "mlp",
) -> None:
    """CI, component activations and next-token logits against the independent formulas."""
    tokens = _tokens()
    batch = get_host().harvest_fn(adapter, HarvestOptions(threshold=0.0))(tokens)
    logits_ref, inputs = gp.reference_forward(target_sd, cfg, tokens)
    torch.testing.assert_close(batch.next_token_logits, logits_ref, atol=1e-5, rtol=1e-5)
    names = adapter.site_names_by_path()
    if fn_type == "global_shared_mlp":
        xs = {p: inputs[p] for p in names}
        z_all = ref.pre_sigmoid_global(spd_sd, xs, {p for p in names if p == "wte"})
    fired = 0
    for path, site in names.items():
        emb = path == "wte"
        if fn_type == "global_shared_mlp":
            z = z_all[path]
        else:
            z = ref.pre_sigmoid_layerwise(spd_sd, fn_type, path, inputs[path], emb)
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
        "https://wandb.ai/goodfire/spd/runs/ab12cd34/overview",
    ],
)
def test_wandb_name_forms(form: str) -> None:
    from spd_adapters.spd.targets.run_reader import parse_wandb_name

    assert parse_wandb_name(form) == ("goodfire", "spd", "ab12cd34")


@pytest.mark.parametrize("form", ["not/a/wandbrunid", "./ckpt/model_step_1.pt", "wandb:a/b"])
def test_not_wandb_names(form: str) -> None:
    from spd_adapters.spd.targets.run_reader import parse_wandb_name

    assert parse_wandb_name(form) is None


@pytest.mark.parametrize("form", ["wandb:goodfire/spd/runs/ab12cd34", "goodfire/spd/ab12cd34"])
def test_wandb_name_reads_the_offline_cache(tmp_path: Path, form: str, offline_hub: Path) -> None:
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
    torch.testing.assert_close(acts["unembed_in"] @ target_sd["lm_head.weight"].T, logits)


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
        key, stored = "target_model.h.1.attn.v_proj.weight", "h.1.attn.v_proj.weight"
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


def test_tokenizer_name_other_than_the_pretrain_tokenizer_wins(tmp_path: Path) -> None:
    """A local ``tokenizer_name`` that is not the run's training tokenizer is used as given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    _ckpt, spd = _error_run(tmp_path)
    other = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "zz": 1}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=other, unk_token="[UNK]").save_pretrained(
        str(tmp_path / "tok")
    )
    cfg = yaml.safe_load((spd / "final_config.yaml").read_text())
    adapter = get_host().load_adapter(f"spd:{spd}")
    assert adapter.load_tokenizer().convert_ids_to_tokens([5]) == ["w5"]  # same as training
    cfg["tokenizer_name"] = str(tmp_path / "tok")
    (spd / "final_config.yaml").write_text(yaml.safe_dump(cfg))
    adapter = get_host().load_adapter(f"spd:{spd}")
    assert adapter.load_tokenizer().convert_ids_to_tokens([1]) == ["zz"]


def test_param_decomp_pretrain_cache_safetensors_without_lm_head(tmp_path: Path) -> None:
    """param-decomp's hand-off layout: flat model_step_<N>.safetensors (no lm_head.weight)."""
    from safetensors.torch import save_file

    cache = tmp_path / "pretrain_cache" / "spd-ab12cd34"
    cache.mkdir(parents=True)
    cfg = gp.LLAMA_SIMPLE_MLP
    (cache / "model_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    target_sd = gp.goodfire_state_dict(cfg, seed=9)
    save_file(
        {k: v.contiguous() for k, v in target_sd.items() if k != "lm_head.weight"},
        str(cache / "model_step_2000.safetensors"),
    )
    spd_sd = _write_spd_run(
        tmp_path / "spd",
        cfg,
        str(cache),
        PATTERNS["LlamaSimpleMLP"],
        with_target=False,
        class_path="param_decomp.pretrain.models.llama_simple_mlp.LlamaSimpleMLP",
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'spd'}")
    _check_harvest(adapter, target_sd, spd_sd, cfg)


def test_tied_weights_that_differ_are_refused(tmp_path: Path) -> None:
    ckpt, spd = _error_run(tmp_path, "gpt2_simple")
    _write_spd_run(spd, gp.GPT2_SIMPLE, str(ckpt), {"h.0.mlp.c_fc": 3}, with_target=False)
    sd = torch.load(ckpt, weights_only=True)
    sd["lm_head.weight"] = sd["wte.weight"] + 1
    torch.save(sd, ckpt)
    with pytest.raises(FormatError, match=r"'wte\.weight' and 'lm_head\.weight' differ"):
        _load(spd)


def test_wandb_download_fetches_configs_tokenizer_and_only_the_latest_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download path, against a stand-in for wandb's public API (``Api().run(p).files()``,
    each file with ``name`` and ``download(root=, replace=, exist_ok=)``) serving a run's files.

    An SPD run whose checkpoint holds ``target_model.*`` never downloads the pretrain checkpoint
    (real runs always do); one without downloads only the highest step, once.
    """
    import sys
    import types

    served = tmp_path / "served"
    target_sd = gp.write_pretrain_run(served, gp.GPT2_SIMPLE, flat=True)
    (served / "output.log").write_text("not wanted")
    asked: list[str] = []

    class _File:
        def __init__(self, path: Path) -> None:
            self.name = path.name
            self._path = path

        def download(self, root: str, replace: bool = False, exist_ok: bool = False) -> None:
            asked.append(self.name)
            (Path(root) / self.name).write_bytes(self._path.read_bytes())

    class _Run:
        def files(self) -> list[_File]:
            return [_File(p) for p in sorted(served.iterdir())]

    class _Api:
        def run(self, path: str) -> _Run:
            assert path == "goodfire/spd/ab12cd34"
            return _Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=_Api))
    monkeypatch.delenv("WANDB_MODE")
    name = "wandb:goodfire/spd/runs/ab12cd34"
    spd_sd = _write_spd_run(
        tmp_path / "with", gp.GPT2_SIMPLE, name, PATTERNS["GPT2Simple"], target_sd=target_sd
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'with'}")
    _check_harvest(adapter, target_sd, spd_sd, gp.GPT2_SIMPLE)
    assert sorted(asked) == ["final_config.yaml", "model_config.yaml", "tokenizer.json"]
    asked.clear()

    spd_sd = _write_spd_run(
        tmp_path / "without", gp.GPT2_SIMPLE, name, PATTERNS["GPT2Simple"], with_target=False
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'without'}")
    _check_harvest(adapter, target_sd, spd_sd, gp.GPT2_SIMPLE)
    assert asked == ["model_step_100.pt"]  # not steps 0 and 4, not output.log
    asked.clear()
    from spd_adapters.spd.targets.run_reader import locate

    assert locate("goodfire/spd/ab12cd34").checkpoint is not None  # cached: no download
    assert asked == []


def test_sequences_longer_than_block_size_are_refused_before_the_forward(tmp_path: Path) -> None:
    from spd_host.data import check_seq_len
    from spd_host.errors import DatasetError

    _, spd = _error_run(tmp_path, "llama_simple")
    model = _load(spd)
    check_seq_len(32, model)  # block_size (n_ctx is 8: later positions reuse the last angle)
    with pytest.raises(DatasetError, match="longer than the model's context of 32"):
        check_seq_len(33, model)
    with pytest.raises(ValueError, match="block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_wandb_configs_cached_but_checkpoint_needed_offline(tmp_path: Path) -> None:
    from spd_host.paths import cache_dir

    cached = cache_dir("wandb") / "goodfire__spd__ab12cd34"
    gp.write_pretrain_run(cached, gp.GPT2_SIMPLE, flat=True)
    for ckpt in cached.glob("model_step_*.pt"):
        ckpt.unlink()
    (cached / ".configs-complete").write_text("goodfire/spd/ab12cd34")
    spd = tmp_path / "spd"
    name = "wandb:goodfire/spd/runs/ab12cd34"
    _write_spd_run(spd, gp.GPT2_SIMPLE, name, {"h.0.mlp.c_fc": 3}, with_target=False)
    adapter = get_host().load_adapter(f"spd:{spd}")
    assert {s.name for s in adapter.sites} == {"0.mlp.up"}  # metadata needs no weights
    with pytest.raises(SourceNotFoundError, match="its checkpoint is not in the local cache"):
        adapter.load_base_model()


def test_param_decomp_jax_gpt2_simple_without_linear_biases(tmp_path: Path) -> None:
    """param-decomp's JAX GPT2Simple: no q/k/v/o/MLP biases, no lm_head, ``n_intermediate`` and
    ``layer_norm_eps`` in model_config.yaml; the missing biases are zero."""
    from safetensors.torch import save_file

    cfg = {**gp.GPT2_SIMPLE, "n_intermediate": 64, "layer_norm_eps": 1e-5}
    full = gp.goodfire_state_dict(gp.GPT2_SIMPLE, seed=4)
    target_sd = {
        k: v
        for k, v in full.items()
        if k != "lm_head.weight" and not (k.endswith(".bias") and (".attn." in k or ".mlp." in k))
    }
    assert "h.0.ln_1.bias" in target_sd and "h.0.attn.q_proj.bias" not in target_sd
    cache = tmp_path / "pretrain_cache" / "spd-ab12cd34"
    cache.mkdir(parents=True)
    (cache / "model_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    save_file(
        {k: v.contiguous() for k, v in target_sd.items()}, str(cache / "model_step_5.safetensors")
    )
    spd_sd = _write_spd_run(
        tmp_path / "spd", gp.GPT2_SIMPLE, str(cache), PATTERNS["GPT2Simple"], with_target=False
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'spd'}")
    _check_harvest(
        adapter, {**target_sd, "lm_head.weight": full["wte.weight"]}, spd_sd, gp.GPT2_SIMPLE
    )
    partial = {**target_sd, "h.0.attn.q_proj.bias": torch.zeros(16)}
    save_file(
        {k: v.contiguous() for k, v in partial.items()}, str(cache / "model_step_6.safetensors")
    )
    with pytest.raises(FormatError, match=r"missing \['h\.0\.attn\.k_proj\.bias'"):
        _load(tmp_path / "spd")


@pytest.mark.parametrize(
    ("fn_type", "patterns"),
    [
        ("shared_mlp", {"h.*.mlp.c_fc": 4, "h.1.attn.v_proj": 3}),
        ("vector_mlp", {"h.0.mlp.down_proj": 4}),
        ("global_shared_mlp", {"h.*.mlp.c_fc": 4, "wte": 3, "h.1.attn.o_proj": 2}),
    ],
)
def test_other_ci_functions_over_a_goodfire_target(
    tmp_path: Path, fn_type: str, patterns: dict[str, int]
) -> None:
    ckpt, target_sd = _pretrain(tmp_path, "llama_simple_mlp")
    cfg = VARIANTS["llama_simple_mlp"]
    spd_sd = _write_spd_run(tmp_path / "spd", cfg, str(ckpt), patterns, fn_type=fn_type, hidden=[5])
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'spd'}")
    _check_harvest(adapter, target_sd, spd_sd, cfg, fn_type)


def test_transformer_ci_over_a_goodfire_target(tmp_path: Path) -> None:
    """The dev branch's ``global_shared_transformer`` CI (an embedding site included)."""
    from tests.spd.test_spd_ci_sequence import shared_transformer

    ckpt, target_sd = _pretrain(tmp_path, "gpt2_simple")
    cfg = VARIANTS["gpt2_simple"]
    patterns = {"h.*.mlp.down_proj": 4, "wte": 3, "h.0.attn.q_proj": 2}
    ci = shared_transformer(8, 1, [12], 2, 10000.0)
    spd_sd = _write_spd_run(
        tmp_path / "spd", cfg, str(ckpt), patterns, fn_type=ci["fn_type"], hidden=[], ci_config=ci
    )
    adapter = get_host().load_adapter(f"spd:{tmp_path / 'spd'}")
    tokens = _tokens()
    batch = get_host().harvest_fn(adapter, HarvestOptions(threshold=0.0))(tokens)
    logits_ref, inputs = gp.reference_forward(target_sd, cfg, tokens)
    torch.testing.assert_close(batch.next_token_logits, logits_ref, atol=1e-5, rtol=1e-5)
    names = adapter.site_names_by_path()
    acts = {
        p: ref.component_acts(spd_sd, p, inputs[p], True) if p == "wte" else inputs[p]
        for p in names
    }
    sizes = {p: C for p, C in expand_paths(names, patterns).items()}
    z = ref.pre_sigmoid_shared_transformer(spd_sd, acts, sizes, ci["simple_transformer_ci_cfg"])
    inside = 0
    for path, site in names.items():
        expected = ref.sigmoid("leaky_hard", z[path])
        torch.testing.assert_close(
            batch.activations[site]["causal_importance"], expected, atol=1e-5, rtol=1e-5
        )
        inside += int(((expected > 0.02) & (expected < 0.98)).sum())
    assert inside > 0, "test weights must put some CIs strictly inside (0, 1)"


def expand_paths(paths: Any, patterns: dict[str, int]) -> dict[str, int]:
    import fnmatch

    return {p: next(c for pat, c in patterns.items() if fnmatch.fnmatch(p, pat)) for p in paths}
