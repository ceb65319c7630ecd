"""load_base_model / load_tokenizer: demo, local directories, the offline Hub cache, and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from spd_host.demo import demo_model_dir
from spd_host.errors import FormatError, SourceNotFoundError
from spd_host.models import load_base_model, load_tokenizer
from tests.conftest import add_to_offline_hub


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 saved in HF layout, with the demo tokenizer next to it."""
    out = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(load_tokenizer("demo")), n_positions=32, n_embd=16, n_layer=1, n_head=2
        )
    )
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer("demo").save_pretrained(out)
    return out


def test_local_directory(tiny_dir: Path) -> None:
    model = load_base_model(str(tiny_dir))
    assert isinstance(model, GPT2LMHeadModel)
    assert model.config.n_embd == 16
    assert not model.training
    tok = load_tokenizer(str(tiny_dir))
    assert tok("hello")["input_ids"] == load_tokenizer("demo")("hello")["input_ids"]


def test_dtype_is_honoured(tiny_dir: Path) -> None:
    assert (
        next(load_base_model(str(tiny_dir), dtype=torch.bfloat16).parameters()).dtype
        == torch.bfloat16
    )
    assert next(load_base_model(str(tiny_dir)).parameters()).dtype == torch.float32


def test_hub_name_from_the_offline_cache(tiny_dir: Path, offline_hub: Path) -> None:
    files: dict[str, bytes | str] = {p.name: p.read_bytes() for p in tiny_dir.iterdir()}
    add_to_offline_hub(offline_hub, "someone/tiny-gpt2", files)
    model = load_base_model("someone/tiny-gpt2")
    reference = load_base_model(str(tiny_dir))
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(model(tokens).logits, reference(tokens).logits)
    assert (
        load_tokenizer("someone/tiny-gpt2")("hi")["input_ids"]
        == load_tokenizer("demo")("hi")["input_ids"]
    )


def test_hub_name_not_cached_offline(offline_hub: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="not in the Hugging Face cache") as info:
        load_base_model("someone/not-downloaded")
    assert "HF_HUB_OFFLINE" in str(info.value)
    with pytest.raises(SourceNotFoundError, match="not in the Hugging Face cache"):
        load_tokenizer("someone/not-downloaded")


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="model directory not found"):
        load_base_model(str(tmp_path / "missing"))
    with pytest.raises(SourceNotFoundError, match="model directory not found"):
        load_tokenizer("./missing/model")


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match=r"no config\.json"):
        load_base_model(str(tmp_path / "empty"))


def test_demo_name_is_the_shipped_directory() -> None:
    assert load_tokenizer("demo").name_or_path == str(demo_model_dir())
