"""Writes SPD run directories in the exact on-disk layout of Goodfire's ``spd`` trainer.

``final_config.yaml`` (with the many training keys a real run carries) + ``model_<step>.pth``
(a plain state dict: ``target_model.*``, ``_components.<dashed path>.{V,U}``,
``ci_fn._ci_fns.<dashed path>.layers.<i>.{W,b}`` or ``ci_fn._global_ci_fn.layers.<i>.{W,b}``,
or the sequence-level global CI functions of the dev branch under ``ci_fn._global_ci_fn.``),
optionally with the key names of older runs. Base models are tiny and built from configs.

Key names of the dev-branch CI functions (``spd/models/components.py``: ``Linear`` has ``W [in,
out]`` and ``b``; ``SelfAttention`` has bias-free ``nn.Linear`` ``{q,k,v,out}_proj.weight`` and a
persistent ``rope.inv_freq`` buffer; ``nn.RMSNorm`` has ``weight``; ``nn.Sequential`` numbers
its layers with the GELUs in between):

- ``global_shared_transformer``: ``_input_projector``, ``_blocks.<i>.attn.*``,
  ``_blocks.<i>.mlp.<2j>``, ``_output_head``;
- ``global_reverse_residual`` per block ``<b>`` (its name, '.' -> '-'): ``_inp_projectors.<b>``,
  ``_readers.<b>.<2j>``, ``_reader_norms.<b>.weight``; all but the last block also
  ``_transitions.<b>`` (or ``.0``/``.2``), ``_transition_norms.<b>.weight`` and, with attention,
  ``_attn_transitions.<b>.*``, ``_attn_norms.<b>.weight``.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

VOCAB = 61


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


GPT2_PATTERNS = {
    "transformer.h.*.mlp.c_fc": 6,
    "transformer.h.1.attn.c_proj": 5,
    "transformer.wte": 4,
}
LLAMA_PATTERNS = {"model.layers.*.mlp.down_proj": 6, "model.layers.0.self_attn.q_proj": 5}


def expand(model: nn.Module, patterns: dict[str, int]) -> dict[str, int]:
    out = {}
    for name, _ in model.named_modules():
        for pat, C in patterns.items():
            if name and fnmatch.fnmatch(name, pat):
                out[name] = C
    return out


def io_dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    assert isinstance(module, nn.Embedding)
    return module.num_embeddings, module.embedding_dim


def _dense(
    g: torch.Generator, dims: list[int], C: int | None, scale: float
) -> dict[str, torch.Tensor]:
    out = {}
    for k in range(len(dims) - 1):
        shape_W = (dims[k], dims[k + 1]) if C is None else (C, dims[k], dims[k + 1])
        shape_b = (dims[k + 1],) if C is None else (C, dims[k + 1])
        out[f"layers.{2 * k}.W"] = torch.randn(shape_W, generator=g) * scale / dims[k] ** 0.5
        out[f"layers.{2 * k}.b"] = torch.randn(shape_b, generator=g) * 0.5 + 0.4
    return out


IDENTITY = ".pre_identity"


def _module_dims(model: nn.Module, path: str) -> tuple[nn.Module | None, int, int]:
    """(module or None for an inserted identity, d_in, d_out)."""
    if path.endswith(IDENTITY):
        d = io_dims(model.get_submodule(path.removesuffix(IDENTITY)))[0]
        return None, d, d
    mod = model.get_submodule(path)
    return (mod, *io_dims(mod))


def ci_widths(model: nn.Module, module_to_c: dict[str, int]) -> dict[str, int]:
    """Width of each site's CI input: C for an embedding (its component acts), else d_in."""
    out = {}
    for path, C in module_to_c.items():
        mod, d_in, _ = _module_dims(model, path)
        out[path] = C if isinstance(mod, nn.Embedding) else d_in
    return out


def _linear(
    g: torch.Generator, d_in: int, d_out: int, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    return {
        "W": torch.randn(d_in, d_out, generator=g) * scale / d_in**0.5,
        "b": torch.randn(d_out, generator=g) * 0.3,
    }


def _put(sd: dict[str, torch.Tensor], prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    for k, v in tensors.items():
        sd[f"ci_fn._global_ci_fn.{prefix}.{k}"] = v


def _seq(sd: dict[str, torch.Tensor], g: torch.Generator, prefix: str, dims: list[int]) -> None:
    for k in range(len(dims) - 1):
        _put(sd, f"{prefix}.{2 * k}", _linear(g, dims[k], dims[k + 1]))


def _attn(sd: dict[str, torch.Tensor], g: torch.Generator, prefix: str, d: int, attn: dict) -> None:
    for n in ("q", "k", "v", "out"):
        sd[f"ci_fn._global_ci_fn.{prefix}.{n}_proj.weight"] = (
            torch.randn(d, d, generator=g) * 1.5 / d**0.5
        )
    d_head = d // attn["n_heads"]
    base = attn.get("rope_base", 10000.0)
    sd[f"ci_fn._global_ci_fn.{prefix}.rope.inv_freq"] = 1.0 / (
        base ** (torch.arange(0, d_head, 2).float() / d_head)
    )


def _norm(sd: dict[str, torch.Tensor], g: torch.Generator, key: str, d: int) -> None:
    sd[f"ci_fn._global_ci_fn.{key}.weight"] = 1.0 + 0.3 * torch.randn(d, generator=g)


def sequence_ci_tensors(
    g: torch.Generator,
    ci: dict[str, Any],
    widths: dict[str, int],
    sizes: dict[str, int],
    blocks: list[tuple[str, list[str]]] | None = None,
) -> dict[str, torch.Tensor]:
    """Random tensors with the real keys of a ``global_shared_transformer`` /
    ``global_reverse_residual`` CI function (``blocks``: the block groups' members)."""
    sd: dict[str, torch.Tensor] = {}
    if ci["fn_type"] == "global_shared_transformer":
        st = ci["simple_transformer_ci_cfg"]
        d = st["d_model"]
        _put(sd, "_input_projector", _linear(g, sum(widths.values()), d, 2.0))
        for i in range(st["n_blocks"]):
            _attn(sd, g, f"_blocks.{i}.attn", d, st["attn_config"])
            _seq(sd, g, f"_blocks.{i}.mlp", [d, *st["mlp_hidden_dim"], d])
        _put(sd, "_output_head", _linear(g, d, sum(sizes.values()), 0.2))
        sd["ci_fn._global_ci_fn._output_head.b"] += 0.5
        return sd
    assert ci["fn_type"] == "global_reverse_residual" and blocks is not None
    d = ci["d_resid_ci_fn"]
    for idx, (name, mods) in enumerate(blocks):
        b = name.replace(".", "-")
        _put(sd, f"_inp_projectors.{b}", _linear(g, sum(widths[m] for m in mods), d, 2.0))
        total_c = sum(sizes[m] for m in mods)
        _seq(sd, g, f"_readers.{b}", [d, *ci["reader_hidden_dims"], total_c])
        sd[f"ci_fn._global_ci_fn._readers.{b}.{2 * len(ci['reader_hidden_dims'])}.b"] += 0.5
        _norm(sd, g, f"_reader_norms.{b}", d)
        if idx < len(blocks) - 1:
            hidden = ci.get("transition_hidden_dim")
            if hidden is None:
                _put(sd, f"_transitions.{b}", _linear(g, d, d))
            else:
                _seq(sd, g, f"_transitions.{b}", [d, hidden, d])
            _norm(sd, g, f"_transition_norms.{b}", d)
            if ci.get("transition_attn_config") is not None:
                _attn(sd, g, f"_attn_transitions.{b}", d, ci["transition_attn_config"])
                _norm(sd, g, f"_attn_norms.{b}", d)
    return sd


def make_state_dict(
    model: nn.Module,
    module_to_c: dict[str, int],
    fn_type: str,
    hidden: list[int],
    seed: int = 1,
    ci_config: dict[str, Any] | None = None,
    blocks: list[tuple[str, list[str]]] | None = None,
) -> dict[str, torch.Tensor]:
    """A state dict with random components and CI functions of the right shapes."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {
        f"target_model.{k}": v.clone() for k, v in model.state_dict().items()
    }
    for path in sorted(module_to_c):
        C = module_to_c[path]
        mod, d_in, d_out = _module_dims(model, path)
        name = path.replace(".", "-")
        sd[f"_components.{name}.V"] = torch.randn(d_in, C, generator=g) / d_in**0.25
        sd[f"_components.{name}.U"] = torch.randn(C, d_out, generator=g) / C**0.5
        if mod is not None and getattr(mod, "bias", None) is not None:
            sd[f"_components.{name}.bias"] = mod.bias.detach().clone()
        if fn_type == "mlp":
            layers = _dense(g, [1, *hidden, 1], C, 1.5)
        elif fn_type == "vector_mlp":
            layers = _dense(g, [d_in, *hidden, 1], C, 1.5)
        elif fn_type == "shared_mlp":
            layers = _dense(g, [d_in, *hidden, C], None, 1.5)
        else:
            continue
        for k, v in layers.items():
            sd[f"ci_fn._ci_fns.{name}.{k}"] = v
    if fn_type in ("global_shared_transformer", "global_reverse_residual"):
        assert ci_config is not None
        sd.update(
            sequence_ci_tensors(g, ci_config, ci_widths(model, module_to_c), module_to_c, blocks)
        )
    if fn_type == "global_shared_mlp":
        d_total = sum(ci_widths(model, module_to_c).values())
        total_c = sum(module_to_c.values())
        for k, v in _dense(g, [d_total, *hidden, total_c], None, 1.5).items():
            sd[f"ci_fn._global_ci_fn.{k}"] = v
    return sd


def legacy_keys(
    sd: dict[str, torch.Tensor], module_to_c: dict[str, int]
) -> dict[str, torch.Tensor]:
    """The same weights under the key names of older spd runs."""
    out: dict[str, torch.Tensor] = {}
    decomposed = set(module_to_c)
    for k, v in sd.items():
        if k.startswith("target_model."):
            rest = k.removeprefix("target_model.")
            mod, _, leaf = rest.rpartition(".")
            if mod in decomposed and leaf == "weight":
                rest = f"{mod}.original.weight"
            out["patched_model." + rest] = v
        elif k.startswith("_components."):
            name, _, leaf = k.removeprefix("_components.").rpartition(".")
            if leaf in ("U", "V"):
                out[f"patched_model.{name.replace('-', '.')}.components.{leaf}"] = v
        elif k.startswith("ci_fn._ci_fns."):
            out["_gates." + k.removeprefix("ci_fn._ci_fns.")] = v
        else:
            out[k] = v
    return out


def config_dict(
    *,
    base_dir: Path,
    model_class: str,
    patterns: dict[str, int],
    fn_type: str,
    hidden: list[int],
    sigmoid_type: str = "leaky_hard",
    legacy: bool = False,
    ci_config: dict[str, Any] | None = None,
    identity: dict[str, int] | None = None,
) -> dict[str, Any]:
    mode = "global" if fn_type.startswith("global_") else "layerwise"
    cfg: dict[str, Any] = {
        "wandb_project": "spd",
        "wandb_run_name": None,
        "seed": 0,
        "n_mask_samples": 1,
        "sigmoid_type": sigmoid_type,
        "identity_module_info": None,
        "sampling": "continuous",
        "use_delta_component": True,
        "loss_metric_configs": [
            {"classname": "ImportanceMinimalityLoss", "coeff": 0.004, "pnorm": 2.0, "beta": 0},
            {
                "classname": "StochasticReconSubsetLoss",
                "routing": {"type": "uniform_k_subset"},
                "coeff": 1.0,
            },
        ],
        "output_loss_type": "kl",
        "batch_size": 64,
        "steps": 200,
        "lr_schedule": {
            "start_val": 0.0005,
            "fn_type": "cosine",
            "warmup_pct": 0.0,
            "final_val_frac": 0.1,
        },
        "eval_freq": 100,
        "slow_eval_freq": 200,
        "ci_alive_threshold": 0.0,
        "pretrained_model_class": model_class,
        "pretrained_model_name": str(base_dir),
        "pretrained_model_output_attr": "logits",
        "tokenizer_name": str(base_dir),
        "task_config": {
            "task_name": "lm",
            "max_seq_len": 16,
            "dataset_name": "SimpleStories/SimpleStories",
            "column_name": "story",
            "train_data_split": "train",
            "eval_data_split": "test",
        },
    }
    if legacy:
        C = next(iter(patterns.values()))
        assert all(c == C for c in patterns.values()), "legacy configs have one global C"
        cfg["C"] = C
        cfg["target_module_patterns"] = list(patterns)
        cfg["ci_fn_type"] = fn_type
        cfg["ci_fn_hidden_dims"] = hidden
    else:
        cfg["module_info"] = [{"module_pattern": p, "C": c} for p, c in patterns.items()]
        cfg["ci_config"] = ci_config or {"mode": mode, "fn_type": fn_type, "hidden_dims": hidden}
    if identity:
        cfg["identity_module_info"] = [{"module_pattern": p, "C": c} for p, c in identity.items()]
    return cfg


def write_run(
    run_dir: Path,
    model: nn.Module,
    *,
    model_class: str,
    patterns: dict[str, int],
    fn_type: str,
    hidden: list[int],
    sigmoid_type: str = "leaky_hard",
    legacy: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
    step: int = 200,
    ci_config: dict[str, Any] | None = None,
    identity: dict[str, int] | None = None,
    blocks: list[tuple[str, list[str]]] | None = None,
) -> dict[str, torch.Tensor]:
    """Write a full run dir (base config dir + final_config.yaml + model_<step>.pth); return the sd.

    ``ci_config`` replaces the whole ``ci_config`` section; ``identity`` is ``identity_module_info``
    (``{pattern: C}``); ``blocks`` the members of a reverse-residual CI's block groups.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    base_dir = run_dir / "base_model"
    model.config.save_pretrained(base_dir)
    module_to_c = expand(model, patterns)
    for path, C in expand(model, identity or {}).items():
        module_to_c[path + IDENTITY] = C
    sd = (
        state_dict
        if state_dict is not None
        else make_state_dict(
            model, module_to_c, fn_type, hidden, ci_config=ci_config, blocks=blocks
        )
    )
    cfg = config_dict(
        base_dir=base_dir,
        model_class=model_class,
        patterns=patterns,
        fn_type=fn_type,
        hidden=hidden,
        sigmoid_type=sigmoid_type,
        legacy=legacy,
        ci_config=ci_config,
        identity=identity,
    )
    (run_dir / "final_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.save(legacy_keys(sd, module_to_c) if legacy else sd, run_dir / f"model_{step}.pth")
    return sd
