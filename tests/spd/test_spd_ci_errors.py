"""Bad runs with sequence-level CI functions, identity modules or base weights: clear errors that
name the real cause and the file it is in (config mistakes: final_config.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from spd_host.errors import FormatError
from spd_host.plugins import get_host
from tests.spd.run_writer import tiny_llama, write_run
from tests.spd.test_spd_ci_sequence import LLAMA, write_case


def _edit_ci(run: Path, **changes: Any) -> None:
    path = run / "final_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["ci_config"].update(changes)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def _edit_sd(run: Path, fn: Any) -> None:
    path = run / "model_200.pth"
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def _load_full(run: Path) -> None:
    host = get_host()
    host.harvest_fn(host.load_adapter(f"spd:{run}"))


def test_missing_rope_buffer(tmp_path: Path) -> None:
    run, *_ = write_case(tmp_path, "gpt2-transformer")
    _edit_sd(run, lambda sd: sd.pop("ci_fn._global_ci_fn._blocks.1.attn.rope.inv_freq"))
    with pytest.raises(
        FormatError,
        match=r"model_200\.pth: missing tensor ci_fn\._global_ci_fn\._blocks\.1\.attn\.rope\.inv_freq",
    ):
        _load_full(run)


def test_missing_transition_tensor(tmp_path: Path) -> None:
    run, *_ = write_case(tmp_path, "llama-reverse-attn")
    _edit_sd(run, lambda sd: sd.pop("ci_fn._global_ci_fn._attn_norms.layer-1.weight"))
    with pytest.raises(
        FormatError, match=r"missing tensor ci_fn\._global_ci_fn\._attn_norms\.layer-1\.weight"
    ):
        _load_full(run)


def test_ci_shape_disagrees_with_config(tmp_path: Path) -> None:
    run, _, _, _, _, ci, _ = write_case(tmp_path, "gpt2-transformer")
    st = dict(ci["simple_transformer_ci_cfg"], d_model=12)
    _edit_ci(run, simple_transformer_ci_cfg=st)
    with pytest.raises(
        FormatError,
        match=r"model_200\.pth: tensor ci_fn\._global_ci_fn\._input_projector\.W has shape \[\d+, 8\], "
        r"but final_config\.yaml's ci_config and module_info imply \[\d+, 12\]",
    ):
        _load_full(run)


def test_transition_kind_disagrees_with_config(tmp_path: Path) -> None:
    """transition_hidden_dim null in the config but a two-layer transition in the checkpoint."""
    run, *_ = write_case(tmp_path, "llama-reverse-attn")
    _edit_ci(run, transition_hidden_dim=None)
    with pytest.raises(
        FormatError, match=r"missing tensor ci_fn\._global_ci_fn\._transitions\.layer-1\.W"
    ):
        _load_full(run)


def test_unexpected_ci_tensor(tmp_path: Path) -> None:
    run, *_ = write_case(tmp_path, "gpt2-reverse-mlp")
    _edit_sd(
        run, lambda sd: sd.__setitem__("ci_fn._global_ci_fn._readers.embed.2.W", torch.zeros(1))
    )
    with pytest.raises(FormatError, match=r"unexpected tensors .*_readers\.embed\.2\.W"):
        _load_full(run)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (
            [("a", ["transformer.h.*"]), ("b", ["transformer.nothing.*"])],
            r"block_groups\['b'\] pattern 'transformer\.nothing\.\*' matches no decomposed module",
        ),
        ([("a", ["transformer.h.*"])], r"block_groups leave modules out: \['transformer\.wte'\]"),
        (
            [("a", ["transformer.h.*", "transformer.wte"]), ("b", ["transformer.h.1.*"])],
            r"is in two block groups \('a' and 'b'\)",
        ),
        (
            [("a", ["transformer.h.*", "transformer.h.1.*", "transformer.wte"])],
            r"matches two patterns of block 'a'",
        ),
    ],
)
def test_bad_block_groups_name_the_config(tmp_path: Path, groups: list, message: str) -> None:
    run, *_ = write_case(tmp_path, "gpt2-reverse-mlp")
    _edit_ci(run, block_groups=[{"name": n, "patterns": p} for n, p in groups])
    with pytest.raises(FormatError, match=message) as err:
        _load_full(run)
    assert str(err.value).startswith(str(run / "final_config.yaml"))


@pytest.mark.parametrize(
    ("case", "field", "message"),
    [
        ("gpt2-transformer", "simple_transformer_ci_cfg", "simple_transformer_ci_cfg is required"),
        ("gpt2-reverse-mlp", "d_resid_ci_fn", "d_resid_ci_fn is required"),
        ("gpt2-reverse-mlp", "reader_hidden_dims", "reader_hidden_dims is required"),
        ("gpt2-reverse-mlp", "block_groups", "block_groups needs at least one block"),
    ],
)
def test_missing_ci_field_names_the_config(
    tmp_path: Path, case: str, field: str, message: str
) -> None:
    run, *_ = write_case(tmp_path, case)
    _edit_ci(run, **{field: None})
    with pytest.raises(FormatError, match=message) as err:
        get_host().load_adapter(f"spd:{run}")
    assert str(err.value).startswith(str(run / "final_config.yaml"))


def test_odd_head_width_is_refused(tmp_path: Path) -> None:
    run, *_ = write_case(tmp_path, "llama-reverse-attn")
    _edit_ci(run, d_resid_ci_fn=6)
    with pytest.raises(
        FormatError, match=r"d_resid_ci_fn 6 must split into .* 2 heads of even width"
    ):
        get_host().load_adapter(f"spd:{run}")


def test_base_weight_of_the_wrong_shape(tmp_path: Path) -> None:
    run, *_ = write_case(tmp_path, "llama-transformer")
    key = "target_model.model.layers.0.mlp.up_proj.weight"
    _edit_sd(run, lambda sd: sd.__setitem__(key, torch.zeros(25, 16)))
    with pytest.raises(
        FormatError,
        match=r"model_200\.pth: tensor 'target_model\.model\.layers\.0\.mlp\.up_proj\.weight' has "
        r"shape \[25, 16\], expected \[24, 16\] from the config of",
    ):
        _load_full(run)


def test_module_pattern_matching_nothing_names_the_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(
        run,
        tiny_llama(),
        model_class=LLAMA,
        patterns={"model.layers.0.mlp.up_proj": 4},
        fn_type="shared_mlp",
        hidden=[2],
    )
    cfg = yaml.safe_load((run / "final_config.yaml").read_text())
    cfg["module_info"] = [{"module_pattern": "model.layers.*.mlp.c_fc", "C": 4}]
    (run / "final_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(FormatError, match="matches no module of the base model") as err:
        get_host().load_adapter(f"spd:{run}")
    assert str(err.value).startswith(str(run / "final_config.yaml"))


@pytest.mark.parametrize(
    ("identity", "message"),
    [
        (
            {"model.embed_tokens": 3},
            r"matches 'model\.embed_tokens' \(Embedding\); identities can only",
        ),
        ({"model.layers.*.mlp.nothing": 3}, r"identity_module_info pattern .* matches no module"),
    ],
)
def test_bad_identity_module_info(tmp_path: Path, identity: dict, message: str) -> None:
    run = tmp_path / "run"
    write_run(
        run,
        tiny_llama(),
        model_class=LLAMA,
        patterns={"model.layers.0.mlp.up_proj": 4},
        fn_type="shared_mlp",
        hidden=[2],
        identity=identity,
    )
    with pytest.raises(FormatError, match=message) as err:
        _load_full(run)
    assert str(err.value).startswith(str(run / "final_config.yaml"))
