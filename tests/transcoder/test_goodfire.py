"""Goodfire's transcoder checkpoints (nn_decompositions config.json + encoder.pt) through a
TranscoderHarvestConfig YAML: encode / reconstruct / splice against formulas written in
tests/transcoder/goodfire_files.py, BatchTopK's batch dependence, wandb artifacts from the
cache, `spd-host info`, and the errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from spd_adapters.transcoder.goodfire import artifact_cache_dir
from spd_host.cli.app import app
from spd_host.errors import FormatError, SourceNotFoundError
from spd_host.plugins import get_host
from tests.transcoder.goodfire_files import (
    transcoder_reference,
    write_harvest_config,
    write_transcoder,
)

TOL = 1e-5


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def load(path: Path):
    return get_host().load_adapter(f"transcoder:{path}")


@pytest.mark.parametrize(
    ("encoder_type", "extra"),
    [
        ("batchtopk", {}),
        ("batchtopk", {"pre_enc_bias": True}),
        ("topk", {}),
        ("vanilla", {}),
        ("jumprelu", {}),
        ("batchtopk", {"input_unit_norm": True}),
    ],
)
def test_encode_and_reconstruct_match_the_formulas(
    tmp_path: Path, gen: torch.Generator, encoder_type: str, extra: dict
) -> None:
    sds = {
        i: write_transcoder(tmp_path / f"L{i}", gen=gen, encoder_type=encoder_type, **extra)
        for i in range(2)
    }
    cfg = write_harvest_config(
        tmp_path / "tc.yaml", "demo", {f"h.{i}.mlp": f"L{i}" for i in range(2)}
    )
    adapter = load(cfg)
    x = torch.randn(3, 5, 8, generator=gen)
    target = torch.randn(3, 5, 8, generator=gen)
    for i in range(2):
        acts_ref, out_ref = transcoder_reference(
            sds[i], x.reshape(-1, 8), encoder_type=encoder_type, k=4,
            target=target.reshape(-1, 8), **extra,
        )  # fmt: skip
        acts = adapter.encode(f"layer_{i}", x)
        assert acts.shape == (3, 5, 32)
        assert torch.allclose(acts.reshape(-1, 32).double(), acts_ref, atol=TOL)
        out = adapter.reconstruct(f"layer_{i}", x, target)
        assert torch.allclose(out.reshape(-1, 8).double(), out_ref, atol=TOL)
        if encoder_type == "batchtopk":
            assert int((acts > 0).sum()) == 4 * 15  # k per token on average, over the batch
    if extra.get("input_unit_norm"):
        with pytest.raises(ValueError, match="target"):
            adapter.reconstruct("layer_0", x)


def test_batch_topk_depends_on_the_batch_and_topk_does_not(
    tmp_path: Path, gen: torch.Generator
) -> None:
    sd = write_transcoder(tmp_path / "L0", gen=gen, top_k=3)
    adapter = load(write_harvest_config(tmp_path / "tc.yaml", "demo", {"h.0.mlp": "L0"}))
    token = torch.randn(1, 8, generator=gen)
    quiet = torch.randn(7, 8, generator=gen) * 0.1  # small inputs: the token wins more slots
    loud = torch.randn(7, 8, generator=gen) * 10.0  # large inputs: they take the slots
    a = adapter.encode("layer_0", torch.cat([token, quiet]))[0]
    b = adapter.encode("layer_0", torch.cat([token, loud]))[0]
    assert not torch.allclose(a, b)
    for batch, got in ((quiet, a), (loud, b)):
        ref, _ = transcoder_reference(sd, torch.cat([token, batch]), encoder_type="batchtopk", k=3)
        assert torch.allclose(got.double(), ref[0], atol=TOL)

    per_token = adapter.with_inference("topk")
    a = per_token.encode("layer_0", torch.cat([token, quiet]))[0]
    b = per_token.encode("layer_0", torch.cat([token, loud]))[0]
    assert torch.equal(a, b) and int((a > 0).sum()) <= 3
    ref, _ = transcoder_reference(sd, token, encoder_type="batchtopk", k=3, mode="topk")
    assert torch.allclose(a.double(), ref[0], atol=TOL)
    assert per_token.defaults.extra["inference"] == "topk"
    assert "batch_dependent" not in per_token.defaults.extra


def test_inference_option_in_the_yaml(tmp_path: Path, gen: torch.Generator) -> None:
    write_transcoder(tmp_path / "L0", gen=gen)
    cfg = write_harvest_config(tmp_path / "tc.yaml", "demo", {"h.0.mlp": "L0"}, inference="topk")
    adapter = load(cfg)
    acts = adapter.encode("layer_0", torch.randn(6, 8, generator=gen))
    assert ((acts > 0).sum(-1) <= 4).all()
    assert adapter.defaults.extra["inference"] == "topk"
    bad = write_harvest_config(
        tmp_path / "b.yaml", "demo", {"h.0.mlp": "L0"}, inference="threshold"
    )
    with pytest.raises(FormatError, match=r"b\.yaml: inference"):
        load(bad)
    write_transcoder(tmp_path / "T", gen=gen, encoder_type="topk")
    other = write_harvest_config(tmp_path / "t.yaml", "demo", {"h.0.mlp": "T"}, inference="topk")
    with pytest.raises(FormatError, match="applies to batchtopk checkpoints"):
        load(other)


def test_info_lists_sites_and_records_the_batch_semantics(
    tmp_path: Path, gen: torch.Generator
) -> None:
    for i in range(3):  # e2e runs add fields EncoderConfig lacks; Goodfire strips them
        write_transcoder(
            tmp_path / f"L{i}", gen=gen, batch_size=2048, e2e=True, e2e_cascading=False
        )
    cfg = write_harvest_config(
        tmp_path / "tc.yaml", "demo", {f"h.{i}.mlp": f"L{i}" for i in range(3)}
    )
    result = CliRunner().invoke(app, ["info", f"transcoder:{cfg}", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["base_model"] == "demo"
    assert [s["name"] for s in doc["sites"]] == ["layer_0", "layer_1", "layer_2"]
    assert [s["reads_from"] for s in doc["sites"]] == ["0.mlp_in", "1.mlp_in", "2.mlp_in"]
    assert [s["writes_to"] for s in doc["sites"]] == [["0.mlp_out"], ["1.mlp_out"], ["2.mlp_out"]]
    assert all(s["n_components"] == 32 for s in doc["sites"])
    assert "BatchTopK" in doc["sites"][0]["description"]
    extra = doc["defaults"]["extra"]
    assert extra["format"] == "goodfire" and extra["encoder_type"] == "batchtopk"
    assert extra["inference"] == "batch_topk" and extra["batch_dependent"] is True
    assert extra["top_k"] == 4 and extra["train_batch_tokens"] == 2048


def test_nested_method_config_and_json_files(tmp_path: Path, gen: torch.Generator) -> None:
    write_transcoder(tmp_path / "L1", gen=gen)
    doc = {
        "batch_size": 32,
        "method_config": {
            "type": "TranscoderHarvestConfig",
            "base_model_path": "demo",
            "artifact_paths": {"h.1.mlp": str(tmp_path / "L1")},
        },
    }
    (tmp_path / "harvest.json").write_text(json.dumps(doc))
    adapter = load(tmp_path / "harvest.json")
    assert [s.name for s in adapter.sites] == ["layer_1"]


def test_wandb_artifacts_come_from_the_cache_offline(tmp_path: Path, gen: torch.Generator) -> None:
    name = (
        "mats-sprint/pile_transcoder_sweep3/4096_batchtopk_k4_0.0003_L0_5d5b1f_checkpoint_final:v0"
    )
    cached = artifact_cache_dir(name)
    sd = write_transcoder(cached, gen=gen)
    (cached / ".complete").write_text(name)
    adapter = load(write_harvest_config(tmp_path / "tc.yaml", "demo", {"h.0.mlp": name}))
    x = torch.randn(4, 8, generator=gen)
    ref, _ = transcoder_reference(sd, x, encoder_type="batchtopk", k=4)
    assert torch.allclose(adapter.encode("layer_0", x).double(), ref, atol=TOL)

    missing = write_harvest_config(tmp_path / "m.yaml", "demo", {"h.0.mlp": "e/p/nothing:v0"})
    with pytest.raises(SourceNotFoundError, match="e/p/nothing:v0"):
        load(missing)


def test_splice_matches_hand_applied_hooks(tmp_path: Path, gen: torch.Generator) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_embd=8, n_head=2, n_layer=2, vocab_size=40, n_positions=16)
    )
    model.eval()
    sds = {
        i: write_transcoder(tmp_path / f"L{i}", gen=gen, input_unit_norm=i == 1) for i in range(2)
    }
    adapter = load(
        write_harvest_config(
            tmp_path / "tc.yaml", "demo", {f"h.{i}.mlp": f"L{i}" for i in range(2)}
        )
    )
    tokens = torch.randint(0, 40, (3, 6), generator=gen)

    def replace(i: int):
        def hook(_m, args, out):
            x = args[0].reshape(-1, 8)
            _, y = transcoder_reference(
                sds[i], x, encoder_type="batchtopk", k=4, input_unit_norm=i == 1,
                target=out.reshape(-1, 8),
            )  # fmt: skip
            return y.float().reshape(out.shape)

        return hook

    hs = [model.transformer.h[i].mlp.register_forward_hook(replace(i)) for i in range(2)]
    with torch.no_grad():
        expected = model(tokens).logits
    for h in hs:
        h.remove()
    with torch.no_grad(), adapter.splice(model):
        got = model(tokens).logits
        clean = model.transformer.wte.weight.clone()
    assert torch.allclose(got, expected, atol=TOL)
    with torch.no_grad():
        assert not torch.allclose(model(tokens).logits, got)
    assert torch.equal(clean, model.transformer.wte.weight)


# ----------------------------------------------------------------------------- errors


def test_missing_tensor_names_file_and_tensor(tmp_path: Path, gen: torch.Generator) -> None:
    sd = write_transcoder(tmp_path / "L0", gen=gen)
    del sd["W_dec"]
    torch.save(sd, tmp_path / "L0" / "encoder.pt")
    with pytest.raises(FormatError, match=r"L0/encoder\.pt: missing tensor 'W_dec'"):
        load(write_harvest_config(tmp_path / "tc.yaml", "demo", {"h.0.mlp": "L0"}))


def test_wrong_shape_names_file_and_tensor(tmp_path: Path, gen: torch.Generator) -> None:
    sd = write_transcoder(tmp_path / "L0", gen=gen)
    sd["W_enc"] = sd["W_enc"].T.contiguous()  # circuit-tracer orientation: wrong here
    torch.save(sd, tmp_path / "L0" / "encoder.pt")
    with pytest.raises(
        FormatError, match=r"encoder\.pt: tensor 'W_enc' has shape \[32, 8\], expected \[8, 32\]"
    ):
        load(write_harvest_config(tmp_path / "tc.yaml", "demo", {"h.0.mlp": "L0"}))


def test_unknown_encoder_type_and_missing_config_key(tmp_path: Path, gen: torch.Generator) -> None:
    write_transcoder(tmp_path / "L0", gen=gen, encoder_type="gated")
    cfg = write_harvest_config(tmp_path / "tc.yaml", "demo", {"h.0.mlp": "L0"})
    with pytest.raises(FormatError, match=r"L0/config\.json: unknown encoder_type 'gated'"):
        load(cfg)
    raw = json.loads((tmp_path / "L0" / "config.json").read_text())
    raw["encoder_type"] = "batchtopk"
    del raw["dict_size"]
    (tmp_path / "L0" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(FormatError, match=r"config\.json: missing key 'dict_size'"):
        load(cfg)


def test_unexpected_tensor_for_encoder_type(tmp_path: Path, gen: torch.Generator) -> None:
    sd = write_transcoder(tmp_path / "L0", gen=gen, encoder_type="jumprelu")
    cfg_path = tmp_path / "L0" / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"jumprelu"', '"batchtopk"'))
    assert "jumprelu.log_threshold" in sd
    with pytest.raises(FormatError, match=r"unexpected tensor 'jumprelu\.log_threshold'"):
        load(write_harvest_config(tmp_path / "tc.yaml", "demo", {"h.0.mlp": "L0"}))


def test_pickled_objects_are_refused(tmp_path: Path, gen: torch.Generator) -> None:
    write_transcoder(tmp_path / "L0", gen=gen)
    (tmp_path / "L0" / "encoder.pt").write_bytes(pickle.dumps({"W_enc": object()}, protocol=2))
    with pytest.raises(FormatError, match=r"encoder\.pt: not a readable torch state dict"):
        load(write_harvest_config(tmp_path / "tc.yaml", "demo", {"h.0.mlp": "L0"}))


def test_bad_harvest_configs(tmp_path: Path, gen: torch.Generator) -> None:
    write_transcoder(tmp_path / "L0", gen=gen)
    with pytest.raises(FormatError, match="neither the layer it reads nor its base model"):
        load(tmp_path / "L0")
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        "type: TranscoderHarvestConfig\nbase_model: demo\nartifact_paths: {h.0.mlp: L0}\n"
    )
    with pytest.raises(FormatError, match=r"typo\.yaml: base_model_path: Field required"):
        load(typo)
    bad_module = write_harvest_config(tmp_path / "m.yaml", "demo", {"h.0.attn.q_proj": "L0"})
    with pytest.raises(FormatError, match=r"m\.yaml.*h\.0\.attn\.q_proj"):
        load(bad_module)
    clt = write_harvest_config(tmp_path / "c.yaml", "demo", "L0")
    with pytest.raises(FormatError, match="clt method"):
        load(clt)
    wandb_model = write_harvest_config(
        tmp_path / "w.yaml", "wandb:goodfire/spd/t-32d1bb3b", {"h.0.mlp": "L0"}
    )
    adapter = load(wandb_model)  # a Goodfire pretrain run: read from the wandb cache
    with pytest.raises(SourceNotFoundError, match=r"t-32d1bb3b.*not in the local cache"):
        adapter.load_base_model()
