"""The frozen target of a param-decomp run, and where its sites and taps live in torch.

Checkpoints never hold the target: ``target.spec`` names it. :func:`load_target` is the one
place a spec becomes a torch model: ``kind: hf`` (``model_name`` is a Hub name, resolved
through the normal cache, or a local model directory) and ``kind: pretrained`` (Goodfire's own
pretrain targets: a loader registered with :func:`set_pretrained_target_loader`, else
``spd_adapters.spd.targets``' reader of the pretrain run ``run_path``).

Site names are decoder-relative module paths (``layers.0.mlp.gate_proj``); in a transformers
``*ForCausalLM`` they sit under the decoder (``model.layers.0.mlp.gate_proj``). Every tap is the
*input* of one module: ``resid.{b}`` enters ``layers.{b}`` (``resid.{n_layer}`` enters the final
norm), ``attn_in``/``attn_out``/``mlp_in``/``mlp_hidden`` enter q_proj/o_proj/gate_proj/down_proj.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spd_adapters.spd.param_decomp.launch_config import LaunchConfig
from spd_host.errors import FormatError, SourceNotFoundError

# The module (relative to a block) whose input each per-block tap is, per site family.
_TAP_MODULE = {
    "glu_transformer": {
        "attn_in": "self_attn.q_proj",
        "attn_out": "self_attn.o_proj",
        "post_attn": "post_attention_layernorm",
        "mlp_in": "mlp.gate_proj",
        "mlp_hidden": "mlp.down_proj",
    },
    "simple_mlp": {
        "attn_in": "attn.q_proj",
        "attn_out": "attn.o_proj",
        "post_attn": "rms_2",
        "mlp_in": "mlp.c_fc",
        "mlp_hidden": "mlp.down_proj",
    },
    # the qwen36_moe family's CI reads residual-stream taps only
    "qwen36_moe": {},
}
# (block container, final norm) names, per site family.
# qwen36_moe: the module a tap enters, on (gated-DeltaNet, full-attention) layers; the MoE
# block's input is its normed input (there is no dense MLP hidden, param-decomp's grammar).
_QWEN36_TAP_MODULE = {
    "attn_in": ("linear_attn.in_proj_qkv", "self_attn.q_proj"),
    "attn_out": ("linear_attn.out_proj", "self_attn.o_proj"),
    "mlp_in": ("mlp", "mlp"),
}

_DECODER = {
    "glu_transformer": ("layers", "norm"),
    "simple_mlp": ("h", "ln_f"),
    "qwen36_moe": ("layers", "norm"),
}

PretrainedLoader = Callable[[dict[str, Any]], nn.Module]
_PRETRAINED_LOADER: list[PretrainedLoader] = []


#: ``target.spec.kind`` values of param-decomp's LM schema (``LMTargetSpec``), all loaded here
TARGET_KINDS = ("hf", "hf_weights_in_vendored", "pretrained", "pretrained_qwen35_moe")


def set_pretrained_target_loader(loader: PretrainedLoader | None) -> None:
    """Wire Goodfire's own pretrain targets (``target.spec.kind: pretrained``): ``loader``
    takes the ``target.spec`` mapping (``model_class``, ``run_path``) and returns the frozen
    torch model (eval mode) whose module names follow the run's site family."""
    _PRETRAINED_LOADER.clear()
    if loader is not None:
        _PRETRAINED_LOADER.append(loader)


def target_name(cfg: LaunchConfig) -> str:
    spec = cfg.target.spec
    name = spec.get("model_name") or spec.get("run_path")
    return str(name) if name else f"<{spec.get('kind')} target>"


def _hf_spec(cfg: LaunchConfig) -> tuple[str, str]:
    spec = cfg.target.spec
    kind = spec.get("kind")
    if kind not in ("hf", "hf_weights_in_vendored"):
        raise FormatError(
            f"target.spec.kind={kind!r} is not a target kind spd-host loads",
            hint="param-decomp's target kinds, all loadable: " + ", ".join(TARGET_KINDS),
        )
    name, cls = spec.get("model_name"), spec.get("model_class")
    if not isinstance(name, str) or not isinstance(cls, str):
        raise FormatError("target.spec needs model_name and model_class")
    return name, cls


def _hf_class(cls_name: str) -> Any:
    from spd_adapters.spd.base import transformers_model_class

    module, _, attr = cls_name.rpartition(".")
    if module != "transformers":
        # The vendored Llama is the HF Llama architecture with HF weights.
        attr = "LlamaForCausalLM" if attr == "VendoredLlama" else attr
    return transformers_model_class(attr, what=f"target.spec.model_class {cls_name!r}")


def hf_config(cfg: LaunchConfig) -> Any:
    from transformers import AutoConfig

    from spd_host.models import resolve_model_source

    name, _ = _hf_spec(cfg)
    source = resolve_model_source(name)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise SourceNotFoundError(
            f"cannot read the Hugging Face config of the run's target {name!r}: {err}",
            hint="make the model available in the local HF cache, or point target.spec.model_name "
            "at a local model directory",
        ) from err


def _is_pretrained(cfg: LaunchConfig) -> bool:
    return cfg.target.spec.get("kind") == "pretrained"


def _qwen35_entry(cfg: LaunchConfig, run_dir: Path | None) -> Path | None:
    """The pretrain-cache entry of a ``pretrained_qwen35_moe`` target (None for other kinds)."""
    if cfg.target.spec.get("kind") != "pretrained_qwen35_moe":
        return None
    from spd_adapters.spd.param_decomp import qwen35_pretrained

    run_path = cfg.target.spec.get("run_path")
    if not isinstance(run_path, str):
        raise FormatError("target.spec (kind: pretrained_qwen35_moe) needs run_path")
    return qwen35_pretrained.locate_entry(run_path, run_dir)


def _load_pretrained(cfg: LaunchConfig) -> nn.Module:
    """A registered loader if any, else Goodfire's target models of ``spd_adapters.spd.targets``
    (``model_class``'s last part is the model type, ``run_path`` the pretrain run)."""
    spec = dict(cfg.target.spec)
    if _PRETRAINED_LOADER:
        return _PRETRAINED_LOADER[0](spec)
    model_class, run_path = spec.get("model_class"), spec.get("run_path")
    if not isinstance(model_class, str) or not isinstance(run_path, str):
        raise FormatError("target.spec (kind: pretrained) needs model_class and run_path")
    try:
        from spd_adapters.spd.targets.loading import load_pretrained
    except ImportError as err:
        raise FormatError(
            f"target.spec.kind='pretrained' ({model_class}, {run_path}): no loader for "
            "Goodfire's own pretrain targets is available",
            hint="spd_adapters.spd.param_decomp.target.set_pretrained_target_loader",
        ) from err
    return load_pretrained(model_class.rsplit(".", 1)[-1], run_path)


def build_skeleton(cfg: LaunchConfig, run_dir: Path | None = None) -> nn.Module:
    """The target's structure (HF: on the meta device, no weights; a pretrained target comes
    from its loader). ``run_dir``: where a ``pretrained_qwen35_moe`` entry is looked for."""
    if _is_pretrained(cfg):
        return _load_pretrained(cfg)
    entry = _qwen35_entry(cfg, run_dir)
    if entry is not None:
        from spd_adapters.spd.param_decomp import qwen35_pretrained

        return qwen35_pretrained.build(entry, weights=False)
    _, cls_name = _hf_spec(cfg)
    cls = _hf_class(cls_name)
    config = hf_config(cfg)
    if cfg.decomposition.sites.kind == "qwen36_moe" and hasattr(config, "text_config"):
        # The Hub snapshot (Qwen/Qwen3.6-35B-A3B) is the composite image-text config; the
        # *ForCausalLM target is its text decoder (transformers maps the weights on load).
        config = config.get_text_config()
    with torch.device("meta"):
        if hasattr(cls, "from_config"):
            return cls.from_config(config)  # type: ignore[no-any-return]
        return cls(config)  # type: ignore[no-any-return]


def load_target_tokenizer(cfg: LaunchConfig, run_dir: Path | None = None) -> Any:
    """``data.tokenizer_name`` (older configs) or the target's own: the HF model's tokenizer, or
    a pretrained target's pretrain-run tokenizer (``spd_adapters.spd.targets.tokenizer``)."""
    from spd_host.models import load_tokenizer

    name = cfg.data.tokenizer_name if cfg.data else None
    entry = _qwen35_entry(cfg, run_dir)
    if entry is not None:
        from spd_adapters.spd.param_decomp import qwen35_pretrained

        return qwen35_pretrained.load_tokenizer(entry, name)
    if _is_pretrained(cfg) and not _PRETRAINED_LOADER:
        run_path = cfg.target.spec.get("run_path")
        try:
            from spd_adapters.spd.targets.run_reader import locate
            from spd_adapters.spd.targets.tokenizer import load_pretrain_tokenizer
        except ImportError:
            pass
        else:
            if isinstance(run_path, str):
                return load_pretrain_tokenizer(locate(run_path), name)
    return load_tokenizer(name or target_name(cfg))


def load_target(cfg: LaunchConfig, run_dir: Path | None = None) -> nn.Module:
    """The frozen target model (eval mode, fp32, no grads) named by ``target.spec``."""
    from spd_host.models import load_base_model

    if _is_pretrained(cfg):
        return _load_pretrained(cfg)
    entry = _qwen35_entry(cfg, run_dir)
    if entry is not None:
        from spd_adapters.spd.param_decomp import qwen35_pretrained

        return qwen35_pretrained.build(entry, weights=True)
    name, _ = _hf_spec(cfg)
    return load_base_model(name)


@dataclass(frozen=True)
class TargetLayout:
    """Where a decoder's blocks sit inside the torch model."""

    prefix: str  # "model." for transformers *ForCausalLM
    n_layer: int
    norm_path: str
    family: str = "glu_transformer"
    container: str = "layers"
    full_attention: frozenset[int] = frozenset()  # qwen36_moe: the self_attn layers

    def site_path(self, site: str) -> str:
        return f"{self.prefix}{site}"

    def tap_path(self, tap: str) -> str:
        name, _, block = tap.rpartition(".")
        if not block.isdigit():
            raise FormatError(f"malformed CI input tap {tap!r}")
        b = int(block)
        if name == "resid":
            if not 0 <= b <= self.n_layer:
                raise FormatError(f"CI input tap {tap!r} outside 0..{self.n_layer}")
            return self.norm_path if b == self.n_layer else f"{self.prefix}{self.container}.{b}"
        if self.family == "qwen36_moe":
            pair = _QWEN36_TAP_MODULE.get(name)
            if pair is None or not 0 <= b < self.n_layer:
                raise FormatError(f"unknown qwen36_moe CI input tap {tap!r}")
            return f"{self.prefix}{self.container}.{b}.{pair[b in self.full_attention]}"
        modules = _TAP_MODULE[self.family]
        if name not in modules or not 0 <= b < self.n_layer:
            raise FormatError(f"unknown CI input tap {tap!r}")
        return f"{self.prefix}{self.container}.{b}.{modules[name]}"


def layout_of(model: nn.Module, family: str = "glu_transformer") -> TargetLayout:
    """Where the blocks of a ``family`` decoder sit (``layers`` + ``norm``, or ``h`` + ``ln_f``)."""
    container, norm_name = _DECODER[family]
    names = dict(model.named_modules())
    for path, module in names.items():
        if path.split(".")[-1] == container and isinstance(module, nn.ModuleList):
            prefix = path[: -len(container)]
            norm = f"{prefix}{norm_name}"
            if norm in names:
                full = frozenset(
                    i for i in range(len(module)) if f"{prefix}{container}.{i}.self_attn" in names
                )
                return TargetLayout(prefix, len(module), norm, family, container, full)
    raise FormatError(
        f"{type(model).__name__}: no decoder `{container}` ModuleList with a final "
        f"`{norm_name}` — not a {family} target"
    )


def linear_dims(model: nn.Module, path: str) -> tuple[int, int]:
    try:
        module = model.get_submodule(path)
    except AttributeError as err:
        raise FormatError(f"the target has no module {path!r} for a decomposed site") from err
    if not isinstance(module, nn.Linear):
        raise FormatError(f"decomposed site {path!r} is a {type(module).__name__}, not a Linear")
    return module.in_features, module.out_features


def tap_width(model: nn.Module, layout: TargetLayout, tap: str) -> int:
    """Feature width of a tap: the input width of the module it enters."""
    module = model.get_submodule(layout.tap_path(tap))
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 1:  # a norm
        return int(weight.shape[0])
    # A block's input is the residual stream: as wide as the final norm (or the HF config says).
    norm_weight = getattr(model.get_submodule(layout.norm_path), "weight", None)
    if isinstance(norm_weight, torch.Tensor) and norm_weight.ndim == 1:
        return int(norm_weight.shape[0])
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int):
        return hidden
    raise FormatError(f"cannot tell the width of CI input tap {tap!r}")
