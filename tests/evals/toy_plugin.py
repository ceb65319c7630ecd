"""A throwaway method plugin for eval tests: a ReLU "transcoder" of a tiny GPT-2's MLPs.

Each site ``{i}.mlp`` reads ``{i}.mlp_in`` and writes ``{i}.mlp_out``. Its components are the
MLP's hidden units; the encoder is the MLP's own ``c_fc`` and the decoder its ``c_proj``, so:

- variant ``exact``: activations ``gelu(x W_fc + b_fc)``: the splice reproduces the MLP exactly;
- variant ``relu``: activations ``relu(x W_fc + b_fc)``: close to, but not, the MLP.

Firings (for L0) are ``relu(x W_fc + b_fc) > threshold``. Everything is plain PyTorch, so a test
can redo the splice by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from spd_host.adapter import (
    DecompositionDefaults,
    HarvestBatch,
    HarvestOptions,
    MethodInfo,
    Site,
)
from spd_host.hookspecs import hookimpl
from spd_host.ids import DecompositionId

METHOD = MethodInfo(name="toytc", description="Toy ReLU transcoder of each MLP, for tests.")
N_LAYER, D_MODEL, D_MLP, VOCAB = 2, 16, 32, 61


def build_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=N_LAYER,
        n_embd=D_MODEL,
        n_head=2,
        n_inner=D_MLP,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # larger weights than the init so splices change the loss visibly
        for p in model.parameters():
            p.mul_(4.0)
    return model.eval()


def pre_acts(model: GPT2LMHeadModel, layer: int, x: torch.Tensor) -> torch.Tensor:
    fc = model.transformer.h[layer].mlp.c_fc
    return x @ fc.weight + fc.bias


def reconstruct(model: GPT2LMHeadModel, layer: int, x: torch.Tensor, variant: str) -> torch.Tensor:
    pre = pre_acts(model, layer, x)
    acts = F.gelu(pre, approximate="tanh") if variant == "exact" else F.relu(pre)
    proj = model.transformer.h[layer].mlp.c_proj
    return acts @ proj.weight + proj.bias


TEXT_CHARS = "abcdefghijklmnopqrstuvwxyz .,'\n"


def build_tokenizer() -> Any:
    """A character-level fast tokenizer (BPE without merges) within the toy's vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(TEXT_CHARS)}
    vocab["<unk>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


class ToyAdapter:
    def __init__(self, did: DecompositionId) -> None:
        self.decomposition_id = did.normalized
        self.method = METHOD
        self.sites = [
            Site(
                name=f"{i}.mlp",
                n_components=D_MLP,
                reads_from=f"{i}.mlp_in",
                writes_to=(f"{i}.mlp_out",),
            )
            for i in range(N_LAYER)
        ]
        self.activation_types = ("activation",)
        self.base_model_name = "toy"
        # a local path named "seq<N>" records a training sequence length of N
        name = did.path.name if did.path is not None else ""
        seq = int(name[3:]) if name.startswith("seq") and name[3:].isdigit() else None
        self.defaults = DecompositionDefaults(seq_len=seq)
        self.splice_variants = ("relu", "exact")
        self._model: GPT2LMHeadModel | None = None

    def load_base_model(self) -> GPT2LMHeadModel:
        if self._model is None:
            self._model = build_model()
        return self._model

    def load_tokenizer(self) -> Any:
        return build_tokenizer()

    @contextmanager
    def splice(
        self,
        model: torch.nn.Module,
        *,
        sites: Sequence[str] | None = None,
        variant: str | None = None,
    ) -> Iterator[None]:
        chosen = [s.name for s in self.sites] if sites is None else list(sites)
        handles = []
        for name in chosen:
            layer = int(name.split(".")[0])

            def hook(_m: Any, args: Any, _out: Any, layer: int = layer) -> torch.Tensor:
                return reconstruct(model, layer, args[0], variant or "relu")  # type: ignore[arg-type]

            handles.append(model.transformer.h[layer].mlp.register_forward_hook(hook))  # type: ignore[union-attr, index, operator]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class ToyPlugin:
    @hookimpl
    def register_methods(self, register: Callable[[MethodInfo], None]) -> None:
        register(METHOD)

    @hookimpl
    def load_decomposition(self, decomposition_id: DecompositionId) -> ToyAdapter | None:
        return ToyAdapter(decomposition_id) if decomposition_id.method == "toytc" else None

    @hookimpl
    def harvest_fn(self, adapter: Any, options: HarvestOptions) -> Callable[..., HarvestBatch]:
        model = adapter.load_base_model()

        def fn(tokens: torch.Tensor) -> HarvestBatch:
            inputs: dict[int, torch.Tensor] = {}
            handles = [
                model.transformer.h[i].mlp.register_forward_pre_hook(
                    lambda _m, a, i=i: inputs.__setitem__(i, a[0])
                )
                for i in range(N_LAYER)
            ]
            try:
                with torch.no_grad():
                    logits = model(tokens).logits
            finally:
                for h in handles:
                    h.remove()
            acts = {f"{i}.mlp": F.relu(pre_acts(model, i, inputs[i])) for i in range(N_LAYER)}
            return HarvestBatch(
                tokens=tokens,
                firings={k: v > options.threshold for k, v in acts.items()},
                activations={k: {"activation": v} for k, v in acts.items()},
                next_token_logits=logits if options.next_token else None,
            )

        return fn
