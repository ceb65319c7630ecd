"""Goodfire's CLT checkpoints (nn_decompositions CrossLayerTranscoder: config.json with
``layers``, encoder.pt with ``W_enc.{p}`` / ``b_enc.{p}`` / ``W_dec.{p}`` / ``b_dec.{p}``):
loaded as a directory, through a CLTHarvestConfig YAML and as ``clt:wandb:...`` from the
artifact cache; encode / reconstruct / splice against the formulas in
tests/transcoder/goodfire_files.py; per-layer BatchTopK; errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from spd_adapters.transcoder.goodfire import artifact_cache_dir
from spd_host.cli.app import app
from spd_host.errors import FormatError
from spd_host.plugins import get_host
from tests.transcoder.goodfire_files import clt_reference, write_clt, write_harvest_config

TOL = 1e-5


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def load(ref: str):
    return get_host().load_adapter(f"clt:{ref}")


@pytest.mark.parametrize("encoder_type", ["batchtopk", "topk", "vanilla", "jumprelu"])
def test_encode_and_reconstruct_match_the_formulas(
    tmp_path: Path, gen: torch.Generator, encoder_type: str
) -> None:
    sd = write_clt(tmp_path / "ck", gen=gen, layers=[0, 1, 2], encoder_type=encoder_type)
    adapter = load(str(tmp_path / "ck"))
    xs = [torch.randn(2, 5, 8, generator=gen) for _ in range(3)]
    acts_ref, outs_ref = clt_reference(
        sd, [x.reshape(-1, 8) for x in xs], encoder_type=encoder_type, k=3
    )
    for p in range(3):
        acts = adapter.encode(f"layer_{p}", xs[p])
        assert acts.shape == (2, 5, 16)
        assert torch.allclose(acts.reshape(-1, 16).double(), acts_ref[p], atol=TOL)
        if encoder_type == "batchtopk":
            assert int((acts > 0).sum()) == 3 * 10  # per layer: k x tokens
    outs = adapter.reconstruct({f"layer_{p}": xs[p] for p in range(3)})
    assert sorted(outs) == ["layer_0", "layer_1", "layer_2"]
    for q in range(3):
        assert torch.allclose(outs[f"layer_{q}"].reshape(-1, 8).double(), outs_ref[q], atol=TOL)
    partial = adapter.reconstruct({"layer_0": xs[0], "layer_1": xs[1]})
    assert sorted(partial) == ["layer_0", "layer_1"]


def test_layers_not_starting_at_zero_key_by_position(tmp_path: Path, gen: torch.Generator) -> None:
    sd = write_clt(tmp_path / "ck", gen=gen, layers=[1, 3])
    adapter = load(str(tmp_path / "ck"))
    assert [s.name for s in adapter.sites] == ["layer_1", "layer_3"]
    assert adapter.sites[0].reads_from == "1.mlp_in"
    assert adapter.sites[0].writes_to == ("1.mlp_out", "3.mlp_out")
    assert adapter.sites[1].writes_to == ("3.mlp_out",)
    xs = [torch.randn(6, 8, generator=gen) for _ in range(2)]
    _, outs_ref = clt_reference(sd, xs, encoder_type="batchtopk", k=3)
    outs = adapter.reconstruct({"layer_1": xs[0], "layer_3": xs[1]})
    assert torch.allclose(outs["layer_3"].double(), outs_ref[1], atol=TOL)


def test_batch_dependence_and_per_token_inference(tmp_path: Path, gen: torch.Generator) -> None:
    sd = write_clt(tmp_path / "ck", gen=gen, layers=[0, 1])
    adapter = load(str(tmp_path / "ck"))
    token = torch.randn(1, 8, generator=gen)
    quiet, loud = torch.randn(5, 8, generator=gen) * 0.1, torch.randn(5, 8, generator=gen) * 10
    a = adapter.encode("layer_0", torch.cat([token, quiet]))[0]
    b = adapter.encode("layer_0", torch.cat([token, loud]))[0]
    assert not torch.allclose(a, b)
    per_token = adapter.with_inference("topk")
    a = per_token.encode("layer_0", torch.cat([token, quiet]))[0]
    b = per_token.encode("layer_0", torch.cat([token, loud]))[0]
    assert torch.equal(a, b)
    acts_ref, _ = clt_reference(sd, [token, token], encoder_type="batchtopk", k=3, mode="topk")
    assert torch.allclose(a.double(), acts_ref[0][0], atol=TOL)
    assert adapter.defaults.extra["batch_dependent"] is True
    assert per_token.defaults.extra["inference"] == "topk"


def test_harvest_config_yaml_and_info(tmp_path: Path, gen: torch.Generator) -> None:
    write_clt(tmp_path / "ck", gen=gen, layers=[0, 1, 2], batch_size=1024)
    cfg = write_harvest_config(tmp_path / "clt.yaml", "demo", "ck")
    result = CliRunner().invoke(app, ["info", f"clt:{cfg}", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["base_model"] == "demo"
    assert [s["name"] for s in doc["sites"]] == ["layer_0", "layer_1", "layer_2"]
    assert [s["reads_from"] for s in doc["sites"]] == ["0.mlp_in", "1.mlp_in", "2.mlp_in"]
    assert doc["sites"][0]["writes_to"] == ["0.mlp_out", "1.mlp_out", "2.mlp_out"]
    assert all(s["n_components"] == 16 for s in doc["sites"])
    extra = doc["defaults"]["extra"]
    assert extra["format"] == "goodfire" and extra["layers"] == [0, 1, 2]
    assert extra["inference"] == "batch_topk" and extra["train_batch_tokens"] == 1024
    # a bare directory loads too, without a base model
    bare = load(str(tmp_path / "ck"))
    assert bare.base_model_name == "unknown"
    with pytest.raises(FormatError, match="does not name its base model"):
        bare.load_base_model()


def test_wandb_id_from_the_artifact_cache(tmp_path: Path, gen: torch.Generator) -> None:
    name = "mats-sprint/pile_e2e_sweep_jose/clt_parallel_k32_checkpoint_final"
    cached = artifact_cache_dir(name)  # ":latest" when the ID names no version
    sd = write_clt(cached, gen=gen, layers=[0, 1])
    (cached / ".complete").write_text(name)
    adapter = load(f"wandb:{name}")
    assert adapter.decomposition_id == f"clt:wandb:{name}"
    x = torch.randn(4, 8, generator=gen)
    acts_ref, _ = clt_reference(sd, [x, x], encoder_type="batchtopk", k=3)
    assert torch.allclose(adapter.encode("layer_1", x).double(), acts_ref[1], atol=TOL)
    # a YAML can name the same artifact with its version
    versioned = artifact_cache_dir(name + ":v0")
    write_clt(versioned, gen=gen, layers=[0, 1])
    (versioned / ".complete").write_text(name)
    yaml_adapter = load(str(write_harvest_config(tmp_path / "c.yaml", "demo", name + ":v0")))
    assert yaml_adapter.layout.checkpoint == versioned


def test_splice_matches_hand_applied_hooks(tmp_path: Path, gen: torch.Generator) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_embd=8, n_head=2, n_layer=3, vocab_size=40, n_positions=16)
    )
    model.eval()
    sd = write_clt(tmp_path / "ck", gen=gen, layers=[0, 1, 2])
    adapter = load(str(tmp_path / "ck"))
    tokens = torch.randint(0, 40, (2, 6), generator=gen)
    inputs: dict[int, torch.Tensor] = {}

    def replace(q: int):
        def hook(_m, args, out):
            inputs[q] = args[0].reshape(-1, 8)
            xs = [inputs[p] for p in range(q + 1)] + [inputs[q]] * (2 - q)
            _, outs = clt_reference(sd, xs, encoder_type="batchtopk", k=3)
            return outs[q].float().reshape(out.shape)

        return hook

    hs = [model.transformer.h[q].mlp.register_forward_hook(replace(q)) for q in range(3)]
    with torch.no_grad():
        expected = model(tokens).logits
    for h in hs:
        h.remove()
    with torch.no_grad(), adapter.splice(model):
        got = model(tokens).logits
    assert torch.allclose(got, expected, atol=TOL)
    with torch.no_grad():
        assert not torch.allclose(model(tokens).logits, got)


# ----------------------------------------------------------------------------- errors


def test_missing_and_misshapen_tensors_name_file_and_tensor(
    tmp_path: Path, gen: torch.Generator
) -> None:
    sd = write_clt(tmp_path / "ck", gen=gen, layers=[0, 1])
    del sd["b_enc.1"]
    torch.save(sd, tmp_path / "ck" / "encoder.pt")
    with pytest.raises(FormatError, match=r"ck/encoder\.pt: missing tensor 'b_enc\.1'"):
        load(str(tmp_path / "ck"))
    sd = write_clt(tmp_path / "ck", gen=gen, layers=[0, 1])
    sd["W_dec.1"] = torch.zeros(2, 16, 8)  # should be [n - 1, dict, out] = [1, 16, 8]
    torch.save(sd, tmp_path / "ck" / "encoder.pt")
    with pytest.raises(
        FormatError, match=r"tensor 'W_dec\.1' has shape \[2, 16, 8\], expected \[1, 16, 8\]"
    ):
        load(str(tmp_path / "ck"))


def test_keys_by_layer_number_are_not_guessed(tmp_path: Path, gen: torch.Generator) -> None:
    sd = write_clt(tmp_path / "ck", gen=gen, layers=[2, 3])
    renamed = {k.replace(".0", ".2").replace(".1", ".3"): v for k, v in sd.items()}
    torch.save(renamed, tmp_path / "ck" / "encoder.pt")
    with pytest.raises(FormatError, match=r"missing tensor 'W_enc\.0'"):
        load(str(tmp_path / "ck"))


def test_unknown_encoder_type_and_bad_layers(tmp_path: Path, gen: torch.Generator) -> None:
    write_clt(tmp_path / "ck", gen=gen, layers=[0, 1], encoder_type="gated")
    with pytest.raises(FormatError, match=r"ck/config\.json: unknown encoder_type 'gated'"):
        load(str(tmp_path / "ck"))
    path = tmp_path / "ck" / "config.json"
    raw = json.loads(path.read_text())
    raw["encoder_type"], raw["layers"] = "batchtopk", "[0, 1"
    path.write_text(json.dumps(raw))
    with pytest.raises(FormatError, match=r"config\.json: layers"):
        load(str(tmp_path / "ck"))


def test_method_mixups_point_to_the_other_method(tmp_path: Path, gen: torch.Generator) -> None:
    write_clt(tmp_path / "ck", gen=gen, layers=[0, 1])
    with pytest.raises(FormatError, match="clt method"):
        get_host().load_adapter(f"transcoder:{tmp_path / 'ck'}")
    tc = write_harvest_config(tmp_path / "tc.yaml", "demo", {"h.0.mlp": "ck"})
    with pytest.raises(FormatError, match="transcoder method"):
        load(str(tc))


def test_uncached_wandb_name_offline_is_a_clear_error() -> None:
    from spd_host.errors import SourceNotFoundError

    with pytest.raises(SourceNotFoundError, match="neither a wandb artifact nor a wandb run"):
        load("wandb:ent/proj/clt_missing_checkpoint_final")
