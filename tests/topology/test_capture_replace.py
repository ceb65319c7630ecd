"""Capture and replacement on every architecture, against the model's own outputs and hand recomputation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from spd_host.errors import TopologyError
from spd_host.topology import TransformerTopology, topology_of
from tests.topology.conftest import build_model


def _block_module(topo: TransformerTopology, i: int, rel: str) -> torch.nn.Module:
    return topo.model.get_submodule(f"{topo.block_path(i)}.{rel}")


def _activation(mlp: torch.nn.Module) -> torch.nn.Module:
    for name in ("act_fn", "act", "activation_fn"):
        if hasattr(mlp, name):
            return getattr(mlp, name)
    raise AssertionError(f"no activation on {type(mlp).__name__}")


def _mlp_by_hand(topo: TransformerTopology, i: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(hidden, output) of block i's MLP recomputed from its projections and activation."""
    act = _activation(_block_module(topo, i, topo.spec.mlp))
    kind = topo.spec.mlp_kind

    def lin(role: str, v: Tensor) -> Tensor:
        return topo.module(f"{i}.{kind}.{role}")(v)

    if kind == "mlp":
        hidden = act(lin("up", x))
    elif kind == "glu":
        hidden = act(lin("gate", x)) * lin("up", x)
    else:
        gate, up = lin("gate_up", x).chunk(2, dim=-1)  # Phi-3 stores gate first, then up
        hidden = up * act(gate)
    return hidden, lin("down", hidden)


def _branch(topo: TransformerTopology, i: int, acts: dict[str, Tensor], which: str) -> Tensor:
    """What the attention/MLP branch adds to the residual stream (post-norm applied if any)."""
    if f"{i}.{which}_out_normed" in acts:
        return acts[f"{i}.{which}_out_normed"]
    return acts[f"{i}.{which}_out"]


def test_resid_pre_matches_hidden_states(model: torch.nn.Module, tokens: Tensor) -> None:
    topo = topology_of(model)
    hooks = [f"{i}.resid_pre" for i in range(topo.n_layers)] + [
        f"{i}.resid_post" for i in range(topo.n_layers)
    ]
    with torch.no_grad(), topo.capture([*hooks, "unembed_in", "embed"]) as acts:
        out = model(tokens, output_hidden_states=True)
    hs = out.hidden_states
    assert len(hs) == topo.n_layers + 1
    for i in range(topo.n_layers):
        assert torch.equal(acts[f"{i}.resid_pre"], hs[i]), i
        assert acts[f"{i}.resid_pre"].shape == (*tokens.shape, 32)
    for i in range(topo.n_layers - 1):
        assert torch.equal(acts[f"{i}.resid_post"], acts[f"{i + 1}.resid_pre"])
    # HF's last hidden state is after the final norm: resid_post of the last block, normed
    final_norm = topo.model.get_submodule(topo.layout.final_norm or "")
    last = acts[f"{topo.n_layers - 1}.resid_post"]
    torch.testing.assert_close(final_norm(last), hs[-1])
    torch.testing.assert_close(acts["unembed_in"], hs[-1])
    logits = model.get_output_embeddings()(acts["unembed_in"])
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2/3 soft-cap the logits
    if cap:
        logits = torch.tanh(logits / cap) * cap
    torch.testing.assert_close(logits, out.logits)
    # the embedding hook is the token embedding module's output
    torch.testing.assert_close(acts["embed"], model.get_input_embeddings()(tokens))


def test_block_internals_recomputed_by_hand(model: torch.nn.Module, tokens: Tensor) -> None:
    topo = topology_of(model)
    with torch.no_grad(), topo.capture(topo.hook_points()) as acts:
        model(tokens)
        for i in range(topo.n_layers):
            norms = topo.spec.norms
            # attention input = pre-attention norm of the block input (OLMo 2 has none)
            attn_in_ref = acts[f"{i}.resid_pre"]
            if "attn_pre" in norms:
                attn_in_ref = _block_module(topo, i, norms["attn_pre"])(attn_in_ref)
            torch.testing.assert_close(acts[f"{i}.attn_in"], attn_in_ref)
            if "attn_post" in norms:
                torch.testing.assert_close(
                    acts[f"{i}.attn_out_normed"],
                    _block_module(topo, i, norms["attn_post"])(acts[f"{i}.attn_out"]),
                )
            # the MLP reads resid_mid (sequential) or the block input (parallel)
            mlp_source = acts[f"{i}.resid_pre"] if topo.parallel else acts[f"{i}.resid_mid"]
            if not topo.parallel:
                torch.testing.assert_close(
                    acts[f"{i}.resid_mid"], acts[f"{i}.resid_pre"] + _branch(topo, i, acts, "attn")
                )
            mlp_in_ref = mlp_source
            if "mlp_pre" in norms:
                mlp_in_ref = _block_module(topo, i, norms["mlp_pre"])(mlp_source)
            torch.testing.assert_close(acts[f"{i}.mlp_in"], mlp_in_ref)
            hidden, out = _mlp_by_hand(topo, i, acts[f"{i}.mlp_in"])
            torch.testing.assert_close(acts[f"{i}.mlp_hidden"], hidden)
            torch.testing.assert_close(acts[f"{i}.mlp_out"], out)
            if "mlp_post" in norms:
                torch.testing.assert_close(
                    acts[f"{i}.mlp_out_normed"],
                    _block_module(topo, i, norms["mlp_post"])(acts[f"{i}.mlp_out"]),
                )
            if topo.parallel:
                expected_post = (
                    acts[f"{i}.resid_pre"] + acts[f"{i}.attn_out"] + acts[f"{i}.mlp_out"]
                )
            else:
                expected_post = acts[f"{i}.resid_mid"] + _branch(topo, i, acts, "mlp")
            torch.testing.assert_close(acts[f"{i}.resid_post"], expected_post)


def test_identity_replacement_leaves_logits_unchanged(
    model: torch.nn.Module, tokens: Tensor
) -> None:
    topo = topology_of(model)
    with torch.no_grad():
        base = model(tokens).logits
        seen: list[str] = []

        def ident(name: str):  # type: ignore[no-untyped-def]
            def fn(x: Tensor) -> Tensor:
                seen.append(name)
                return x

            return fn

        points = [
            h for h in topo.hook_points() if h != "0.resid_mid"
        ]  # resid_mid: float-exact only up to rounding
        with topo.replace({h: ident(h) for h in points}):
            out = model(tokens).logits
    assert torch.equal(out, base)
    assert sorted(seen) == sorted(points)  # every replacement ran exactly once


def test_zero_mlp_out_equals_zeroed_mlp_weights(arch: str, tokens: Tensor) -> None:
    model = build_model(arch)
    topo = topology_of(model)
    zeroed = copy.deepcopy(model)
    ztopo = topology_of(zeroed)
    down = ztopo.module(f"1.{ztopo.spec.mlp_kind}.down")
    with torch.no_grad():
        down.weight.zero_()
        if getattr(down, "bias", None) is not None:
            down.bias.zero_()
        reference = zeroed(tokens).logits
        base = model(tokens).logits
        with topo.replace({"1.mlp_out": torch.zeros_like}):
            replaced = model(tokens).logits
    torch.testing.assert_close(replaced, reference)
    assert not torch.allclose(replaced, base)


def test_resid_mid_replacement_flows_downstream(arch: str, tokens: Tensor) -> None:
    model = build_model(arch)
    topo = topology_of(model)
    if topo.parallel:
        with pytest.raises(TopologyError, match="parallel"):
            topo.replace({"0.resid_mid": lambda x: x})
        return
    with torch.no_grad():
        with topo.capture(["0.resid_mid"]) as before:
            model(tokens)
        with (
            topo.replace({"0.resid_mid": lambda x: 2 * x}),
            topo.capture(topo.hook_points()) as acts,
        ):
            model(tokens)
    torch.testing.assert_close(acts["0.resid_mid"], 2 * before["0.resid_mid"])
    # the MLP and the residual add both saw the replacement
    mlp_in_ref = acts["0.resid_mid"]
    if "mlp_pre" in topo.spec.norms:
        mlp_in_ref = _block_module(topo, 0, topo.spec.norms["mlp_pre"])(mlp_in_ref)
    torch.testing.assert_close(acts["0.mlp_in"], mlp_in_ref)
    torch.testing.assert_close(
        acts["0.resid_post"], acts["0.resid_mid"] + _branch(topo, 0, acts, "mlp")
    )


def test_capture_feeds_a_later_replacement_in_the_same_forward(tokens: Tensor) -> None:
    model = build_model("llama")
    topo = topology_of(model)
    acts: dict[str, Tensor]
    # the replacement fn reads a capture made earlier in the same forward
    with (
        torch.no_grad(),
        topo.capture(["0.mlp_in", "1.mlp_in"]) as acts,
        topo.replace({"1.mlp_in": lambda x: acts["0.mlp_in"]}),
    ):
        model(tokens)
    assert torch.equal(acts["1.mlp_in"], acts["0.mlp_in"])


def test_capture_records_replaced_tensor_whatever_the_nesting_order(tokens: Tensor) -> None:
    model = build_model("gpt2")
    topo = topology_of(model)
    with torch.no_grad():
        with topo.capture(["0.mlp_out"]) as outer, topo.replace({"0.mlp_out": torch.zeros_like}):
            model(tokens)
        with topo.replace({"0.mlp_out": torch.zeros_like}), topo.capture(["0.mlp_out"]) as inner:
            model(tokens)
    assert torch.count_nonzero(outer["0.mlp_out"]) == 0
    assert torch.count_nonzero(inner["0.mlp_out"]) == 0


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_when_forward_raises(tokens: Tensor) -> None:
    model = build_model("qwen2")
    topo = topology_of(model)
    before = _hook_count(model)
    with torch.no_grad():
        base = model(tokens).logits

        def boom(x: Tensor) -> Tensor:
            raise RuntimeError("boom")

        with (
            pytest.raises(RuntimeError, match="boom"),
            topo.capture(topo.hook_points()),
            topo.replace({"1.mlp_in": boom}),
        ):
            model(tokens)
        assert _hook_count(model) == before
        with (
            pytest.raises(TopologyError, match="shape"),
            topo.replace({"0.mlp_out": lambda x: x[:, :1]}),
        ):
            model(tokens)
        assert _hook_count(model) == before
        assert torch.equal(model(tokens).logits, base)


def test_capture_and_replace_reject_unknown_hook_points() -> None:
    model = build_model("llama")
    topo = topology_of(model)
    before = _hook_count(model)
    with pytest.raises(TopologyError, match="not a canonical hook point"):
        topo.capture(["0.resid_mid", "0.bogus"])
    with pytest.raises(TopologyError, match="block 5 does not exist"):
        topo.replace({"5.mlp_out": lambda x: x})
    with pytest.raises(TopologyError, match="mlp_out_normed"):
        topo.capture(["0.mlp_out_normed"])
    with pytest.raises(TopologyError, match="list of hook points"):
        topo.capture("0.mlp_in")  # type: ignore[arg-type]
    assert _hook_count(model) == before
