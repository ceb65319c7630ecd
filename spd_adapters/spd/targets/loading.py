"""Build a Goodfire target model from its pretrain run and load its weights, checking everything.

Mirrors what Goodfire's ``from_run_info`` does (``<Config>(**model_config)``, then a strict
``load_state_dict`` of ``torch.load(..., weights_only=True)``), with errors that say which file
and which tensor is wrong. Old pretrain runs have no ``model_type`` in ``model_config.yaml``;
like Goodfire we then take it from ``pretrained_model_class``. The tied ``lm_head.weight`` /
``wte.weight`` may be present under either name or both (torch saves both; param-decomp's
safetensors only ``wte.weight``); when both are present they must be equal. Untied heads
(``tie_word_embeddings: false``) need both. A GPT2Simple state dict without any attention or MLP
bias (param-decomp's JAX-pretrained GPT2Simple has none) loads with those biases zero; one that
lacks only some of them is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from spd_adapters._files import read_torch_state_dict
from spd_adapters.spd.targets.configs import CONFIG_CLASSES, TargetConfig
from spd_adapters.spd.targets.models import GPT2Simple, build_model
from spd_adapters.spd.targets.run_reader import PretrainRun, locate
from spd_host.errors import FormatError

TIED = ("wte.weight", "lm_head.weight")
_LINEAR_BIAS = re.compile(r"^h\.\d+\.(attn\.[qkvo]_proj|mlp\.(c_fc|down_proj))\.bias$")


def parse_model_config(
    raw: Mapping[str, Any], *, model_type: str, where: Path | str
) -> TargetConfig:
    """Validate ``model_config.yaml`` against the class the SPD run names."""
    data = dict(raw)
    data.setdefault("model_type", model_type)
    given = data["model_type"]
    if given not in CONFIG_CLASSES:
        raise FormatError(
            f"{where}: unknown model_type {given!r}",
            hint=f"spd-host implements Goodfire's {', '.join(CONFIG_CLASSES)}",
        )
    if given != model_type:
        raise FormatError(
            f"{where}: model_type {given!r} does not match pretrained_model_class (a {model_type})",
            hint="pretrained_model_name must name a pretrain run of the class the SPD run names",
        )
    try:
        return CONFIG_CLASSES[given].model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()
        )
        raise FormatError(
            f"{where}: not a {given} model config ({problems})",
            hint="model_config.yaml must be the dump of the model config the pretrain run used",
        ) from err


def read_config(run: PretrainRun, model_type: str) -> TargetConfig:
    return parse_model_config(
        run.read_model_config(), model_type=model_type, where=run.model_config
    )


def read_checkpoint(path: Path) -> dict[str, Tensor]:
    """A plain state dict: ``torch.load(weights_only=True)`` or safetensors (never unpickled)."""
    hint = "the checkpoint must be a torch state dict (model_step_<N>.pt) or safetensors"
    if path.suffix != ".safetensors":
        state: dict[str, Tensor] = read_torch_state_dict(path, hint=hint)
    else:
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for a corrupt file
            raise FormatError(f"{path}: not a readable state dict: {err}", hint=hint) from err
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def load_weights(model: nn.Module, state: Mapping[str, Tensor], *, where: Path | str) -> None:
    """Strictly load ``state`` into ``model``: every tensor present, none extra, shapes equal."""
    state = dict(state)
    if getattr(model, "tied", True):
        present = [k for k in TIED if k in state]
        if not present:
            raise FormatError(
                f"{where}: missing tensor 'wte.weight' (the tied embedding / lm_head)"
            )
        if len(present) == 2 and not torch.equal(state[TIED[0]], state[TIED[1]]):
            raise FormatError(
                f"{where}: 'wte.weight' and 'lm_head.weight' differ, but the model ties them",
                hint="Goodfire's target models share one embedding/unembedding matrix "
                "(set tie_word_embeddings: false in model_config.yaml for an untied head)",
            )
        for k in TIED:
            state.setdefault(k, state[present[0]])
    expected = model.state_dict()
    linear_biases = [k for k in expected if _LINEAR_BIAS.match(k)]
    if isinstance(model, GPT2Simple) and not any(k in state for k in linear_biases):
        # param-decomp's JAX-pretrained GPT2Simple has no q/k/v/o or MLP biases: they are zero
        state.update({k: torch.zeros_like(expected[k]) for k in linear_biases})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise FormatError(
            f"{where}: state dict does not fit {type(model).__name__}: "
            f"missing {missing[:6]}, unexpected {unexpected[:6]}",
            hint="the checkpoint must come from a pretrain run of the configured model",
        )
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise FormatError(
                f"{where}: tensor {key!r} has shape {list(state[key].shape)}, "
                f"expected {list(ref.shape)} from model_config.yaml",
                hint="model_config.yaml and the checkpoint must come from the same pretrain run",
            )
    model.load_state_dict(state, strict=True)


def skeleton(config: TargetConfig) -> nn.Module:
    """The model's module tree on the meta device (for site addresses; no memory)."""
    with torch.device("meta"):
        return build_model(config)


def load_model(
    config: TargetConfig, state: Mapping[str, Tensor], *, where: Path | str
) -> nn.Module:
    """A frozen float32 model in eval mode with ``state`` loaded."""
    model = build_model(config)
    load_weights(model, state, where=where)
    model.eval()
    model.requires_grad_(False)
    return model


def load_pretrained(model_type: str, name: str) -> nn.Module:
    """Goodfire target ``model_type`` from pretrain run ``name`` (wandb reference or local path).

    The entry point for any loader that names a Goodfire target outside an SPD checkpoint (e.g.
    a launch config whose frozen target is not saved with the decomposition).
    """
    run = locate(name)
    assert run.checkpoint is not None  # located with weights
    return load_model(
        read_config(run, model_type), read_checkpoint(run.checkpoint), where=run.checkpoint
    )


def is_pretrain_run(name: str) -> bool:
    """Whether a base-model name is a Goodfire pretrain run rather than a Hugging Face model.

    Goodfire's transcoder/CLT harvest configs name their base model as a pretrain run
    (``wandb:<entity>/<project>/<run id>``) or a local run directory / ``model_step_<N>.pt``.
    """
    from spd_adapters.spd.targets.run_reader import MODEL_CONFIG

    if name.startswith("wandb:"):
        return True
    path = Path(name).expanduser()
    if path.is_file():
        return (path.parent / MODEL_CONFIG).is_file() or (
            path.parent.parent / MODEL_CONFIG
        ).is_file()
    return path.is_dir() and (path / MODEL_CONFIG).is_file()


def _model_type_of(run: PretrainRun) -> str:
    model_type = run.read_model_config().get("model_type")
    if not isinstance(model_type, str):
        raise FormatError(
            f"{run.model_config}: no model_type",
            hint=f"a Goodfire pretrain run's model_config.yaml names one of {', '.join(CONFIG_CLASSES)}",
        )
    return model_type


def load_pretrain_run(name: str) -> nn.Module:
    """The model of a pretrain run named on its own; the class comes from ``model_type``."""
    run = locate(name)
    assert run.checkpoint is not None  # located with weights
    return load_model(
        read_config(run, _model_type_of(run)), read_checkpoint(run.checkpoint), where=run.checkpoint
    )


def load_pretrain_run_tokenizer(name: str) -> Any:
    """The tokenizer a pretrain run was trained with (its saved files, else its Hub name)."""
    from spd_adapters.spd.targets.tokenizer import load_pretrain_tokenizer

    return load_pretrain_tokenizer(locate(name, weights=False), None)
