"""A method plugin for the BOS tests: its decomposition directory holds a real tokenizer,
saved with ``save_pretrained`` (a GPT-2 byte-level BPE, or a Llama-style one with a distinct
``<s>`` and ``add_bos_token``), and an optional ``record.json`` standing for what the
decomposition recorded (``{"prepend_bos": ...}``). Its HarvestFn keeps the token batches it
was given in ``SEEN``, so a test can compare them with sequences it builds by hand.

Component 0 of its one site fires where the token is BOS, component 1 everywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spd_host.adapter import DecompositionDefaults, HarvestBatch, MethodInfo, Site
from spd_host.hookspecs import hookimpl

METHOD = MethodInfo(name="btoy", description="A toy method with a real tokenizer (BOS tests).")
SEEN: list[torch.Tensor] = []

DOCS = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak.",
    "You are all resolved rather to die than to famish?",
    "Resolved. resolved. First, you know Caius Marcius is chief enemy to the people.",
]


def _bpe(specials: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(DOCS * 4, trainer)
    return tok


def gpt2_tokenizer() -> Any:
    """GPT-2's layout: one special token, ``<|endoftext|>``, as BOS and EOS; adds nothing."""
    import transformers

    eot = "<|endoftext|>"
    return transformers.GPT2TokenizerFast(
        tokenizer_object=_bpe([eot]), bos_token=eot, eos_token=eot, unk_token=eot
    )


def llama_tokenizer() -> Any:
    """Llama's layout: ``<unk>`` 0, ``<s>`` 1 (BOS, added on encode), ``</s>`` 2 (EOS)."""
    import transformers

    return transformers.LlamaTokenizerFast(
        tokenizer_object=_bpe(["<unk>", "<s>", "</s>"]),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
    )


def write_decomposition(root: Path, tokenizer: Any, record: dict[str, Any] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(root / "tokenizer")
    if record is not None:
        (root / "record.json").write_text(json.dumps(record))
    return root


@dataclass
class BosAdapter:
    decomposition_id: str
    root: Path
    method: MethodInfo = METHOD
    sites: list[Site] = field(
        default_factory=lambda: [
            Site(name="0.mlp", n_components=2, reads_from="0.mlp_in", writes_to=("0.mlp_out",))
        ]
    )
    activation_types: tuple[str, ...] = ("act",)
    base_model_name: str = "bos-toy"

    @property
    def defaults(self) -> DecompositionDefaults:
        record = self.root / "record.json"
        extra = json.loads(record.read_text()) if record.exists() else {}
        column = extra.pop("dataset_column", None)  # the decomposition's recorded text column
        return DecompositionDefaults(seq_len=8, dataset_column=column, extra=extra)

    def load_base_model(self) -> Any:
        return torch.nn.Identity()

    def load_tokenizer(self) -> Any:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(self.root / "tokenizer")


@hookimpl
def register_methods(register: Any) -> None:
    register(METHOD)


@hookimpl
def load_decomposition(decomposition_id: Any) -> Any:
    if decomposition_id.method != "btoy":
        return None
    return BosAdapter(decomposition_id.normalized, Path(decomposition_id.path))


@hookimpl
def harvest_fn(adapter: Any, options: Any) -> Any:
    if adapter.method.name != "btoy":
        return None
    tokenizer = adapter.load_tokenizer()
    bos, vocab = tokenizer.bos_token_id, len(tokenizer)

    def fn(tokens: torch.Tensor) -> HarvestBatch:
        SEEN.append(tokens.clone())
        fires = torch.stack([tokens == bos, torch.ones_like(tokens, dtype=torch.bool)], dim=-1)
        return HarvestBatch(
            tokens=tokens,
            firings={"0.mlp": fires},
            activations={"0.mlp": {"act": fires.float()}},
            next_token_logits=torch.zeros(*tokens.shape, vocab),
        )

    return fn
