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
GLOBAL_FN_TYPES = ("global_shared_mlp", "global_shared_transformer", "global_reverse_residual")
CI_MODES = ("layerwise", "global")
IDENTITY_NAME = "pre_identity"  # attribute name of an inserted identity module
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


class AttnConfig(_Tolerant):
    """Bidirectional multi-head self-attention with RoPE inside a CI function (``AttnConfig``)."""

    n_heads: int = Field(gt=0)
    max_len: int = Field(default=2048, gt=0)
    rope_base: float = 10000.0


class SharedTransformerConfig(_Tolerant):
    """``simple_transformer_ci_cfg`` of a ``global_shared_transformer`` CI function."""

    d_model: int = Field(gt=0)
    n_blocks: int = Field(gt=0)
    # The reference declares a list; its CI function reads None as [4 * d_model].
    mlp_hidden_dim: list[int] | None = None
    attn_config: AttnConfig

    def mlp_dims(self) -> list[int]:
        return list(self.mlp_hidden_dim) if self.mlp_hidden_dim is not None else [4 * self.d_model]


class BlockGroup(_Tolerant):
    """One block of a ``global_reverse_residual`` CI function: modules read together."""

    name: str
    patterns: list[str]


class CiConfig(_Tolerant):
    """``ci_config``: ``mode`` layerwise (mlp / vector_mlp / shared_mlp) or global
    (global_shared_mlp / global_shared_transformer / global_reverse_residual).

    Fields a fn type does not use may be absent or null (real configs write them as null).
    """

    mode: Literal["layerwise", "global"] = "layerwise"
    fn_type: str
    hidden_dims: list[int] | None = None
    # global_reverse_residual
    reader_hidden_dims: list[int] | None = None
    d_resid_ci_fn: int | None = Field(default=None, gt=0)
    block_groups: list[BlockGroup] | None = None
    transition_attn_config: AttnConfig | None = None
    transition_hidden_dim: int | None = Field(default=None, gt=0)
    # global_shared_transformer
    simple_transformer_ci_cfg: SharedTransformerConfig | None = None

    @property
    def causal(self) -> bool:
        """False when the CI function attends over the sequence (it then sees later tokens)."""
        if self.fn_type == "global_shared_transformer":
            return False
        return not (self.fn_type == "global_reverse_residual" and self.transition_attn_config)


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
    ci_alive_threshold: float = 0.0
    eval_metric_configs: list[dict[str, Any]] | None = None
    pretrained_model_class: str
    pretrained_model_name: str | None = None
    pretrained_model_path: str | None = None
    pretrained_model_output_attr: str | None = None
    tokenizer_name: str | None = None
    task_config: TaskConfig | None = None
    seed: int = 0

    def all_module_info(self) -> list[ModuleInfo]:
        """``module_info`` then one ``<pattern>.pre_identity`` entry per identity pattern.

        The reference inserts an identity module named ``pre_identity`` into every module an
        ``identity_module_info`` pattern matches and decomposes it like any other module.
        """
        out = list(self.module_info)
        for info in self.identity_module_info or []:
            out.append(
                ModuleInfo(module_pattern=f"{info.module_pattern}.{IDENTITY_NAME}", C=info.C)
            )
        return out


def _output_attr(extract: Any) -> str | None:
    """torch-era param-decomp's ``target.output_extract`` (``"logits"``, an int index into a
    tuple output, or None) in SPD's ``pretrained_model_output_attr`` spelling (``idx_<n>``)."""
    if isinstance(extract, bool) or extract is None:
        return None
    if isinstance(extract, int):
        return f"idx_{extract}"
    return str(extract)


def _section(d: dict[str, Any], key: str) -> dict[str, Any]:
    value = d.get(key)
    return value if isinstance(value, dict) else {}


def migrate_experiment_config(raw: dict[str, Any]) -> dict[str, Any]:
    """torch-era param-decomp's ``experiment_config.yaml`` (``param_decomp_lab``:
    ``target.spec {kind: hf | pretrained, model_class, model_name | run_path}``,
    ``target.output_extract`` (default ``logits``), ``data`` (``LMDataConfig``: ``dataset_name``,
    ``tokenizer_name``, ``column_name``, ``max_seq_len`` 512, ``is_tokenized``) and ``pd``
    (``PDConfig``: ``ci_config``, ``decomposition_targets``, ``identity_decomposition_targets``,
    ``sigmoid_type`` default ``leaky_hard``, ``sampling`` default ``continuous``, ``seed``)) as
    the flat SPD schema; the checkpoint (``model_<step>.pth``) is the same ComponentModel
    state dict. Other documents are returned unchanged."""
    pd = raw.get("pd")
    if "module_info" in raw or not isinstance(pd, dict) or "decomposition_targets" not in pd:
        return raw
    target = _section(raw, "target")
    spec = _section(target, "spec")
    data = _section(raw, "data")
    d: dict[str, Any] = {
        "module_info": pd["decomposition_targets"],
        "identity_module_info": pd.get("identity_decomposition_targets"),
        "ci_config": pd.get("ci_config"),
        "sigmoid_type": pd.get("sigmoid_type", "leaky_hard"),
        "sampling": pd.get("sampling", "continuous"),
        "seed": pd.get("seed", 0),
        "pretrained_model_class": spec.get("model_class"),
        "pretrained_model_name": spec.get("model_name") or spec.get("run_path"),
        "pretrained_model_output_attr": _output_attr(target.get("output_extract", "logits")),
        "tokenizer_name": data.get("tokenizer_name"),
        "task_config": {
            "task_name": "lm",
            "max_seq_len": data.get("max_seq_len", 512),
            "dataset_name": data.get("dataset_name"),
            "column_name": data.get("column_name", "text"),
            "is_tokenized": data.get("is_tokenized", False),
        },
    }
    for key in ("eval_metric_configs", "ci_alive_threshold"):
        if key in raw:
            d[key] = raw[key]
    return {k: v for k, v in d.items() if v is not None}


def migrate_legacy_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Rewrite old key names to the current schema (returns a new dict)."""
    d = dict(migrate_experiment_config(raw))
    # spd before the gate -> ci_fn rename (Oct 2025): gate_type / gate_hidden_dims
    for old, new in (("gate_type", "ci_fn_type"), ("gate_hidden_dims", "ci_fn_hidden_dims")):
        if old in d and new not in d:
            d[new] = d.pop(old)
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


def _check_fn_type_first(d: dict[str, Any], *, where: Path | str) -> None:
    """An unsupported CI fn type is the real cause; report it before any field-level error."""
    ci = d.get("ci_config")
    if not isinstance(ci, dict):
        return
    mode, fn_type = ci.get("mode", "layerwise"), ci.get("fn_type")
    if mode not in CI_MODES:
        raise FormatError(
            f"{where}: unsupported ci_config.mode {mode!r}",
            hint=f"supported: {', '.join(CI_MODES)}",
        )
    allowed = LAYERWISE_FN_TYPES if mode == "layerwise" else GLOBAL_FN_TYPES
    if isinstance(fn_type, str) and fn_type not in allowed:
        raise FormatError(
            f"{where}: unsupported ci_config.fn_type {fn_type!r} for mode {mode!r}",
            hint=f"supported for {mode}: {', '.join(allowed)}",
        )


def _require(ok: bool, where: Path | str, what: str) -> None:
    if not ok:
        raise FormatError(
            f"{where}: {what}",
            hint="final_config.yaml must be the config the SPD trainer validated for this run",
        )


def _check_ci_fields(ci: CiConfig, *, where: Path | str) -> None:
    """The per-fn-type requirements the reference's config validators enforce."""
    t = ci.fn_type
    if ci.mode == "layerwise":
        _require(ci.hidden_dims is not None, where, f"ci_config.hidden_dims is required for {t!r}")
        if t in ("mlp", "vector_mlp"):
            _require(
                bool(ci.hidden_dims),
                where,
                f"ci_config.hidden_dims must be non-empty for fn_type {t!r}",
            )
        return
    if t == "global_shared_mlp":
        _require(ci.hidden_dims is not None, where, f"ci_config.hidden_dims is required for {t!r}")
    elif t == "global_shared_transformer":
        st = ci.simple_transformer_ci_cfg
        _require(
            st is not None, where, f"ci_config.simple_transformer_ci_cfg is required for {t!r}"
        )
        assert st is not None
        heads = st.attn_config.n_heads
        _require(
            st.d_model % heads == 0 and (st.d_model // heads) % 2 == 0,
            where,
            f"ci_config.simple_transformer_ci_cfg: d_model {st.d_model} must split into "
            f"{heads} heads of even width (RoPE)",
        )
    elif t == "global_reverse_residual":
        for name in ("d_resid_ci_fn", "reader_hidden_dims"):
            _require(
                getattr(ci, name) is not None, where, f"ci_config.{name} is required for {t!r}"
            )
        _require(
            bool(ci.block_groups),
            where,
            f"ci_config.block_groups needs at least one block for {t!r}",
        )
        attn = ci.transition_attn_config
        if attn is not None:
            d = ci.d_resid_ci_fn or 0
            _require(
                d % attn.n_heads == 0 and (d // attn.n_heads) % 2 == 0,
                where,
                f"ci_config.d_resid_ci_fn {d} must split into transition_attn_config.n_heads "
                f"{attn.n_heads} heads of even width (RoPE)",
            )


def parse_config(raw: Any, *, where: Path | str) -> SpdRunConfig:
    """Validate a loaded YAML document; every failure names the file and the field."""
    if not isinstance(raw, dict):
        raise FormatError(
            f"{where}: expected a YAML mapping, got {type(raw).__name__}",
            hint="final_config.yaml must be the run's config as the SPD trainer writes it",
        )
    migrated = migrate_legacy_keys(raw)
    _check_fn_type_first(migrated, where=where)
    try:
        cfg = SpdRunConfig.model_validate(migrated)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise FormatError(
            f"{where}: not an SPD run config ({problems})",
            hint="needs module_info, ci_config and pretrained_model_class at least",
        ) from err
    _check_ci_fields(cfg.ci_config, where=where)
    if cfg.sigmoid_type not in SIGMOID_TYPES:
        raise FormatError(
            f"{where}: unsupported sigmoid_type {cfg.sigmoid_type!r}",
            hint=f"supported: {', '.join(SIGMOID_TYPES)}",
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
