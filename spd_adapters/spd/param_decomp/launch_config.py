"""The parts of a param-decomp run config the host needs: target, decomposed sites, CI function.

A run directory pins its whole config as ``launch_config.yaml`` (older runs: ``config.yaml``).
Real configs also carry the trainer's sections (``pd``, ``runtime``, ``cadence``, ``eval``,
``data`` ...); those do not change what the trained decomposition computes and are ignored.
The CI-function section is modelled strictly enough to rebuild the network: its ``type`` picks
the architecture, and an unknown or unsupported type is reported as such, naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spd_host.errors import FormatError

LAUNCH_CONFIG_FILENAME = "launch_config.yaml"
LEGACY_CONFIG_FILENAME = "config.yaml"
# A finished run's normalised product record (same target/decomposition/data sections);
# param-decomp's own readers prefer it to the launch pin (`experiments/lm/run_data.py`).
DELIVERABLE_FILENAME = "deliverable.yaml"

# Every CI-function type param-decomp's LM schema knows, and the ones computed here.
SUPPORTED_CI_TYPES = (
    "chunkwise_transformer",
    "global_transformer",
    "global_mlp",
    "moe_chunkwise_transformer",
)
KNOWN_CI_TYPES = SUPPORTED_CI_TYPES

# The dense families' matrix vocabularies, in canonical within-block order.
GLU_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
SIMPLE_MLP_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "down_proj")
# The qwen36_moe family (param-decomp ``targets/qwen36_moe.py``): the gated-DeltaNet kinds sit
# on the linear-attention layers, the attention kinds on the full-attention layers, the MoE
# kinds on every layer; this is the within-layer canonical (computation) order.
QWEN36_MOE_KINDS = (
    "gdn_q",
    "gdn_k",
    "gdn_v",
    "gdn_z",
    "gdn_b",
    "gdn_a",
    "gdn_out",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_o",
    "experts_gate",
    "experts_up",
    "experts_down",
    "shared_gate",
    "shared_up",
    "shared_down",
)
_FAMILY_KINDS = {
    "glu_transformer": GLU_KINDS,
    "simple_mlp": SIMPLE_MLP_KINDS,
    "qwen36_moe": QWEN36_MOE_KINDS,
}


class _Loose(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class AllLayers(_Loose):
    kind: Literal["all"] = "all"


class LayerRange(_Loose):
    """Half-open ``[start, end)``."""

    kind: Literal["range"] = "range"
    start: int = Field(ge=0)
    end: int = Field(gt=0)


class LayerList(_Loose):
    kind: Literal["list"] = "list"
    indices: list[int] = Field(min_length=1)


LayerSelection = Annotated[AllLayers | LayerRange | LayerList, Field(discriminator="kind")]


class SiteSpec(_Loose):
    """``decomposition.sites``: one C per matrix kind, tiled over the selected layers."""

    kind: Literal["glu_transformer", "simple_mlp", "qwen36_moe"]
    layers: LayerSelection
    cs: dict[str, int] = Field(min_length=1)

    def kinds(self) -> tuple[str, ...]:
        """The decomposed kinds in the family's canonical order (the order blocks list them)."""
        order = _FAMILY_KINDS[self.kind]
        unknown = sorted(set(self.cs) - set(order))
        if unknown:
            raise ValueError(f"unknown {self.kind} matrix kinds {unknown}; known: {list(order)}")
        return tuple(k for k in order if k in self.cs)

    def layer_indices(self, n_layer: int) -> tuple[int, ...]:
        sel = self.layers
        if isinstance(sel, AllLayers):
            return tuple(range(n_layer))
        if isinstance(sel, LayerRange):
            if not sel.start < sel.end <= n_layer:
                raise ValueError(f"layer range [{sel.start}, {sel.end}) outside 0..{n_layer}")
            return tuple(range(sel.start, sel.end))
        if sel.indices != sorted(set(sel.indices)) or sel.indices[-1] >= n_layer:
            raise ValueError(f"layer list {sel.indices} must be sorted, unique and < {n_layer}")
        return tuple(sel.indices)


class Attention(_Loose):
    """``attention``: MHA (``n_kv_heads == n_heads``) or GQA; bidirectional or causal mask."""

    kind: Literal["mha", "gqa"]
    n_heads: int = Field(gt=0)
    n_kv_heads: int | None = None
    mask: Literal["bidirectional", "causal"] = "bidirectional"

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.kind == "mha" or self.n_kv_heads is None else self.n_kv_heads


class Ffn(_Loose):
    kind: Literal["gelu", "swiglu"]
    hidden: int = Field(gt=0)


class ResidualBoundaries(_Loose):
    kind: Literal["residual_boundaries"]
    offsets: list[int] = Field(min_length=1)


InputTap = (
    Literal["first_block_resid", "all_block_resids", "all_block_taps", "all_site_inputs"]
    | ResidualBoundaries
)


class ComponentConditioning(_Loose):
    kind: Literal["affine_clipped_component_activation"]


class TransformerCi(_Loose):
    """``decomposition.ci`` for the transformer CI functions (chunkwise and global)."""

    type: Literal["chunkwise_transformer", "global_transformer"]
    d_model: int = Field(gt=0)
    n_blocks: int = Field(ge=0)
    attention: Attention
    ffn: Ffn
    learned_norm_scale: bool = False
    blocks_per_chunk: int | None = Field(default=None, gt=0)
    input_tap: InputTap = "first_block_resid"
    component_conditioning: ComponentConditioning | None = None

    @property
    def attends(self) -> bool:
        """Whether positions see each other (any block); bidirectional => future tokens too."""
        return self.n_blocks > 0


class GlobalMlpCi(_Loose):
    """``decomposition.ci`` of type ``global_mlp``: one pointwise MLP over the raw taps."""

    type: Literal["global_mlp"]
    hidden_dims: list[int] = Field(min_length=1)
    input_tap: InputTap

    component_conditioning: None = None

    @property
    def attends(self) -> bool:
        return False


class MoeTransformerCi(_Loose):
    """``decomposition.ci`` of type ``moe_chunkwise_transformer`` (the qwen36_moe family): one
    chunk per target stage (``blocks_per_chunk`` = the target's ``full_attention_interval``),
    ``n_blocks`` blocks of RoPE attention + a routed expert FFN (one ``n_experts`` SwiGLU bank
    per covered target layer, dispatched by that layer's captured routing) + a dense SwiGLU
    shared expert; expert sites are scored only on their routed experts."""

    type: Literal["moe_chunkwise_transformer"]
    blocks_per_chunk: int = Field(gt=0)
    input_tap: InputTap = "first_block_resid"
    d_model: int = Field(gt=0)
    n_blocks: int = Field(gt=0)
    attention: Attention
    expert_ffn_hidden: int = Field(gt=0)
    shared_ffn_hidden: int = Field(gt=0)
    learned_norm_scale: bool = False

    component_conditioning: None = None

    @property
    def attends(self) -> bool:
        return True


CiConfig = Annotated[TransformerCi | GlobalMlpCi | MoeTransformerCi, Field(discriminator="type")]


class HfTarget(_Loose):
    kind: Literal["hf"] = "hf"
    model_class: str
    model_name: str


class TargetSection(_Loose):
    """``target``: where the frozen model comes from (``spec``) — never saved in checkpoints."""

    spec: dict[str, Any]


class Decomposition(_Loose):
    sites: SiteSpec
    ci: CiConfig


class DataTrain(_Loose):
    kind: str | None = None
    name: str | None = None


class DataSection(_Loose):
    tokenizer_name: str | None = None
    max_seq_len: int | None = None
    dataset_name: str | None = None
    column_name: str | None = None


class LaunchConfig(_Loose):
    run_name: str | None = None
    target: TargetSection
    decomposition: Decomposition
    data: DataSection | None = None


def load_launch_config(path: Path) -> LaunchConfig:
    """Parse a run's pinned config; every problem is a one-line ``FormatError`` naming ``path``."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise FormatError(f"{path}: not a readable YAML file ({err})") from err
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: expected a mapping at the top level")
    decomposition = raw.get("decomposition")
    if not isinstance(decomposition, dict) or "ci" not in decomposition:
        hint = (
            "this looks like the torch-era schema (pd.ci_config / pd.decomposition_targets); "
            "spd-host reads those runs as experiment_config.yaml next to model_<step>.pth, not "
            "next to orbax ckpts/"
            if isinstance(raw.get("pd"), dict) and "ci_config" in raw["pd"]
            else "a param-decomp run config has decomposition.sites and decomposition.ci"
        )
        raise FormatError(f"{path}: no decomposition.ci section", hint=hint)
    ci = decomposition["ci"]
    ci_type = ci.get("type") if isinstance(ci, dict) else None
    if ci_type not in SUPPORTED_CI_TYPES:
        what = "unknown" if ci_type not in KNOWN_CI_TYPES else "unsupported"
        raise FormatError(
            f"{path}: {what} CI function type decomposition.ci.type={ci_type!r}",
            hint=f"spd-host computes: {', '.join(SUPPORTED_CI_TYPES)}",
        )
    sites_kind = (
        decomposition.get("sites", {}).get("kind")
        if isinstance(decomposition.get("sites"), dict)
        else None
    )
    if (ci_type == "moe_chunkwise_transformer") != (sites_kind == "qwen36_moe"):
        raise FormatError(
            f"{path}: unsupported CI function type decomposition.ci.type={ci_type!r} for "
            f"decomposition.sites.kind={sites_kind!r}",
            hint="moe_chunkwise_transformer is the CI function of qwen36_moe sites, and only it",
        )
    try:
        cfg = LaunchConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise FormatError(f"{path}: invalid run config at {loc}: {first['msg']}") from err
    try:
        cfg.decomposition.sites.kinds()
    except ValueError as err:
        raise FormatError(f"{path}: decomposition.sites: {err}") from err
    if cfg.decomposition.sites.kind == "qwen36_moe" and not isinstance(
        cfg.decomposition.sites.layers, AllLayers
    ):
        raise FormatError(
            f"{path}: qwen36_moe sites cover every layer that has each kind",
            hint="decomposition.sites.layers must be {kind: all}",
        )
    ci_cfg = cfg.decomposition.ci
    if (
        isinstance(ci_cfg, TransformerCi)
        and ci_cfg.type == "chunkwise_transformer"
        and not ci_cfg.blocks_per_chunk
    ):
        raise FormatError(f"{path}: chunkwise_transformer needs decomposition.ci.blocks_per_chunk")
    return cfg
