"""Tiny Hugging Face models written to disk in the real layout, random weights, for tests:

- a sentence-embedding model as sentence-transformers publishes one (all-MiniLM-L6-v2's
  files: ``config.json``, ``model.safetensors``, ``tokenizer.json``, ``modules.json``,
  ``sentence_bert_config.json``, ``1_Pooling/config.json``, ``2_Normalize``);
- a GPT-2 causal LM with a byte-level BPE tokenizer (no merges: one token per byte).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

WORDS = ["the", "a", "cat", "dog", "label", "of", "mlp", "description", "text", "baseline"]


def build_embedder(
    path: Path, *, hidden: int = 16, seed: int = 0, words: Sequence[str] = WORDS
) -> Path:
    """``words`` are whole-word entries of the WordPiece vocabulary (besides single characters)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;'\"!?-_()[]/")
    entries = dict.fromkeys([*specials, *words, *chars, *(f"##{c}" for c in chars)])
    vocab = {t: i for i, t in enumerate(entries)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=128,
    )  # fmt: skip
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128,
    )  # fmt: skip
    BertModel(cfg).eval().save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    (path / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )  # fmt: skip
    (path / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 128, "do_lower_case": False})
    )
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": hidden,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    (path / "2_Normalize").mkdir(exist_ok=True)
    return path


def build_causal_lm(path: Path, *, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=512,
    )  # fmt: skip
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=len(vocab), n_positions=512,
        bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1,
    )  # fmt: skip
    GPT2LMHeadModel(cfg).eval().save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path
