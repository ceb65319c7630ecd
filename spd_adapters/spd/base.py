"""The base model of an SPD run: which class, where its weights come from, module specs.

``pretrained_model_class`` names the class. Two kinds are resolved, and nothing else is ever
imported (a config must never make us import arbitrary code): ``transformers.*`` model classes
(subclasses of ``PreTrainedModel`` or ``Auto*`` model factories; ``transformers.pipeline`` and
other callables are refused), and Goodfire's own target models
(``spd.pretrain.models.<module>.<Class>``, also under ``param_decomp``; see
``spd_adapters.spd.targets``), which are built from their pretrain run's ``model_config.yaml``
(``pretrained_model_name`` / ``pretrained_model_path``: a wandb run or a local checkpoint).

For ``transformers`` classes: when the checkpoint carries the frozen base model
(``target_model.*``), the model is built from its Hugging Face config
(``pretrained_model_name``: ``demo``, a local directory, or a cached Hub name) and those weights
are loaded, so the decomposition is always paired with exactly the weights it was trained on.
Without them, ``spd_host.models.load_base_model(pretrained_model_name)`` loads the published
weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from spd_adapters.spd.config import SpdRunConfig
from spd_adapters.spd.formats import ModuleSpec
from spd_host.errors import FormatError, SourceNotFoundError

if TYPE_CHECKING:
    from spd_adapters.spd.targets.configs import TargetConfig
    from spd_adapters.spd.targets.run_reader import PretrainRun


def goodfire_model_type(config: SpdRunConfig) -> str | None:
    """``model_type`` when the run's target is one of Goodfire's own models, else None."""
    from spd_adapters.spd.targets.classes import target_model_type

    return target_model_type(config.pretrained_model_class)


def model_class(config: SpdRunConfig) -> type[Any]:
    """Resolve ``pretrained_model_class`` (a ``transformers`` model class only)."""
    name = config.pretrained_model_class
    module, _, attr = name.rpartition(".")
    if module != "transformers" or not attr:
        raise FormatError(
            f"pretrained_model_class {name!r} is not a transformers class nor one of "
            "Goodfire's target models",
            hint="spd-host loads base models through transformers (e.g. transformers.GPT2LMHeadModel, "
            "transformers.LlamaForCausalLM, transformers.AutoModelForCausalLM) or as Goodfire's "
            "spd.pretrain.models.{llama_simple.LlamaSimple, llama_simple_mlp.LlamaSimpleMLP, "
            "gpt2_simple.GPT2Simple}",
        )
    return transformers_model_class(attr, what=f"pretrained_model_class {name!r}")


def transformers_model_class(attr: str, *, what: str) -> type[Any]:
    """``transformers.<attr>`` if it is a model class (never a function such as ``pipeline``)."""
    import transformers
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    cls = getattr(transformers, attr, None)
    if cls is None:
        raise FormatError(f"{what}: transformers has no {attr!r}")
    if not (
        isinstance(cls, type)
        and issubclass(cls, transformers.PreTrainedModel | _BaseAutoModelClass)
    ):
        raise FormatError(
            f"{what} is not a transformers model class",
            hint="name a model class (e.g. transformers.LlamaForCausalLM), not a function or "
            "another kind of object",
        )
    return cls


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


def _goodfire_run(config: SpdRunConfig) -> PretrainRun:
    """The target's pretrain run, without its weights (configs and tokenizer only)."""
    from spd_adapters.spd.targets.run_reader import locate

    return locate(base_model_name(config), weights=False)


def _goodfire_config(config: SpdRunConfig, model_type: str) -> TargetConfig:
    from spd_adapters.spd.targets.loading import read_config

    return read_config(_goodfire_run(config), model_type)


def build_skeleton(config: SpdRunConfig) -> nn.Module:
    """The base model's structure on the meta device (no memory, no weights) for addresses."""
    model_type = goodfire_model_type(config)
    if model_type is not None:
        from spd_adapters.spd.targets.loading import skeleton

        return skeleton(_goodfire_config(config, model_type))
    with torch.device("meta"):
        return _instantiate(config)


def _load_goodfire(
    config: SpdRunConfig, model_type: str, target_state: Mapping[str, Tensor], where: Path | str
) -> nn.Module:
    """From the SPD checkpoint's ``target_model.*`` when present, else the pretrain checkpoint."""
    from spd_adapters.spd.targets.loading import load_model, load_pretrained, read_config

    if not target_state:
        return load_pretrained(model_type, base_model_name(config))
    cfg = read_config(_goodfire_run(config), model_type)
    return load_model(cfg, target_state, where=f"{where} (target_model.*)")


def load_base(
    config: SpdRunConfig, target_state: Mapping[str, Tensor], *, where: Path | str
) -> nn.Module:
    """The frozen base model, from the checkpoint's ``target_model.*`` weights when present."""
    model_type = goodfire_model_type(config)
    if model_type is not None:
        return _load_goodfire(config, model_type, target_state, where)
    if not target_state:
        from spd_host.models import load_base_model

        return load_base_model(base_model_name(config))
    model = _instantiate(config)
    expected = model.state_dict()
    for key, tensor in target_state.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise FormatError(
                f"{where}: tensor 'target_model.{key}' has shape {list(tensor.shape)}, expected "
                f"{list(expected[key].shape)} from the config of {base_model_name(config)!r}",
                hint="pretrained_model_name must name the model the run decomposed",
            )
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


def load_tokenizer(config: SpdRunConfig) -> Any:
    """The run's tokenizer: ``tokenizer_name`` (else the base model's own).

    For a Goodfire target the pretrain run's saved tokenizer is also a candidate (see
    ``spd_adapters.spd.targets.tokenizer`` for the order).
    """
    from spd_host.models import load_tokenizer as load_named

    if goodfire_model_type(config) is None:
        return load_named(config.tokenizer_name or base_model_name(config))
    from spd_adapters.spd.targets.tokenizer import load_pretrain_tokenizer

    return load_pretrain_tokenizer(_goodfire_run(config), config.tokenizer_name)


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
