"""Tiny randomly initialised HF causal LMs (2 layers, hidden 32), built from configs: no download."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers

_COMMON: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _configs() -> dict[str, Callable[[], Any]]:
    t = transformers
    return {
        "gpt2": lambda: t.GPT2Config(
            vocab_size=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "gpt_neox": lambda: t.GPTNeoXConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "llama": lambda: t.LlamaConfig(**_COMMON),
        "mistral": lambda: t.MistralConfig(**_COMMON),
        "qwen2": lambda: t.Qwen2Config(**_COMMON),
        "qwen3": lambda: t.Qwen3Config(**_COMMON, head_dim=8),
        "gemma": lambda: t.GemmaConfig(**_COMMON, head_dim=8),
        "gemma2": lambda: t.Gemma2Config(**_COMMON, head_dim=8),
        "gemma3_text": lambda: t.Gemma3TextConfig(**_COMMON, head_dim=8),
        "phi3": lambda: t.Phi3Config(**_COMMON),
        "olmo2": lambda: t.Olmo2Config(**_COMMON),
    }


CONFIGS = _configs()
ARCHITECTURES = list(CONFIGS)

#: model_type -> expected structural spec
EXPECTED_SPEC = {
    "gpt2": "gpt2",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "gemma2",
    "gemma3_text": "gemma2",
    "phi3": "phi3",
    "olmo2": "olmo2",
}


def build_model(arch: str, **overrides: Any) -> torch.nn.Module:
    """A fresh tiny model of ``arch`` in eval mode, deterministic weights (seed 0)."""
    config = CONFIGS[arch]()
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # random init leaves norm weights at 1 (or 0 for Gemma's 1+w): perturb them so norms matter
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=ARCHITECTURES)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def model(arch: str) -> torch.nn.Module:
    return build_model(arch)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
