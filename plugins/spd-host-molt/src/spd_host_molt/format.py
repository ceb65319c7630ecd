"""Reading a MOLT directory in the Llamascopium on-disk layout.

Llamascopium (OpenMOSS, formerly ``lm-saes``) saves a sparse dictionary as a directory::

    config.json               {"sae_type": "molt", "d_model", "expansion_factor", "act_fn",
                               "rank_distribution": {"<rank>": <ratio>, ...}, "hook_point_in",
                               "hook_point_out", "use_decoder_bias", "norm_activation",
                               "sparsity_include_decoder_norm", "top_k", ...}
    sae_weights.safetensors   W_E [d_model, n], b_E [n],
                              U_matrices.<r> [n_r, d_model, r], V_matrices.<r> [n_r, r, d_model],
                              b_D [d_model] (iff use_decoder_bias),
                              activation_function.log_jumprelu_threshold [n] (iff act_fn=jumprelu),
                              dataset_average_activation_norm.<hook point> [] (scalars)
    lm_config.json            {"model_name", "model_from_pretrained_path", ...} (the base model)

Features are numbered rank group by rank group, ranks ascending (Llamascopium's
``available_ranks`` is ``sorted(rank_distribution)``), and in tensor order within a group.
Weights are read with ``safetensors`` only; ``.pt`` checkpoints are refused (never unpickle).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spd_host.errors import FormatError, SourceNotFoundError

CONFIG_FILE = "config.json"
LM_CONFIG_FILE = "lm_config.json"
# Llamascopium's own search order for the weights of a local directory (safetensors entries only).
WEIGHT_CANDIDATES = (
    "sae_weights.safetensors",
    "checkpoints/pruned.safetensors",
    "checkpoints/final.safetensors",
)
SUPPORTED_ACT_FNS = ("relu", "jumprelu", "topk")
SUPPORTED_NORMS = ("inference", "dataset-wise")
ALLOW_PATTERNS = (CONFIG_FILE, LM_CONFIG_FILE, *WEIGHT_CANDIDATES)


@dataclass(frozen=True)
class MoltConfig:
    """The part of Llamascopium's ``MOLTConfig`` that inference needs."""

    d_model: int
    ranks: tuple[int, ...]  # ascending, one entry per rank group present on disk
    act_fn: str
    hook_point_in: str
    hook_point_out: str
    use_decoder_bias: bool
    norm_activation: str
    sparsity_include_decoder_norm: bool
    top_k: int
    raw: dict[str, Any]


@dataclass
class MoltWeights:
    """Tensors of one MOLT, grouped by rank (``U[r]``, ``V[r]``), plus the encoder."""

    W_E: torch.Tensor  # [d_model, n]
    b_E: torch.Tensor  # noqa: N815  [n] (Llamascopium's tensor names)
    U: dict[int, torch.Tensor]  # r -> [n_r, d_model, r]
    V: dict[int, torch.Tensor]  # r -> [n_r, r, d_model]
    b_D: torch.Tensor | None  # noqa: N815  [d_model]
    jumprelu_threshold: torch.Tensor | None  # [n] = exp(log_jumprelu_threshold)
    norm_in: float | None  # dataset-average activation norm of the input hook (dataset-wise)
    norm_out: float | None

    @property
    def n_features(self) -> int:
        return int(self.W_E.shape[1])

    def rank_of_features(self) -> list[int]:
        """The rank of each feature, in feature order."""
        return [r for r in sorted(self.U) for _ in range(self.U[r].shape[0])]


def read_config(root: Path) -> MoltConfig:
    path = root / CONFIG_FILE
    if not path.is_file():
        raise SourceNotFoundError(
            f"{root} has no {CONFIG_FILE}: not a Llamascopium MOLT directory",
            hint="point molt:<dir> at the directory that holds config.json and sae_weights.safetensors",
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    sae_type = raw.get("sae_type")
    if sae_type != "molt":
        raise FormatError(
            f"{path}: sae_type is {sae_type!r}, expected 'molt'",
            hint="this directory holds another kind of sparse dictionary; use the matching method "
            "(e.g. transcoder:<dir> for an SAE or transcoder)",
        )
    for key in ("d_model", "hook_point_in", "hook_point_out", "rank_distribution"):
        if key not in raw:
            raise FormatError(f"{path}: missing key {key!r} (Llamascopium MOLTConfig field)")
    dist = raw["rank_distribution"]
    try:
        ranks = tuple(sorted(int(k) for k in dist))
    except (TypeError, ValueError) as err:
        raise FormatError(
            f"{path}: rank_distribution must map integer ranks to ratios, got {dist!r}"
        ) from err
    if not ranks or any(r <= 0 for r in ranks):
        raise FormatError(f"{path}: rank_distribution must name positive ranks, got {dist!r}")
    act_fn = str(raw.get("act_fn", "relu")).lower()
    if act_fn not in SUPPORTED_ACT_FNS:
        raise FormatError(
            f"{path}: act_fn {act_fn!r} is not supported for inference",
            hint=f"supported: {', '.join(SUPPORTED_ACT_FNS)} (batch-level top-k depends on the "
            "batch, so it has no per-token meaning at harvest time)",
        )
    norm = str(raw.get("norm_activation", "dataset-wise"))
    if norm not in SUPPORTED_NORMS:
        raise FormatError(
            f"{path}: norm_activation {norm!r} is not supported",
            hint="save the MOLT with fold_activation_scale=True (norm_activation='inference') or "
            "with dataset-wise norms stored in the weights",
        )
    return MoltConfig(
        d_model=int(raw["d_model"]),
        ranks=ranks,
        act_fn=act_fn,
        hook_point_in=str(raw["hook_point_in"]),
        hook_point_out=str(raw["hook_point_out"]),
        use_decoder_bias=bool(raw.get("use_decoder_bias", True)),
        norm_activation=norm,
        sparsity_include_decoder_norm=bool(raw.get("sparsity_include_decoder_norm", True)),
        top_k=int(raw.get("top_k", 50)),
        raw=raw,
    )


def read_lm_config(root: Path) -> dict[str, Any]:
    """``lm_config.json`` next to the weights (or, as Llamascopium also looks, one level up)."""
    for candidate in (root / LM_CONFIG_FILE, root.parent / LM_CONFIG_FILE):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except json.JSONDecodeError as err:
                raise FormatError(f"{candidate}: not valid JSON ({err})") from err
            if not isinstance(data, dict):
                raise FormatError(f"{candidate}: expected a JSON object")
            return data
    return {}


def base_model_of(lm_config: dict[str, Any]) -> str | None:
    path = lm_config.get("model_from_pretrained_path")
    return (
        str(path)
        if path
        else (str(lm_config["model_name"]) if lm_config.get("model_name") else None)
    )


def weights_file(root: Path) -> Path:
    for rel in WEIGHT_CANDIDATES:
        if (root / rel).is_file():
            return root / rel
    pts = sorted(p.name for p in root.glob("*.pt"))
    hint = (
        f"found {', '.join(pts)}: convert it to safetensors (this plugin never unpickles)"
        if pts
        else "save the MOLT with Llamascopium's save_pretrained, which writes sae_weights.safetensors"
    )
    raise FormatError(f"{root}: no MOLT weights ({' / '.join(WEIGHT_CANDIDATES)})", hint=hint)


def read_weights(root: Path, cfg: MoltConfig) -> MoltWeights:
    """Load and check every tensor against the config; errors name the file and tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = weights_file(root)
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise FormatError(f"{path}: not a readable safetensors file ({err})") from err

    def get(name: str) -> torch.Tensor:
        if name not in sd:
            present = ", ".join(sorted(sd)[:12])
            raise FormatError(
                f"{path}: missing tensor {name!r}", hint=f"tensors present: {present}"
            )
        return sd[name].float()

    def expect(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(t.shape) != shape:
            raise FormatError(
                f"{path}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}",
                hint="the config.json and the weights do not belong together",
            )

    d = cfg.d_model
    W_E = get("W_E")
    if W_E.ndim != 2 or W_E.shape[0] != d:
        raise FormatError(
            f"{path}: tensor 'W_E' has shape {list(W_E.shape)}, expected [{d}, n_features]",
            hint="Llamascopium stores the encoder as [d_model, d_sae] (x @ W_E)",
        )
    n = int(W_E.shape[1])
    b_E = get("b_E")
    expect("b_E", b_E, (n,))
    U: dict[int, torch.Tensor] = {}
    V: dict[int, torch.Tensor] = {}
    for r in cfg.ranks:
        u_name, v_name = f"U_matrices.{r}", f"V_matrices.{r}"
        if u_name not in sd and v_name not in sd:
            continue  # Llamascopium skips empty rank groups
        u, v = get(u_name), get(v_name)
        if u.ndim != 3:
            raise FormatError(
                f"{path}: tensor {u_name!r} must be [n_r, {d}, {r}], got {list(u.shape)}"
            )
        expect(u_name, u, (u.shape[0], d, r))
        expect(v_name, v, (u.shape[0], r, d))
        U[r], V[r] = u, v
    extra_groups = sorted(
        k
        for k in sd
        if k.startswith(("U_matrices.", "V_matrices.")) and int(k.split(".")[1]) not in U
    )
    if extra_groups:
        raise FormatError(
            f"{path}: tensors {extra_groups} belong to ranks missing from config rank_distribution"
        )
    total = sum(int(u.shape[0]) for u in U.values())
    if total != n:
        raise FormatError(
            f"{path}: the rank groups hold {total} transforms but W_E has {n} features",
            hint="U_matrices.<r> counts must add up to d_sae",
        )
    b_D = None
    if cfg.use_decoder_bias:
        b_D = get("b_D")
        expect("b_D", b_D, (d,))
    thr = None
    if cfg.act_fn == "jumprelu":
        log_thr = get("activation_function.log_jumprelu_threshold")
        expect("activation_function.log_jumprelu_threshold", log_thr, (n,))
        thr = log_thr.exp()
    norm_in = norm_out = None
    if cfg.norm_activation == "dataset-wise":
        norm_in = _scalar(sd, path, f"dataset_average_activation_norm.{cfg.hook_point_in}")
        norm_out = _scalar(sd, path, f"dataset_average_activation_norm.{cfg.hook_point_out}")
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FormatError(f"{path}: tensor {name!r} contains NaN or inf")
    return MoltWeights(W_E, b_E, U, V, b_D, thr, norm_in, norm_out)


def _scalar(sd: dict[str, torch.Tensor], path: Path, name: str) -> float:
    if name not in sd or sd[name].numel() != 1:
        raise FormatError(
            f"{path}: norm_activation is 'dataset-wise' but scalar {name!r} is missing",
            hint="save with fold_activation_scale=True, or keep the dataset_average_activation_norm entries",
        )
    value = float(sd[name].item())
    if not math.isfinite(value) or value <= 0:
        raise FormatError(f"{path}: {name!r} must be a positive number, got {value}")
    return value
