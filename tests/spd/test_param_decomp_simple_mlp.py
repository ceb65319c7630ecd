"""A param-decomp run over Goodfire's own LlamaSimpleMLP family (``decomposition.sites.kind:
simple_mlp``, ``target.spec.kind: pretrained``): site names ``h.{i}.attn.*_proj`` /
``h.{i}.mlp.{c_fc,down_proj}`` and taps on that model's module names.

The real LlamaSimpleMLP is another module's job; this test builds a tiny stand-in with its
module names (``wte``, ``h.{i}.rms_1``, ``attn.{q,k,v,o}_proj``, ``rms_2``, ``mlp.{c_fc,
down_proj}``, ``ln_f``, forward -> ``(logits, loss)``) and hands it to the plugin through the
pretrained-target loader hook, the seam those targets plug into."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("orbax.checkpoint")

from spd_adapters.spd.param_decomp import target as tgt
from spd_host.errors import SpdHostError
from spd_host.plugins import get_host
from tests.spd.pd_run_writer import RunSpec, write_pd_run
from tests.spd.test_param_decomp_load import _check


class _Rms(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _Attn(nn.Module):
    def __init__(self, d: int, nh: int):
        super().__init__()
        self.nh = nh
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(d, d, bias=False) for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            p(x).view(b, t, self.nh, d // self.nh).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class _Mlp(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.c_fc, self.down_proj = nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.c_fc(x)))


class _Block(nn.Module):
    def __init__(self, d: int, nh: int, h: int):
        super().__init__()
        self.rms_1, self.attn, self.rms_2, self.mlp = _Rms(d), _Attn(d, nh), _Rms(d), _Mlp(d, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.rms_1(x))
        return x + self.mlp(self.rms_2(x))


class TinySimpleMLP(nn.Module):
    def __init__(self, vocab: int = 2048, d: int = 16, nh: int = 2, h: int = 20, n: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(_Block(d, nh, h) for _ in range(n))
        self.ln_f = _Rms(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = self.wte(idx)
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x)), None


@pytest.fixture
def simple_target() -> Iterator[TinySimpleMLP]:
    model = TinySimpleMLP().eval()
    seen: list[dict] = []
    tgt.set_pretrained_target_loader(lambda spec: (seen.append(spec), model)[1])
    yield model
    tgt.set_pretrained_target_loader(None)
    assert seen and seen[0]["run_path"] == "goodfire/spd/runs/tinysmlp"


SPEC = RunSpec(
    cs={"q_proj": 3, "o_proj": 2, "c_fc": 4, "down_proj": 5},
    family="simple_mlp",
    ci={
        "type": "chunkwise_transformer",
        "blocks_per_chunk": 1,
        "input_tap": "all_block_taps",
        "d_model": 8,
        "n_blocks": 1,
        "attention": {
            "kind": "mha",
            "n_heads": 2,
            "implementation": "xla",
            "mask": "bidirectional",
        },
        "ffn": {"kind": "gelu", "hidden": 8},
    },
)


def test_simple_mlp_family_ci_matches_reference(
    tmp_path: Path, simple_target: TinySimpleMLP
) -> None:
    run_dir = tmp_path / "p-5a5a5a5a"
    params = write_pd_run(run_dir, SPEC, simple_target, steps=(100,))
    adapter = get_host().load_adapter(get_host().parse_id(f"spd:{run_dir}"))
    assert list(adapter.defaults.extra["module_paths"].values()) == [
        f"h.{i}.{sub}"
        for i in (0, 1)
        for sub in ("attn.q_proj", "attn.o_proj", "mlp.c_fc", "mlp.down_proj")
    ]
    _check(adapter, SPEC, params, simple_target)


def test_unavailable_pretrain_run_is_a_clear_error(tmp_path: Path) -> None:
    """Without a registered loader the run's ``run_path`` goes to the Goodfire target reader;
    offline and uncached, that fails naming the run."""
    model = TinySimpleMLP().eval()
    tgt.set_pretrained_target_loader(lambda spec: model)
    run_dir = tmp_path / "p-6b6b6b6b"
    write_pd_run(run_dir, SPEC, model, steps=(100,))
    tgt.set_pretrained_target_loader(None)
    with pytest.raises(SpdHostError, match=r"tinysmlp"):
        get_host().load_adapter(get_host().parse_id(f"spd:{run_dir}"))


def test_goodfire_llama_simple_mlp_target_from_its_pretrain_run(tmp_path: Path) -> None:
    """The real LlamaSimpleMLP of ``spd_adapters.spd.targets`` (biased attention, GQA, adjacent-
    pair RoPE), loaded from a local pretrain run named by ``target.spec.run_path``."""
    from spd_adapters.spd.targets.loading import load_pretrained
    from tests.spd.goodfire_pretrain import LLAMA_SIMPLE_MLP, VOCAB, write_pretrain_run

    pretrain = tmp_path / "pretrain"
    write_pretrain_run(pretrain, LLAMA_SIMPLE_MLP)
    model = load_pretrained("LlamaSimpleMLP", str(pretrain))  # the test's own copy
    spec = RunSpec(
        cs={"k_proj": 2, "o_proj": 3, "c_fc": 4, "down_proj": 3},
        family="simple_mlp",
        ci={**SPEC.ci, "input_tap": "all_block_resids", "blocks_per_chunk": 2},
        target_spec={
            "kind": "pretrained",
            "model_class": "param_decomp.pretrain.models.llama_simple_mlp.LlamaSimpleMLP",
            "run_path": str(pretrain),
        },
    )
    run_dir = tmp_path / "p-7c7c7c7c"
    params = write_pd_run(run_dir, spec, model, steps=(100,))
    adapter = get_host().load_adapter(get_host().parse_id(f"spd:{run_dir}"))
    _check(adapter, spec, params, model, vocab=VOCAB)
    tokenizer = adapter.load_tokenizer()  # the pretrain run's own saved tokenizer
    assert len(tokenizer) <= VOCAB and tokenizer("a b").input_ids
