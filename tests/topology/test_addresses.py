"""Detection, canonical addresses <-> module paths, descriptions and errors, per architecture."""

from __future__ import annotations

import pytest
import torch
import transformers

from spd_host.errors import TopologyError
from spd_host.topology import topology_of
from tests.topology.conftest import EXPECTED_SPEC, build_model

# Written out by hand from the HF modelling code: block 1's attention-output and MLP-down modules.
EXPECTED_PATHS = {
    "gpt2": {
        "1.attn_fused.qkv": "transformer.h.1.attn.c_attn",
        "1.attn_fused.o": "transformer.h.1.attn.c_proj",
        "1.mlp.up": "transformer.h.1.mlp.c_fc",
        "1.mlp.down": "transformer.h.1.mlp.c_proj",
        "embed": "transformer.wte",
        "output": "lm_head",
        "final_norm": "transformer.ln_f",
        "1.norm.mlp_pre": "transformer.h.1.ln_2",
    },
    "gpt_neox": {
        "1.attn_fused.qkv": "gpt_neox.layers.1.attention.query_key_value",
        "1.attn_fused.o": "gpt_neox.layers.1.attention.dense",
        "1.mlp.up": "gpt_neox.layers.1.mlp.dense_h_to_4h",
        "1.mlp.down": "gpt_neox.layers.1.mlp.dense_4h_to_h",
        "embed": "gpt_neox.embed_in",
        "1.norm.mlp_pre": "gpt_neox.layers.1.post_attention_layernorm",
    },
    "llama": {
        "1.attn.q": "model.layers.1.self_attn.q_proj",
        "1.attn.o": "model.layers.1.self_attn.o_proj",
        "1.glu.gate": "model.layers.1.mlp.gate_proj",
        "1.glu.down": "model.layers.1.mlp.down_proj",
        "embed": "model.embed_tokens",
        "output": "lm_head",
        "final_norm": "model.norm",
        "1.norm.attn_pre": "model.layers.1.input_layernorm",
        "1.norm.mlp_pre": "model.layers.1.post_attention_layernorm",
    },
    "gemma2": {
        "1.attn.k": "model.layers.1.self_attn.k_proj",
        "1.glu.up": "model.layers.1.mlp.up_proj",
        "1.norm.attn_post": "model.layers.1.post_attention_layernorm",
        "1.norm.mlp_pre": "model.layers.1.pre_feedforward_layernorm",
        "1.norm.mlp_post": "model.layers.1.post_feedforward_layernorm",
    },
    "phi3": {
        "1.attn_fused.qkv": "model.layers.1.self_attn.qkv_proj",
        "1.attn_fused.o": "model.layers.1.self_attn.o_proj",
        "1.glu_fused.gate_up": "model.layers.1.mlp.gate_up_proj",
        "1.glu_fused.down": "model.layers.1.mlp.down_proj",
    },
    "olmo2": {
        "1.attn.v": "model.layers.1.self_attn.v_proj",
        "1.glu.down": "model.layers.1.mlp.down_proj",
        "1.norm.attn_post": "model.layers.1.post_attention_layernorm",
        "1.norm.mlp_post": "model.layers.1.post_feedforward_layernorm",
    },
}
EXPECTED_KINDS = {
    "gpt2": ("attn_fused", "mlp"),
    "gpt_neox": ("attn_fused", "mlp"),
    "llama": ("attn", "glu"),
    "gemma2": ("attn", "glu"),
    "olmo2": ("attn", "glu"),
    "phi3": ("attn_fused", "glu_fused"),
}
EXPECTED_ROLES = {
    "attn": ["q", "k", "v", "o"], "attn_fused": ["qkv", "o"], "glu": ["gate", "up", "down"],
    "glu_fused": ["gate_up", "down"], "mlp": ["up", "down"],
}  # fmt: skip


def test_detection_and_address_set(arch: str, model: torch.nn.Module) -> None:
    topo = topology_of(model)
    spec = EXPECTED_SPEC[arch]
    assert topo.spec.name == spec
    assert topo.architecture == arch  # config.model_type
    assert topo.n_layers == 2
    assert topo.parallel == (arch == "gpt_neox")
    attn_kind, mlp_kind = EXPECTED_KINDS[spec]
    expected = ["embed", "output"] + [
        f"{i}.{kind}.{role}"
        for i in range(2)
        for kind in (attn_kind, mlp_kind)
        for role in EXPECTED_ROLES[kind]
    ]
    assert topo.addresses() == expected


def test_module_paths_by_hand(arch: str, model: torch.nn.Module) -> None:
    topo = topology_of(model)
    expected = EXPECTED_PATHS.get(arch, EXPECTED_PATHS.get(EXPECTED_SPEC[arch], {}))
    assert expected, arch
    for address, path in expected.items():
        assert topo.module_path(address) == path
        assert topo.address_of(path) == address
        assert topo.module(address) is model.get_submodule(path)


def test_round_trip_every_address(model: torch.nn.Module) -> None:
    topo = topology_of(model)
    all_addresses = topo.addresses(include_norms=True)
    paths = [topo.module_path(a) for a in all_addresses]
    assert len(set(paths)) == len(paths)  # no two addresses share a module
    for a, p in zip(all_addresses, paths, strict=True):
        assert topo.address_of(p) == a
        module = model.get_submodule(p)
        if ".norm." not in a and a != "final_norm":
            assert module.weight.dim() == 2  # type: ignore[union-attr]


def test_projection_shapes(model: torch.nn.Module) -> None:
    """The modules behind the addresses have the widths their roles imply (d_model 32, d_mlp 64/128)."""
    topo = topology_of(model)

    def out_in(address: str) -> tuple[int, int]:
        m = topo.module(address)
        if hasattr(m, "nf"):  # GPT-2 Conv1D stores weight as [in, out]
            return m.weight.shape[1], m.weight.shape[0]  # type: ignore[union-attr,return-value]
        return m.weight.shape[0], m.weight.shape[1]  # type: ignore[union-attr,return-value]

    kind = topo.spec.mlp_kind
    d_mlp_out, d_model = out_in(f"0.{kind}.{'gate_up' if kind == 'glu_fused' else 'up'}")
    assert d_model == 32
    down_out, down_in = out_in(f"0.{kind}.down")
    assert (down_out, down_in) == (32, d_mlp_out // (2 if kind == "glu_fused" else 1))
    assert out_in("embed")[1] == 32 or out_in("embed")[0] == 64


def test_describe() -> None:
    topo = topology_of(build_model("llama"))
    assert topo.describe("1.glu.down") == "MLP down-projection in block 1 of 2"
    assert topo.describe("0.attn.q") == "Attention query projection in block 0 of 2"
    assert topo.describe("0.resid_pre") == "Residual stream entering block 0 of 2"
    assert topo.describe("1.mlp_in") == "MLP input (after its layer norm) in block 1 of 2"
    assert topo.describe("embed") == "Token embedding"
    assert topo.describe("unembed_in") == "Input of the unembedding (after the final norm)"
    g = topology_of(build_model("gpt2"))
    assert (
        g.describe("0.attn_fused.qkv")
        == "Fused attention query/key/value projection in block 0 of 2"
    )
    with pytest.raises(TopologyError, match="does not exist"):
        topo.describe("0.mlp_out_normed")
    with pytest.raises(TopologyError, match="not a canonical module address"):
        topo.describe("nonsense")


def test_hook_point_sets() -> None:
    per_block = {
        "gpt2": ["resid_pre", "attn_in", "attn_out", "resid_mid", "mlp_in", "mlp_hidden", "mlp_out", "resid_post"],
        "gpt_neox": ["resid_pre", "attn_in", "attn_out", "mlp_in", "mlp_hidden", "mlp_out", "resid_post"],
        "gemma2": ["resid_pre", "attn_in", "attn_out", "attn_out_normed", "resid_mid", "mlp_in", "mlp_hidden",
                   "mlp_out", "mlp_out_normed", "resid_post"],
    }  # fmt: skip
    for arch, names in per_block.items():
        topo = topology_of(build_model(arch))
        assert topo.hook_points() == [
            "embed",
            *(f"{i}.{n}" for i in range(2) for n in names),
            "unembed_in",
        ]
    sequential = topology_of(build_model("gpt_neox", use_parallel_residual=False))
    assert "0.resid_mid" in sequential.hook_points()


def test_address_errors() -> None:
    gpt2 = topology_of(build_model("gpt2"))
    with pytest.raises(TopologyError, match=r"'0\.attn\.q' does not exist.*\n.*attn_fused\.qkv"):
        gpt2.module_path("0.attn.q")
    with pytest.raises(TopologyError, match="block 7 does not exist") as err:
        gpt2.module_path("7.mlp.up")
    assert "0..1" in str(err.value)
    with pytest.raises(TopologyError, match="not a canonical module address"):
        gpt2.module_path("mlp.up")
    with pytest.raises(TopologyError, match="no canonical address"):
        gpt2.address_of("transformer.h.0.attn")
    with pytest.raises(TopologyError, match="not a canonical hook point"):
        gpt2.site("0.hook_resid_pre")
    with pytest.raises(TopologyError, match="in parallel"):
        topology_of(build_model("gpt_neox")).site("1.resid_mid")


def test_unknown_architecture_errors() -> None:
    toy = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    with pytest.raises(TopologyError, match="cannot map Sequential") as err:
        topology_of(toy)
    assert "register_architectures" in str(err.value)
    assert "gpt2: no block list" in str(err.value)
    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=32,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    with pytest.raises(TopologyError, match="model_type='bert'"):
        topology_of(bert)


def test_bare_base_model_is_detected() -> None:
    """A backbone without its LM head (e.g. LlamaModel) still maps; it has no output/unembed_in."""
    topo = topology_of(build_model("llama").model)
    assert topo.module_path("0.glu.down") == "layers.0.mlp.down_proj"
    assert "output" not in topo.addresses()
    with pytest.raises(TopologyError, match="no LM head"):
        topo.site("unembed_in")
