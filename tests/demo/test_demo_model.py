"""The shipped demo model and tokenizer: they load, round-trip text, and learned the corpus."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from spd_host.data import TokenDatasetSpec, heldout_start, iter_token_batches
from spd_host.demo import DEMO_MODEL_NAME, demo_corpus_path, demo_model_dir
from spd_host.models import load_base_model, load_tokenizer


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.set_num_threads(1)
    return load_base_model(DEMO_MODEL_NAME)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEMO_MODEL_NAME)


def test_assets_are_a_complete_hf_directory() -> None:
    names = {p.name for p in demo_model_dir().iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "training.json",
    } <= names
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in names)
    total = sum(p.stat().st_size for p in demo_model_dir().iterdir())
    assert total < 8 * 2**20


def test_load_base_model_demo(model: torch.nn.Module) -> None:
    assert isinstance(model, GPT2LMHeadModel)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    cfg = model.config
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_positions) == (4, 128, 4, 256)


def test_plain_transformers_loads_the_same_weights(model: torch.nn.Module) -> None:
    plain = AutoModelForCausalLM.from_pretrained(demo_model_dir()).eval()
    tokens = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        assert torch.equal(plain(tokens).logits, model(tokens).logits)


def test_tokenizer_round_trips_text(tokenizer) -> None:
    plain = AutoTokenizer.from_pretrained(demo_model_dir())
    for text in [
        "First Citizen:\nBefore we proceed any further, hear me speak.\n",
        "  odd   spacing\t",
        "naïve café — 日本語 🎭",
    ]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert plain(text, add_special_tokens=False)["input_ids"] == ids
    # the BPE merged something: Shakespeare needs far fewer tokens than bytes
    sample = demo_corpus_path().read_text()[:5000]
    assert len(tokenizer(sample)["input_ids"]) < len(sample.encode()) / 2.5


def test_tokenizer_matches_model(tokenizer, model: torch.nn.Module) -> None:
    assert len(tokenizer) == model.config.vocab_size
    assert 1500 <= len(tokenizer) <= 2100
    assert tokenizer.eos_token == "<|endoftext|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id


def test_training_record_matches_the_shipped_corpus() -> None:
    record = json.loads((demo_model_dir() / "training.json").read_text())
    assert record["corpus_sha256"] == hashlib.sha256(demo_corpus_path().read_bytes()).hexdigest()
    assert record["config"]["seed"] == 0
    assert record["final_heldout_loss"] < record["unigram_heldout_loss"]


def test_heldout_loss_is_well_below_the_unigram_baseline(model, tokenizer) -> None:
    """Reference: the unigram entropy of the tokenized corpus, computed here from token counts."""
    text = demo_corpus_path().read_text()
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    counts = Counter(ids)
    n = len(ids)
    unigram_entropy = -sum(c / n * math.log(c / n) for c in counts.values())

    # a few held-out sequences; they must come from the last tenth of the corpus' tokens
    spec = TokenDatasetSpec(split="heldout", seq_len=128, seed=1)
    batch = next(iter_token_batches(spec, tokenizer, batch_size=12))
    with torch.no_grad():
        logits = model(batch).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )

    assert float(loss) < unigram_entropy - 1.0
    assert float(loss) < math.log(len(tokenizer)) - 2.0
    # and the held-out text really is from the end of the corpus, which the trainer never saw
    stream = [*ids, tokenizer.eos_token_id]  # the data module ends each document with EOS
    tail = stream[heldout_start(len(stream)) :]
    first = batch[0].tolist()
    assert any(tail[i : i + 128] == first for i in range(len(tail) - 127))
