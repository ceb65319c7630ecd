"""The base model of an SPD run: which class, where its weights come from, module specs.

``pretrained_model_class`` names the class. Only ``transformers.*`` classes are resolved (a
config must never make us import arbitrary code). When the checkpoint carries the frozen base
model (``target_model.*``), the model is built from its Hugging Face config
(``pretrained_model_name``: ``demo``, a local directory, or a cached Hub name) and those weights
are loaded, so the decomposition is always paired with exactly the weights it was trained on.
Without them, ``spd_host.models.load_base_model(pretrained_model_name)`` loads the published
weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spd_adapters.spd.config import SpdRunConfig
from spd_adapters.spd.formats import ModuleSpec
from spd_host.errors import FormatError, SourceNotFoundError


def model_class(config: SpdRunConfig) -> type[Any]:
    """Resolve ``pretrained_model_class`` (``transformers.<Name>`` only)."""
    name = config.pretrained_model_class
    module, _, attr = name.rpartition(".")
    if module != "transformers" or not attr:
        raise FormatError(
            f"pretrained_model_class {name!r} is not a transformers class",
            hint="spd-host loads base models through transformers (e.g. transformers.GPT2LMHeadModel, "
            "transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM)",
        )
    import transformers

    cls = getattr(transformers, attr, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):  # e.g. pipeline
        raise FormatError(f"pretrained_model_class {name!r}: not a transformers model class")
    return cls  # type: ignore[no-any-return]


def base_model_name(config: SpdRunConfig) -> str:
    name = config.pretrained_model_name or config.pretrained_model_path
    if not name:
        raise FormatError(
            "SPD config names no base model (pretrained_model_name / pretrained_model_path)",
        )
    return str(name)


def _hf_dir_or_name(name: str) -> str:
    from spd_host.models import resolve_model_source

    return resolve_model_source(name)


def hf_config(config: SpdRunConfig) -> Any:
    from transformers import AutoConfig

    name = _hf_dir_or_name(base_model_name(config))
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise SourceNotFoundError(
            f"cannot read the Hugging Face config of base model {name!r}: {err}",
            hint="point pretrained_model_name at a local model directory, or make the Hub model "
            "available in the local cache",
        ) from err


def _instantiate(config: SpdRunConfig) -> nn.Module:
    cls = model_class(config)
    hf = hf_config(config)
    if hasattr(cls, "from_config"):  # Auto* classes
        return cls.from_config(hf)  # type: ignore[no-any-return]
    return cls(hf)  # type: ignore[no-any-return]


def build_skeleton(config: SpdRunConfig) -> nn.Module:
    """The base model's structure on the meta device (no memory, no weights) for addresses."""
    with torch.device("meta"):
        return _instantiate(config)


def load_base(
    config: SpdRunConfig, target_state: Mapping[str, Tensor], *, where: Path | str
) -> nn.Module:
    """The frozen base model, from the checkpoint's ``target_model.*`` weights when present."""
    if not target_state:
        from spd_host.models import load_base_model

        return load_base_model(base_model_name(config))
    model = _instantiate(config)
    result = model.load_state_dict(dict(target_state), strict=False)
    loaded = {id(p) for k, p in model.state_dict(keep_vars=True).items() if k in target_state}
    params = model.state_dict(keep_vars=True)
    missing = [k for k in result.missing_keys if id(params[k]) not in loaded]
    if missing or result.unexpected_keys:
        raise FormatError(
            f"{where}: target_model.* weights do not fit {config.pretrained_model_class} built from "
            f"the config of {base_model_name(config)!r}: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}",
            hint="pretrained_model_name must name the model the run decomposed",
        )
    model.eval()
    model.requires_grad_(False)
    return model


def module_spec(module: nn.Module, path: str) -> ModuleSpec:
    """Kind and shapes of a decomposable module (Linear, transformers Conv1D, Embedding)."""
    from transformers.pytorch_utils import Conv1D

    bias = getattr(module, "bias", None)
    b = bias.detach().float() if isinstance(bias, Tensor) else None
    if isinstance(module, nn.Linear):
        return ModuleSpec("linear", module.in_features, module.out_features, b)
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return ModuleSpec("conv1d", int(d_in), int(d_out), b)
    if isinstance(module, nn.Embedding):
        return ModuleSpec("embedding", module.num_embeddings, module.embedding_dim, None)
    raise FormatError(
        f"decomposed module {path!r} is a {type(module).__name__}; SPD supports Linear, Conv1D and Embedding"
    )
