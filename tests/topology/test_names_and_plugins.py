"""TransformerLens / module-path translation, and architectures taught by a plugin."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from spd_host.errors import TopologyError
from spd_host.hookspecs import hookimpl
from spd_host.plugins import temporary_plugins
from spd_host.topology import (
    ArchitectureSpec,
    hook_point_from_module_path,
    hook_point_from_transformerlens,
    topology_of,
)
from spd_host.topology.spec import GPT2
from tests.topology.conftest import build_model


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("blocks.5.hook_resid_pre", "5.resid_pre"),
        ("blocks.5.hook_resid_mid", "5.resid_mid"),
        ("blocks.5.hook_resid_post", "5.resid_post"),
        ("blocks.5.ln2.hook_normalized", "5.mlp_in"),
        ("blocks.5.ln1.hook_normalized", "5.attn_in"),
        ("blocks.5.hook_mlp_in", "5.resid_mid"),
        ("blocks.5.mlp.hook_post", "5.mlp_hidden"),
        ("blocks.5.hook_mlp_out", "5.mlp_out"),
        ("blocks.12.hook_attn_out", "12.attn_out"),
        ("hook_embed", "embed"),
        ("ln_final.hook_normalized", "unembed_in"),
    ],
)
def test_transformerlens_names(name: str, expected: str) -> None:
    assert hook_point_from_transformerlens(name) == expected


def test_transformerlens_post_norm_architectures() -> None:
    assert (
        hook_point_from_transformerlens("blocks.3.hook_mlp_out", architecture="gemma2")
        == "3.mlp_out_normed"
    )
    assert (
        hook_point_from_transformerlens("blocks.3.hook_attn_out", architecture="olmo2")
        == "3.attn_out_normed"
    )
    assert (
        hook_point_from_transformerlens("blocks.3.hook_mlp_out", architecture="llama")
        == "3.mlp_out"
    )


@pytest.mark.parametrize(
    "name", ["blocks.5.attn.hook_z", "hook_pos_embed", "blocks.x.hook_resid_pre", "resid_pre"]
)
def test_transformerlens_errors(name: str) -> None:
    with pytest.raises(TopologyError, match="no canonical hook point") as err:
        hook_point_from_transformerlens(name)
    assert "blocks.{i}.hook_resid_pre" in str(err.value)


@pytest.mark.parametrize(
    ("path", "role", "expected"),
    [
        ("layers.5.mlp", "input", "5.mlp_in"),
        ("layers.5.mlp", "output", "5.mlp_out"),
        ("h.5.mlp", "input", "5.mlp_in"),
        ("transformer.h.5", "input", "5.resid_pre"),
        ("model.layers.5", "output", "5.resid_post"),
        ("h.5", "input", "5.resid_pre"),
        ("gpt_neox.layers.5.mlp", "output", "5.mlp_out"),
        ("gpt_neox.layers.5.attention", "output", "5.attn_out"),
        ("model.layers.5.self_attn", "input", "5.attn_in"),
        ("model.layers.5.mlp.down_proj", "input", "5.mlp_hidden"),
        ("transformer.h.5.mlp.c_proj", "input", "5.mlp_hidden"),
        ("transformer.h.5.ln_2", "output", "5.mlp_in"),
        ("transformer.h.5.ln_2", "input", "5.resid_mid"),
        ("model.layers.5.pre_feedforward_layernorm", "output", "5.mlp_in"),
        ("base_model.model.model.layers.11.mlp", "input", "11.mlp_in"),
    ],
)
def test_module_path_hookpoints(path: str, role: Any, expected: str) -> None:
    assert hook_point_from_module_path(path, role) == expected


def test_module_path_errors() -> None:
    with pytest.raises(TopologyError, match="does not name a canonical hook point"):
        hook_point_from_module_path("model.embed_tokens", "output")
    with pytest.raises(TopologyError, match="does not name a canonical hook point"):
        hook_point_from_module_path("layers.5.mlp.gate_proj", "output")
    with pytest.raises(TopologyError, match="role must be"):
        hook_point_from_module_path("layers.5.mlp", "middle")  # type: ignore[arg-type]
    with pytest.raises(TopologyError, match="different things per architecture"):
        hook_point_from_module_path("model.layers.5.post_attention_layernorm", "output")


def test_module_path_translation_agrees_with_loaded_models() -> None:
    """Pure-string results name the same tensors the topology hooks on real models."""
    for arch in ("gpt2", "gpt_neox", "llama", "phi3"):
        topo = topology_of(build_model(arch))
        for hook in topo.hook_points():
            site = topo.site(hook)
            if site.resid_block is not None:
                continue
            assert topo.hook_point_of_module(site.module_path, site.where) in (hook, "embed"), (
                arch,
                hook,
            )
            try:
                assert hook_point_from_module_path(site.module_path, site.where) == hook
            except TopologyError:
                assert hook in ("embed", "unembed_in")
    # the architecture-aware form resolves the ambiguous name
    gemma2 = topology_of(build_model("gemma2"))
    assert (
        gemma2.hook_point_of_module("model.layers.1.post_attention_layernorm", "output")
        == "1.attn_out_normed"
    )
    llama = topology_of(build_model("llama"))
    with pytest.raises(TopologyError, match="not a canonical hook point"):
        llama.hook_point_of_module("model.layers.1.post_attention_layernorm", "output")


# --- a plugin teaching the host a new architecture -----------------------------------------------


class ToyAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.wqkv = nn.Linear(d, 3 * d)
        self.wo = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.wqkv(x).chunk(3, dim=-1)
        return self.wo(torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v)


class ToyMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d, 2 * d)
        self.w_out = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(torch.relu(self.w_in(x)))


class ToyBlock(nn.Module):
    """Pre-norm attention, then an MLP reading the raw residual (no pre-MLP norm)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mixer = ToyAttention(d)
        self.ff = ToyMLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm(x))
        return x + self.ff(x)


class ToyLM(nn.Module):
    def __init__(self, d: int = 8, vocab: int = 11, n: int = 3) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.stack = nn.ModuleList(ToyBlock(d) for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids)
        for block in self.stack:
            x = block(x)
        return self.head(x)


TOY_SPEC = ArchitectureSpec(
    name="toy",
    blocks=("stack",),
    attn="mixer",
    mlp="ff",
    attn_proj={"qkv": "wqkv", "o": "wo"},
    mlp_proj={"up": "w_in", "down": "w_out"},
    norms={"attn_pre": "norm"},
    embed=("tok",),
    output=("head",),
)


class ArchPlugin:
    def __init__(self, *specs: ArchitectureSpec) -> None:
        self.specs = specs

    @hookimpl
    def register_architectures(self, register: Callable[[Any], None]) -> None:
        for spec in self.specs:
            register(spec)


def test_plugin_registers_new_architecture() -> None:
    model = ToyLM().eval()
    with pytest.raises(TopologyError, match="cannot map ToyLM"):
        topology_of(model)
    with temporary_plugins(("toy_arch", ArchPlugin(TOY_SPEC)), entry_points=False):
        topo = topology_of(model)
        assert (topo.spec.name, topo.architecture, topo.n_layers) == ("toy", "toy", 3)
        assert topo.module_path("2.attn_fused.qkv") == "stack.2.mixer.wqkv"
        assert topo.address_of("stack.1.ff.w_out") == "1.mlp.down"
        ids = torch.randint(0, 11, (2, 5))
        with (
            torch.no_grad(),
            topo.capture(["1.mlp_in", "1.mlp_out", "1.resid_mid", "1.resid_post"]) as acts,
        ):
            model(ids)
        ff = model.stack[1].ff
        torch.testing.assert_close(
            acts["1.mlp_out"], ff.w_out(torch.relu(ff.w_in(acts["1.mlp_in"])))
        )
        torch.testing.assert_close(acts["1.resid_mid"], acts["1.mlp_in"])  # no pre-MLP norm
        torch.testing.assert_close(acts["1.resid_post"], acts["1.resid_mid"] + acts["1.mlp_out"])


def test_plugin_spec_wins_over_builtin() -> None:
    from dataclasses import replace

    mine = replace(GPT2, name="my_gpt2", description="plugin override")
    model = build_model("gpt2")
    assert topology_of(model).spec.name == "gpt2"
    with temporary_plugins(("override", ArchPlugin(mine)), entry_points=False):
        assert topology_of(model).spec.name == "my_gpt2"


def test_bad_spec_is_rejected() -> None:
    with pytest.raises(TopologyError, match="attn_proj roles"):
        ArchitectureSpec(
            name="bad",
            blocks=("x",),
            attn="a",
            mlp="m",
            attn_proj={"q": "q"},
            mlp_proj={"up": "u", "down": "d"},
        )
