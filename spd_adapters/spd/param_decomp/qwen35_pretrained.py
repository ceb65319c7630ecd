"""``target.spec.kind: pretrained_qwen35_moe``: a lab-pretrained ``Qwen35Moe`` toy as the target.

Facts from param-decomp (``experiments/lm/config.py`` ``PretrainedQwen35MoeTarget``,
``targets/qwen36_moe.py`` ``qwen36_moe_config_from_pretrain_cache`` /
``load_decomposed_qwen36_moe_from_pretrain_cache``): ``run_path`` names the W&B pretrain run
(``<entity>/<project>[/runs]/<run_id>``), resolved to the store entry
``<data_root>/pretrain_cache/<project>-<run_id>/`` holding ``model_config.yaml`` (the
pretrainer's config dumped verbatim, ``model_type: Qwen35Moe``) and ONE
``model_step_<N>.safetensors``, keyed as transformers' text-only ``Qwen3_5MoeForCausalLM``
(``model.`` prefix, ``lm_head.weight`` always present, also for a tied toy). The architecture is
the qwen36_moe target's, so the toy is built here as that transformers class.

Where the entry is looked for: ``<data_root>`` is the run directory's grandparent
(``<data_root>/runs/<id>``), then ``$SPD_HOST_PD_RUNS_DIR`` (a data root or its ``runs/``);
a ``run_path`` that is a local directory is taken as the entry itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from spd_host.errors import FormatError, SourceNotFoundError

MODEL_CONFIG = "model_config.yaml"
#: model_config.yaml field -> transformers Qwen3_5MoeTextConfig field (architecture only;
#: block_size, the router-loss coefficients and tied_head are training facts)
FIELDS = {
    "vocab_size": "vocab_size",
    "n_layer": "num_hidden_layers",
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_kv_head": "num_key_value_heads",
    "head_dim": "head_dim",
    "linear_num_key_heads": "linear_num_key_heads",
    "linear_key_head_dim": "linear_key_head_dim",
    "linear_num_value_heads": "linear_num_value_heads",
    "linear_value_head_dim": "linear_value_head_dim",
    "linear_conv_kernel_dim": "linear_conv_kernel_dim",
    "n_experts": "num_experts",
    "n_experts_per_tok": "num_experts_per_tok",
    "moe_intermediate": "moe_intermediate_size",
    "shared_expert_intermediate": "shared_expert_intermediate_size",
    "rms_norm_eps": "rms_norm_eps",
    "n_ctx": "max_position_embeddings",
}
_ROPE = ("rope_theta", "partial_rotary_factor")


def _run_ref(run_path: str) -> tuple[str, str] | None:
    """``<entity>/<project>[/runs]/<run_id>`` -> (project, run_id)."""
    parts = [p for p in run_path.removeprefix("wandb:").strip("/").split("/") if p]
    if len(parts) == 4 and parts[2] == "runs":
        parts = [parts[0], parts[1], parts[3]]
    return (parts[1], parts[2]) if len(parts) == 3 else None


def locate_entry(run_path: str, run_dir: Path | None) -> Path:
    """The pretrain-cache entry directory of ``run_path``."""
    local = Path(run_path).expanduser()
    if local.is_dir() and (local / MODEL_CONFIG).is_file():
        return local
    ref = _run_ref(run_path)
    if ref is None:
        raise FormatError(
            f"target.spec.run_path={run_path!r} is not <entity>/<project>[/runs]/<run_id>",
            hint="pretrained_qwen35_moe names the W&B pretrain run of the Qwen35Moe toy",
        )
    roots: list[Path] = []
    if run_dir is not None:
        roots.append(run_dir.resolve().parent.parent)
    env = os.environ.get("SPD_HOST_PD_RUNS_DIR")
    if env:
        roots += [Path(env).expanduser(), Path(env).expanduser().parent]
    name = f"{ref[0]}-{ref[1]}"
    for root in roots:
        entry = root / "pretrain_cache" / name
        if (entry / MODEL_CONFIG).is_file():
            return entry
    looked = ", ".join(str(r / "pretrain_cache" / name) for r in roots) or "(no data root known)"
    raise SourceNotFoundError(
        f"pretrained_qwen35_moe target {run_path!r}: no pretrain-cache entry (looked in {looked})",
        hint="copy param-decomp's <data_root>/pretrain_cache/<project>-<run_id>/ (model_config.yaml "
        "+ model_step_<N>.safetensors) next to the runs directory, or set SPD_HOST_PD_RUNS_DIR",
    )


def text_config(entry: Path) -> Any:
    """transformers' ``Qwen3_5MoeTextConfig`` of the toy, from its ``model_config.yaml``."""
    from transformers import Qwen3_5MoeTextConfig

    path = entry / MODEL_CONFIG
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise FormatError(f"{path}: not a readable YAML file ({err})") from err
    if not isinstance(raw, dict) or raw.get("model_type") != "Qwen35Moe":
        got = raw.get("model_type") if isinstance(raw, dict) else None
        raise FormatError(
            f"{path}: model_type={got!r}, but target.spec.kind pretrained_qwen35_moe needs a "
            "Qwen35Moe pretrain run"
        )
    missing = [k for k in (*FIELDS, *_ROPE, "full_attention_interval") if k not in raw]
    if missing:
        raise FormatError(f"{path}: missing Qwen35Moe fields {missing}")
    interval = int(raw["full_attention_interval"])
    n_layer = int(raw["n_layer"])
    return Qwen3_5MoeTextConfig(
        **{hf: raw[ours] for ours, hf in FIELDS.items()},
        layer_types=[
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(n_layer)
        ],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": float(raw["rope_theta"]),
            "partial_rotary_factor": float(raw["partial_rotary_factor"]),
        },
        tie_word_embeddings=False,  # a tied toy still exports lm_head.weight
    )


def checkpoint(entry: Path) -> Path:
    found = sorted(entry.glob("model_step_*.safetensors"))
    if len(found) != 1:
        raise FormatError(
            f"{entry}: expected one model_step_<N>.safetensors, found {len(found)}",
            hint="param-decomp's pretrain-cache entry holds exactly one checkpoint",
        )
    return found[0]


def build(entry: Path, *, weights: bool) -> nn.Module:
    """The toy as ``Qwen3_5MoeForCausalLM`` (on the meta device without ``weights``)."""
    from safetensors.torch import load_file
    from transformers import Qwen3_5MoeForCausalLM

    config = text_config(entry)
    if not weights:
        with torch.device("meta"):
            return Qwen3_5MoeForCausalLM(config)
    model = Qwen3_5MoeForCausalLM(config)
    path = checkpoint(entry)
    state = load_file(str(path))
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {extra[0]}"
        raise FormatError(
            f"{path}: {what} for the Qwen35Moe toy its model_config.yaml describes "
            f"({len(missing)} missing, {len(extra)} unexpected)"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(want[key].shape):
            raise FormatError(
                f"{path}: tensor {key} has shape {list(value.shape)}, but model_config.yaml "
                f"implies {list(want[key].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.float().eval().requires_grad_(False)


def load_tokenizer(entry: Path, name: str | None) -> Any:
    """``data.tokenizer_name`` when the run names one, else tokenizer files in the entry."""
    from spd_host.models import load_tokenizer as load

    if name:
        return load(name)
    if (entry / "tokenizer.json").is_file():
        return load(str(entry))
    raise SourceNotFoundError(
        f"pretrained_qwen35_moe target {entry}: no tokenizer (the run config names no "
        "data.tokenizer_name and the pretrain-cache entry has no tokenizer.json)",
        hint="add the toy's tokenizer files to the entry directory",
    )
