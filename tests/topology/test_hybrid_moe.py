"""A hybrid-mixer MoE architecture (transformers' Qwen3.5-MoE) through a plugin-registered spec
with ``attn_variants`` and no MLP projections: per-block mixer addresses, hook points that
exist (``attn_in/attn_out`` on both mixers, ``mlp_in/mlp_out``) and a clear reason for the one
that does not (``mlp_hidden``)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from spd_adapters.spd.param_decomp.topology_spec import QWEN3_5_MOE  # noqa: E402
from spd_host.errors import TopologyError  # noqa: E402
from spd_host.topology import ArchitectureSpec, MixerVariant, topology_of  # noqa: E402


def _tiny() -> torch.nn.Module:
    cfg = transformers.Qwen3_5MoeTextConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, linear_num_key_heads=2, linear_key_head_dim=4,
        linear_num_value_heads=2, linear_value_head_dim=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, shared_expert_intermediate_size=8, full_attention_interval=2,
    )  # fmt: skip
    return transformers.Qwen3_5MoeForCausalLM(cfg).eval()


def test_hybrid_blocks_get_their_own_mixer_addresses_and_hooks() -> None:
    model = _tiny()
    topo = topology_of(model)  # the plugin's spec is registered through register_architectures
    assert topo.spec.name == "qwen3_5_moe" and topo.n_layers == 4
    assert topo.module_path("0.attn_fused.qkv") == "model.layers.0.linear_attn.in_proj_qkv"
    assert topo.module_path("0.attn_fused.o") == "model.layers.0.linear_attn.out_proj"
    assert topo.module_path("1.attn.q") == "model.layers.1.self_attn.q_proj"
    assert not any(a.startswith("1.attn_fused") or ".glu." in a for a in topo.addresses())
    assert topo.site("0.attn_out").module_path == "model.layers.0.linear_attn"
    assert topo.site("1.attn_out").module_path == "model.layers.1.self_attn"
    with pytest.raises(TopologyError, match="mixture of experts with no single down-projection"):
        topo.site("0.mlp_hidden")
    tokens = torch.randint(0, 64, (1, 5))
    points = ["0.attn_out", "1.resid_pre", "1.attn_out", "1.resid_mid", "1.mlp_out", "1.resid_post"]
    with topo.capture(points) as acts:
        model(tokens)
    # the residual stream adds each sublayer's output (the hook points name the right tensors)
    torch.testing.assert_close(acts["1.resid_mid"], acts["1.resid_pre"] + acts["1.attn_out"])
    torch.testing.assert_close(acts["1.resid_post"], acts["1.resid_mid"] + acts["1.mlp_out"])
    assert acts["1.mlp_out"].shape == (1, 5, 16) and acts["0.attn_out"].shape == (1, 5, 16)


def test_moe_spec_does_not_claim_dense_models() -> None:
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    llama = transformers.LlamaForCausalLM(cfg)
    assert topology_of(llama).spec.name == "llama"
    with pytest.raises(TopologyError, match="qwen3_5_moe: the spec's own structural test"):
        topology_of(llama, specs=[QWEN3_5_MOE])


def test_variant_roles_are_validated() -> None:
    with pytest.raises(TopologyError, match="attn_proj roles"):
        ArchitectureSpec(
            name="bad", blocks=("h",), attn="a", mlp="m",
            attn_proj={"q": "q", "k": "k", "v": "v", "o": "o"}, mlp_proj={},
            attn_variants=(MixerVariant("b", {"x": "x"}),),
        )  # fmt: skip
