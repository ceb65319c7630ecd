"""The demo trainer: a tiny configuration runs in seconds and is deterministic for a seed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from spd_host.demo.train import TrainConfig, main, train
from spd_host.models import load_base_model, load_tokenizer

TINY = {
    "vocab_size": 300,
    "n_layer": 1,
    "n_embd": 32,
    "n_head": 2,
    "n_positions": 64,
    "seq_len": 32,
    "batch_size": 4,
    "steps": 12,
    "warmup_steps": 3,
    "max_corpus_chars": 20_000,
    "threads": 1,
}


def test_tiny_training_is_deterministic(tmp_path: Path) -> None:
    first = train(TrainConfig(seed=3, **TINY), tmp_path / "a", progress=False)
    second = train(TrainConfig(seed=3, **TINY), tmp_path / "b", progress=False)
    assert first.losses == second.losses
    assert first.final_heldout_loss == second.final_heldout_loss
    wa, wb = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_text()

    other = train(TrainConfig(seed=4, **TINY), tmp_path / "c", progress=False)
    assert other.losses != first.losses


def test_cli_writes_a_loadable_model(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path / "m"), "--seed", "0", "--quiet"]
    for key, value in TINY.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    result = main(args)
    record = json.loads((tmp_path / "m" / "training.json").read_text())
    assert record["final_train_loss"] == result.final_train_loss
    assert record["config"]["steps"] == TINY["steps"]

    model = load_base_model(str(tmp_path / "m"))
    tokenizer = load_tokenizer(str(tmp_path / "m"))
    assert model.config.vocab_size == len(tokenizer) == record["config"]["vocab_size"]
    ids = tokenizer("To be, or not to be", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
