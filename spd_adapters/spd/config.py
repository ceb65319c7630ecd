"""The fields of an SPD run's ``final_config.yaml`` that the host needs.

Real configs carry dozens of training options (loss configs, schedules, eval metrics); those are
ignored (``extra="ignore"``) because they do not change what a trained decomposition computes.
Older runs used other key names; :func:`parse_config` migrates them first, mirroring the
reference code's own migrations (``C`` + ``target_module_patterns`` -> ``module_info``;
``ci_fn_type``/``ci_fn_hidden_dims``/``use_global_ci`` -> ``ci_config``;
``pretrained_model_name_hf`` -> ``pretrained_model_name``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spd_host.errors import FormatError
from spd_host.safe_yaml import load_yaml

LAYERWISE_FN_TYPES = ("mlp", "vector_mlp", "shared_mlp")
GLOBAL_FN_TYPES = ("global_shared_mlp",)
SIGMOID_TYPES = (
    "normal",
    "hard",
    "leaky_hard",
    "upper_leaky_hard",
    "lower_leaky_hard",
    "swish_hard",
)


class _Tolerant(BaseModel):
    """Frozen, and ignores keys we do not model (real configs have many)."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class ModuleInfo(_Tolerant):
    module_pattern: str
    C: int = Field(gt=0)


class CiConfig(_Tolerant):
    """``ci_config``: ``mode`` layerwise (mlp / vector_mlp / shared_mlp) or global."""

    mode: Literal["layerwise", "global"] = "layerwise"
    fn_type: str
    hidden_dims: list[int] = Field(default_factory=list)


class TaskConfig(_Tolerant):
    task_name: str = "lm"
    max_seq_len: int | None = None
    dataset_name: str | None = None
    column_name: str | None = None
    is_tokenized: bool | None = None


class SpdRunConfig(_Tolerant):
    """What a trained SPD decomposition is, independent of how it was trained."""

    module_info: list[ModuleInfo] = Field(min_length=1)
    identity_module_info: list[ModuleInfo] | None = None
    ci_config: CiConfig
    sigmoid_type: str = "leaky_hard"
    sampling: str = "continuous"
    pretrained_model_class: str
    pretrained_model_name: str | None = None
    pretrained_model_path: str | None = None
    pretrained_model_output_attr: str | None = None
    tokenizer_name: str | None = None
    task_config: TaskConfig | None = None
    seed: int = 0


def migrate_legacy_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Rewrite old key names to the current schema (returns a new dict)."""
    d = dict(raw)
    if "module_info" not in d and "target_module_patterns" in d:
        C = d.pop("C", None)
        d["module_info"] = [{"module_pattern": p, "C": C} for p in d.pop("target_module_patterns")]
        ident = d.pop("identity_module_patterns", None)
        if ident is not None:
            d["identity_module_info"] = [{"module_pattern": p, "C": C} for p in ident]
    if "ci_config" not in d and any(
        k in d for k in ("ci_fn_type", "ci_fn_hidden_dims", "use_global_ci")
    ):
        fn_type = d.pop("ci_fn_type", "vector_mlp")
        hidden = d.pop("ci_fn_hidden_dims", [8])
        is_global = bool(d.pop("use_global_ci", False)) or str(fn_type).startswith("global_")
        if is_global and not str(fn_type).startswith("global_"):
            fn_type = "global_shared_mlp"
        d["ci_config"] = {
            "mode": "global" if is_global else "layerwise",
            "fn_type": fn_type,
            "hidden_dims": hidden,
        }
    if "pretrained_model_name" not in d and "pretrained_model_name_hf" in d:
        d["pretrained_model_name"] = d.pop("pretrained_model_name_hf")
    return d


def parse_config(raw: Any, *, where: Path | str) -> SpdRunConfig:
    """Validate a loaded YAML document; every failure names the file and the field."""
    if not isinstance(raw, dict):
        raise FormatError(
            f"{where}: expected a YAML mapping, got {type(raw).__name__}",
            hint="final_config.yaml must be the run's config as the SPD trainer writes it",
        )
    try:
        cfg = SpdRunConfig.model_validate(migrate_legacy_keys(raw))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise FormatError(
            f"{where}: not an SPD run config ({problems})",
            hint="needs module_info, ci_config and pretrained_model_class at least",
        ) from err
    ci = cfg.ci_config
    allowed = LAYERWISE_FN_TYPES if ci.mode == "layerwise" else GLOBAL_FN_TYPES
    if ci.fn_type not in allowed:
        raise FormatError(
            f"{where}: unsupported ci_config.fn_type {ci.fn_type!r} for mode {ci.mode!r}",
            hint=f"supported for {ci.mode}: {', '.join(allowed)}",
        )
    if ci.mode == "layerwise" and ci.fn_type in ("mlp", "vector_mlp") and not ci.hidden_dims:
        raise FormatError(
            f"{where}: ci_config.hidden_dims must be non-empty for fn_type {ci.fn_type!r}",
            hint="the reference CI function needs at least one hidden layer for this type",
        )
    if cfg.sigmoid_type not in SIGMOID_TYPES:
        raise FormatError(
            f"{where}: unsupported sigmoid_type {cfg.sigmoid_type!r}",
            hint=f"supported: {', '.join(SIGMOID_TYPES)}",
        )
    if cfg.identity_module_info:
        raise FormatError(
            f"{where}: identity_module_info (inserted identity modules) is not supported yet",
            hint="decompositions of inserted identity operations cannot be loaded by spd-host",
        )
    return cfg


def load_config(path: Path) -> SpdRunConfig:
    """Read and validate ``final_config.yaml``."""
    if not path.is_file():
        raise FormatError(
            f"SPD run config not found: {path}",
            hint="an SPD run directory holds final_config.yaml next to model_<step>.pth",
        )
    try:
        raw = load_yaml(path.read_text(), path)  # refuses alias bombs
    except yaml.YAMLError as err:
        raise FormatError(f"{path}: invalid YAML: {err}") from err
    return parse_config(raw, where=path)
