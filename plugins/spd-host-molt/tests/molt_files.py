"""Write tiny MOLTs and base models in the exact on-disk layouts the plugin reads (test helper)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def random_molt_tensors(
    d_model: int,
    counts: dict[int, int],
    *,
    seed: int = 0,
    decoder_bias: bool = True,
    jumprelu: bool = False,
    norms: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Tensors named exactly as Llamascopium's MOLT state dict."""
    g = torch.Generator().manual_seed(seed)
    n = sum(counts.values())
    sd: dict[str, torch.Tensor] = {
        "W_E": torch.randn(d_model, n, generator=g) / d_model**0.5,
        "b_E": torch.randn(n, generator=g) * 0.1,
    }
    for r, c in counts.items():
        sd[f"U_matrices.{r}"] = torch.randn(c, d_model, r, generator=g) / d_model**0.5
        sd[f"V_matrices.{r}"] = torch.randn(c, r, d_model, generator=g) / d_model**0.5
    if decoder_bias:
        sd["b_D"] = torch.randn(d_model, generator=g) * 0.1
    if jumprelu:
        sd["activation_function.log_jumprelu_threshold"] = torch.randn(n, generator=g) * 0.3 - 2.0
    for hook, value in (norms or {}).items():
        sd[f"dataset_average_activation_norm.{hook}"] = torch.tensor(value)
    return sd


def write_molt(
    root: Path,
    tensors: dict[str, torch.Tensor],
    *,
    d_model: int,
    ranks: dict[int, int],
    layer: int = 1,
    act_fn: str = "relu",
    norm_activation: str = "inference",
    decoder_bias: bool = True,
    sparsity_include_decoder_norm: bool = True,
    top_k: int = 4,
    lm: dict[str, Any] | None = None,
) -> Path:
    """A Llamascopium save_pretrained directory: config.json, sae_weights.safetensors, lm_config.json."""
    root.mkdir(parents=True, exist_ok=True)
    n = tensors["W_E"].shape[1]
    config = {
        "sae_type": "molt",
        "d_model": d_model,
        "expansion_factor": n / d_model,
        "use_decoder_bias": decoder_bias,
        "act_fn": act_fn,
        "norm_activation": norm_activation,
        "sparsity_include_decoder_norm": sparsity_include_decoder_norm,
        "top_k": top_k,
        "jumprelu_threshold_window": 2.0,
        "hook_point_in": f"blocks.{layer}.ln2.hook_normalized",
        "hook_point_out": f"blocks.{layer}.hook_mlp_out",
        # JSON object keys are strings, exactly as pydantic's model_dump + json.dump writes them
        "rank_distribution": {str(r): c for r, c in ranks.items()},
        "model_parallel_size_training": 1,
    }
    (root / "config.json").write_text(json.dumps(config, indent=4))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(root / "sae_weights.safetensors")
    )
    if lm is not None:
        (root / "lm_config.json").write_text(json.dumps(lm, indent=4))
    return root


CORPUS = (
    "First Citizen: Before we proceed any further, hear me speak.\n"
    "All: Speak, speak.\nFirst Citizen: You are all resolved rather to die than to famish?\n"
    "All: Resolved. resolved.\n"
) * 40


def write_tiny_gpt2(
    root: Path, *, n_layer: int = 2, d_model: int = 16, vocab: int = 64, tokenizer: bool = False
) -> Path:
    """A randomly initialised GPT-2 saved in Hugging Face format (config.json + model.safetensors).

    With ``tokenizer=True`` a byte-level BPE tokenizer is trained on :data:`CORPUS` and saved in
    the same directory (the vocabulary then sets the model's), so harvest can tokenize text.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    root.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        from tokenizers import ByteLevelBPETokenizer
        from transformers import PreTrainedTokenizerFast

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator([CORPUS], vocab_size=300, special_tokens=["<|endoftext|>"])
        tok = PreTrainedTokenizerFast(
            tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
        )
        tok.save_pretrained(str(root))
        vocab = len(tok)
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=d_model,
        n_head=2,
        n_positions=64,
        vocab_size=vocab,
        bos_token_id=0,  # <|endoftext|> is the first token the BPE trainer adds
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial norms, so that pre-/post-affine inputs differ
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    model.save_pretrained(str(root))
    return root
