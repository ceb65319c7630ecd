"""Tiny Goodfire pretrain runs in the exact layout of ``spd.pretrain.train``, and a reference.

Layout written (as Goodfire's trainer does): ``<out>/final_config.yaml`` (the pretrain
``Config`` dump), ``<out>/model_config.yaml`` (``model.model_dump``, with ``model_type``),
``<out>/tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``
(``save_pretrained``), ``<out>/checkpoints/model_step_<N>.pt`` (a plain state dict with
Goodfire's key names, ``wte.weight`` and ``lm_head.weight`` the same tensor). State dicts are
built here by hand from the config (not from spd-host's model), and ``reference_logits`` computes
the forward from those tensors with its own formulas: per-head loops, complex-number RoPE, an
explicit causal softmax.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

VOCAB = 61

#: model configs as ``model_dump(mode="json")`` writes them (every field, defaults included)
LLAMA_SIMPLE: dict[str, Any] = {
    "model_type": "LlamaSimple",
    "block_size": 32,
    "vocab_size": VOCAB,
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 16,
    "n_intermediate": 24,
    "mlp_bias": False,
    "attn_bias": False,
    "rotary_adjacent_pairs": False,
    "rotary_dim": 4,
    "rotary_base": 10000,
    "n_ctx": 8,  # shorter than the test sequences: later positions reuse the last angle
    "n_key_value_heads": 2,
    "use_grouped_query_attention": True,
    "flash_attention": True,
    "rms_norm_eps": 1e-6,
}
LLAMA_SIMPLE_FUSED = {
    **LLAMA_SIMPLE,
    "use_grouped_query_attention": False,
    "mlp_bias": True,
    "n_ctx": 32,
    "rotary_base": 500,
    "flash_attention": False,
}
LLAMA_SIMPLE_MLP: dict[str, Any] = {
    **LLAMA_SIMPLE,
    "model_type": "LlamaSimpleMLP",
    "n_intermediate": 32,
    "rotary_adjacent_pairs": True,
    "attn_bias": True,
    "n_ctx": 32,
    "n_key_value_heads": 1,
    "flash_attention": False,
    "rms_norm_eps": 1e-5,
}
#: param-decomp's newer LlamaSimpleMLP targets: untied lm_head, one attention-sink logit per head
LLAMA_SIMPLE_MLP_SINKS: dict[str, Any] = {
    **LLAMA_SIMPLE_MLP,
    "rotary_adjacent_pairs": False,
    "attn_bias": False,
    "n_key_value_heads": 2,
    "flash_attention": True,
    "tie_word_embeddings": False,
    "attention_sinks": True,
}
GPT2_SIMPLE: dict[str, Any] = {
    "model_type": "GPT2Simple",
    "block_size": 32,
    "vocab_size": VOCAB,
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 16,
    "flash_attention": False,
}

CLASS_PATHS = {
    "LlamaSimple": "spd.pretrain.models.llama_simple.LlamaSimple",
    "LlamaSimpleMLP": "spd.pretrain.models.llama_simple_mlp.LlamaSimpleMLP",
    "GPT2Simple": "spd.pretrain.models.gpt2_simple.GPT2Simple",
}


def _mat(g: torch.Generator, out_dim: int, in_dim: int) -> Tensor:
    return torch.randn(out_dim, in_dim, generator=g) / math.sqrt(in_dim)


def _vec(g: torch.Generator, n: int, centre: float = 0.0, scale: float = 0.1) -> Tensor:
    return centre + scale * torch.randn(n, generator=g)


def goodfire_state_dict(cfg: dict[str, Any], seed: int = 0) -> dict[str, Tensor]:
    """Random weights under Goodfire's key names for ``cfg`` (hand-written key list)."""
    g = torch.Generator().manual_seed(seed)
    d, V, L = cfg["n_embd"], cfg["vocab_size"], cfg["n_layer"]
    hd = d // cfg["n_head"]
    wte = torch.randn(V, d, generator=g) * 0.5
    sd: dict[str, Tensor] = {"wte.weight": wte}
    gpt2 = cfg["model_type"] == "GPT2Simple"
    if gpt2:
        sd["wpe.weight"] = torch.randn(cfg["block_size"], d, generator=g) * 0.3
    for i in range(L):
        p = f"h.{i}"
        if gpt2:
            for n in ("ln_1", "ln_2"):
                sd[f"{p}.{n}.weight"] = _vec(g, d, 1.0)
                sd[f"{p}.{n}.bias"] = _vec(g, d)
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                sd[f"{p}.attn.{n}.weight"] = _mat(g, d, d)
                sd[f"{p}.attn.{n}.bias"] = _vec(g, d)
            sd[f"{p}.mlp.c_fc.weight"] = _mat(g, 4 * d, d)
            sd[f"{p}.mlp.c_fc.bias"] = _vec(g, 4 * d)
            sd[f"{p}.mlp.down_proj.weight"] = _mat(g, d, 4 * d)
            sd[f"{p}.mlp.down_proj.bias"] = _vec(g, d)
            continue
        sd[f"{p}.rms_1.weight"] = _vec(g, d, 1.0)
        sd[f"{p}.rms_2.weight"] = _vec(g, d, 1.0)
        if cfg.get("attention_sinks"):
            sd[f"{p}.attn.sinks"] = torch.randn(cfg["n_head"], generator=g)
        kv = cfg["n_key_value_heads"] if cfg["use_grouped_query_attention"] else cfg["n_head"]
        if cfg["use_grouped_query_attention"]:
            shapes = {"q_proj": d, "k_proj": kv * hd, "v_proj": kv * hd}
        else:
            shapes = {"c_attn": 3 * d}
        shapes["o_proj"] = d
        for n, out in shapes.items():
            sd[f"{p}.attn.{n}.weight"] = _mat(g, out, d)
            if cfg["attn_bias"]:
                sd[f"{p}.attn.{n}.bias"] = _vec(g, out)
        di = cfg["n_intermediate"]
        mlp = (
            {"gate_proj": (di, d), "up_proj": (di, d), "down_proj": (d, di)}
            if cfg["model_type"] == "LlamaSimple"
            else {"c_fc": (di, d), "down_proj": (d, di)}
        )
        for n, (o, k) in mlp.items():
            sd[f"{p}.mlp.{n}.weight"] = _mat(g, o, k)
            if cfg["mlp_bias"]:
                sd[f"{p}.mlp.{n}.bias"] = _vec(g, o)
    sd["ln_f.weight"] = _vec(g, d, 1.0)
    if gpt2:
        sd["ln_f.bias"] = _vec(g, d)
    # tied: torch saves the shared tensor under both names
    untied = cfg.get("tie_word_embeddings", True) is False
    sd["lm_head.weight"] = torch.randn(V, d, generator=g) * 0.5 if untied else wte
    return sd


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


def pretrain_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """A pretrain ``final_config.yaml`` (``Config.model_dump(mode='json')`` shape)."""
    data = {
        "name": "SimpleStories/SimpleStories",
        "is_tokenized": False,
        "hf_tokenizer_path": "SimpleStories/test-SimpleStories-gpt2-1.25M",
        "streaming": False,
        "n_ctx": model_cfg["block_size"] + 1,
        "seed": 0,
        "column_name": "story",
    }
    return {
        "wandb_project": "spd",
        "train_dataset_config": {**data, "split": "train"},
        "val_dataset_config": {**data, "split": "test"},
        "output_dir": "/tmp/target_models",
        "model": model_cfg,
        "batch_size": 8,
        "num_iterations": 100,
        "inference_only": False,
        "learning_rate": 3e-4,
        "warmup_iters": 10,
        "learning_rate_decay_frac": 0.1,
        "weight_decay": 0.1,
        "grad_clip": 1.0,
        "val_loss_every": 100,
        "val_max_steps": 20,
        "train_log_every": 100,
        "sample_every": 1000,
        "tensorcores": True,
        "device": None,
        "compile": True,
        "dtype": "float32",
        "zero_stage": 0,
        "intermediate_checkpoints": True,
        "from_pretrained": None,
    }


def write_pretrain_run(
    out: Path, model_cfg: dict[str, Any], *, flat: bool = False, seed: int = 0
) -> dict[str, Tensor]:
    """Write a pretrain run (``flat``: the wandb files layout); return the final state dict.

    Checkpoints at steps 0, 4 and 100 (the highest wins; step 4 would sort last as a string).
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "final_config.yaml").write_text(yaml.dump(pretrain_config(model_cfg)))
    (out / "model_config.yaml").write_text(yaml.dump(model_cfg))
    tok = _tokenizer()
    if flat:
        tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    else:
        tok.save_pretrained(str(out))
    ckpts = out if flat else out / "checkpoints"
    ckpts.mkdir(exist_ok=True)
    final = goodfire_state_dict(model_cfg, seed)
    for step, s in ((0, seed + 1), (4, seed + 2)):
        torch.save(goodfire_state_dict(model_cfg, s), ckpts / f"model_step_{step}.pt")
    torch.save(final, ckpts / "model_step_100.pt")
    return final


# -- independent reference forward ------------------------------------------------------------


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _layer_norm(x: Tensor, w: Tensor, b: Tensor, eps: float = 1e-5) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


#: when set, ``_linear`` appends each module's input here (for CI references)
RECORD: dict[str, list[Tensor]] | None = None


def _linear(sd: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    if RECORD is not None:
        RECORD.setdefault(name, []).append(x)
    y = x @ sd[f"{name}.weight"].T
    b = sd.get(f"{name}.bias")
    return y if b is None else y + b


def _rope(x: Tensor, cfg: dict[str, Any]) -> Tensor:
    """x [T, hd]: rotate each pair by angle min(t, n_ctx-1) / base^(j/(hd/2)) as complex numbers."""
    T, hd = x.shape
    half = hd // 2
    pos = torch.clamp(torch.arange(T, dtype=torch.float64), max=cfg["n_ctx"] - 1)
    theta = pos[:, None] / (
        float(cfg["rotary_base"]) ** (torch.arange(half, dtype=torch.float64) / half)
    )
    rot = torch.polar(torch.ones_like(theta), theta)
    xd = x.double()
    if cfg["rotary_adjacent_pairs"]:
        z = torch.complex(xd[:, 0::2], xd[:, 1::2]) * rot
        out = torch.stack((z.real, z.imag), dim=-1).reshape(T, hd)
    else:
        z = torch.complex(xd[:, :half], xd[:, half:]) * rot
        out = torch.cat((z.real, z.imag), dim=-1)
    return out.to(x.dtype)


def _attention(sd: dict[str, Tensor], p: str, x: Tensor, cfg: dict[str, Any]) -> Tensor:
    """x [T, d] (one sequence): per-head loops, explicit causal softmax."""
    T, d = x.shape
    H = cfg["n_head"]
    hd = d // H
    gpt2 = cfg["model_type"] == "GPT2Simple"
    if not gpt2 and not cfg["use_grouped_query_attention"]:
        qkv = _linear(sd, f"{p}.attn.c_attn", x)
        q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
        kv_heads = H
    else:
        q, k, v = (_linear(sd, f"{p}.attn.{n}", x) for n in ("q_proj", "k_proj", "v_proj"))
        kv_heads = H if gpt2 else cfg["n_key_value_heads"]
    group = H // kv_heads
    heads = []
    for h in range(H):
        j = h // group
        qh, kh, vh = (
            q[:, h * hd : (h + 1) * hd],
            k[:, j * hd : (j + 1) * hd],
            v[:, j * hd : (j + 1) * hd],
        )
        if not gpt2:
            qh, kh = _rope(qh, cfg), _rope(kh, cfg)
        sink = sd.get(f"{p}.attn.sinks")
        out = torch.zeros(T, hd)
        for t in range(T):
            s = (kh[: t + 1] @ qh[t]) / math.sqrt(hd)
            top = s.max() if sink is None else torch.maximum(s.max(), sink[h])
            w = torch.exp(s - top)
            extra = 0.0 if sink is None else torch.exp(sink[h] - top)  # a zero-value slot
            out[t] = (w / (w.sum() + extra)) @ vh[: t + 1]
        heads.append(out)
    return _linear(sd, f"{p}.attn.o_proj", torch.cat(heads, dim=-1))


def reference_forward(
    sd: dict[str, Tensor], cfg: dict[str, Any], tokens: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and the input of every linear module (``[B, T, d_in]``, by module path)."""
    global RECORD
    RECORD = {}
    try:
        logits = reference_logits(sd, cfg, tokens)
        inputs = {k: torch.stack(v) for k, v in RECORD.items()}
    finally:
        RECORD = None
    inputs["wte"] = tokens
    return logits, inputs


def reference_logits(sd: dict[str, Tensor], cfg: dict[str, Any], tokens: Tensor) -> Tensor:
    """Logits ``[B, T, V]`` of Goodfire's model ``cfg`` with weights ``sd``, from the formulas."""
    gpt2 = cfg["model_type"] == "GPT2Simple"
    outs = []
    for seq in tokens:
        x = sd["wte.weight"][seq]
        if gpt2:
            x = x + sd["wpe.weight"][: len(seq)]
        for i in range(cfg["n_layer"]):
            p = f"h.{i}"
            if gpt2:
                x = x + _attention(
                    sd, p, _layer_norm(x, sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"]), cfg
                )
                h = _layer_norm(x, sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"])
                x = x + _linear(sd, f"{p}.mlp.down_proj", _gelu(_linear(sd, f"{p}.mlp.c_fc", h)))
                continue
            eps = cfg["rms_norm_eps"]
            x = x + _attention(sd, p, _rms(x, sd[f"{p}.rms_1.weight"], eps), cfg)
            h = _rms(x, sd[f"{p}.rms_2.weight"], eps)
            if cfg["model_type"] == "LlamaSimple":
                a = _linear(sd, f"{p}.mlp.gate_proj", h)
                hidden = a * torch.sigmoid(a) * _linear(sd, f"{p}.mlp.up_proj", h)
            else:
                hidden = _gelu(_linear(sd, f"{p}.mlp.c_fc", h))
            x = x + _linear(sd, f"{p}.mlp.down_proj", hidden)
        if gpt2:
            x = _layer_norm(x, sd["ln_f.weight"], sd["ln_f.bias"])
        else:
            x = _rms(x, sd["ln_f.weight"], cfg["rms_norm_eps"])
        outs.append(x @ sd["lm_head.weight"].T)
    return torch.stack(outs)
