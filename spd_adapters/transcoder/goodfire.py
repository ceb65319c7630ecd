"""Goodfire's transcoder checkpoints (nn_decompositions ``save_checkpoint``) and harvest configs.

What Goodfire's adapters load (``spd/adapters`` on ``spd`` dev, ``param_decomp_lab/adapters``
later), checked against bartbussmann/nn_decompositions, whose trainer writes the files:

- One **artifact** per trained dictionary: a wandb artifact (type ``model``, name
  ``{run name}_checkpoint_{step}``, e.g. ``4096_batchtopk_k32_0.0003_checkpoint_final``) that
  downloads to a directory holding ``config.json`` (the trainer's dataclass, values that are not
  JSON scalars written as ``str(value)``: ``"dtype": "torch.float32"``) and ``encoder.pt`` (a
  plain ``state_dict``, read here with ``torch.load(weights_only=True)``).
- A transcoder's state dict: ``W_enc [input_size, dict_size]``, ``b_enc [dict_size]``,
  ``W_dec [dict_size, output_size]``, ``b_dec [output_size]`` (+ ``jumprelu.log_threshold
  [dict_size]`` for ``encoder_type: jumprelu``). No threshold buffer exists for BatchTopK.
- Maths: ``x' = (x - mean) / (std + 1e-5)`` if ``input_unit_norm``; ``x' -= b_dec`` if
  ``pre_enc_bias`` and ``input_size == output_size``; ``dense = relu(x' @ W_enc + b_enc)``;
  ``batchtopk`` keeps the ``top_k * N`` largest entries of the ``[N, dict_size]`` block of the
  ``N`` tokens encoded together (Goodfire's harvest flattens a ``[B, S]`` batch, so
  ``N = B * S``); ``topk`` keeps ``top_k`` per token; ``jumprelu`` keeps ``dense`` where it is
  above ``exp(log_threshold)``; ``vanilla`` is ``dense``. ``out = acts @ W_dec + b_dec``, mapped
  back with the target's mean/std under ``input_unit_norm``.
- The artifact records neither the layer nor the base model: Goodfire's harvest config does,
  ``type: TranscoderHarvestConfig``, ``base_model_path``, ``artifact_paths`` mapping module
  paths (``h.0.mlp``) to artifact names. A transcoder on ``h.{i}.mlp`` reads that module's input
  and writes its output (canonical ``{i}.mlp_in`` -> ``{i}.mlp_out``).

This module reads those files; ``spd_adapters.clt.goodfire`` reuses its artifact and state-dict
helpers for the CLT checkpoints written by the same trainer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from spd_adapters import _hooks
from spd_adapters._dictionary import Activation, Dictionary
from spd_adapters._files import read_json, read_torch_state_dict, read_yaml
from spd_host.errors import FormatError, SourceNotFoundError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "encoder.pt"
ENCODER_TYPES = ("batchtopk", "topk", "vanilla", "jumprelu")
INFERENCE_MODES = ("batch_topk", "topk")
"""``inference`` option for BatchTopK checkpoints: ``batch_topk`` (the default; what the
trainer and Goodfire's harvest compute) or ``topk`` (``top_k`` per token; batch-independent)."""
GOODFIRE_HARVEST_BATCH_SIZE = 32  # param_decomp_lab HarvestConfig.batch_size default (sequences)

_M = TypeVar("_M", bound=BaseModel)
_ARTIFACT_RE = re.compile(r"^[\w.-]+/[\w.-]+/[\w.-]+(:[\w.-]+)?$")


# ----------------------------------------------------------------------------- config files


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class EncoderCheckpointConfig(_Loose):
    """The fields of ``config.json`` this reader uses (the trainer writes many more)."""

    input_size: int
    output_size: int
    dict_size: int
    encoder_type: str
    top_k: int = 32
    batch_size: int | None = None
    input_unit_norm: bool = False
    pre_enc_bias: bool = False
    dtype: str = "torch.float32"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TranscoderHarvestSpec(_Strict):
    """Goodfire's ``TranscoderHarvestConfig`` (+ spd-host's optional ``inference``)."""

    type: Literal["TranscoderHarvestConfig"]
    base_model_path: str
    artifact_paths: dict[str, str]
    inference: Literal["batch_topk", "topk"] | None = None


class CLTHarvestSpec(_Strict):
    """Goodfire's ``CLTHarvestConfig`` (+ spd-host's optional ``inference``)."""

    type: Literal["CLTHarvestConfig"]
    base_model_path: str
    artifact_path: str
    inference: Literal["batch_topk", "topk"] | None = None


def read_harvest_spec(path: Path) -> dict[str, Any]:
    """The method config in ``path`` (YAML or JSON; top level or under ``method_config``)."""
    raw = read_json(path) if path.suffix == ".json" else read_yaml(path)
    inner = raw.get("method_config")
    return dict(inner) if isinstance(inner, dict) else raw


def harvest_spec_type(path: Path) -> str | None:
    """``TranscoderHarvestConfig`` / ``CLTHarvestConfig`` / None for a file that is neither."""
    if not path.is_file() or path.suffix not in (".yaml", ".yml", ".json"):
        return None
    kind = read_harvest_spec(path).get("type")
    return kind if kind in ("TranscoderHarvestConfig", "CLTHarvestConfig") else None


def validate_spec(model: type[_M], raw: Mapping[str, Any], path: Path) -> _M:
    try:
        return model.model_validate(dict(raw))
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise FormatError(
            f"{path}: {loc}: {first['msg']}",
            hint=f"a {model.__name__.removesuffix('Spec')}Config has type, base_model_path and "
            + ("artifact_paths" if model is TranscoderHarvestSpec else "artifact_path")
            + "; optional inference: batch_topk | topk",
        ) from err


def is_checkpoint_dir(root: Path) -> bool:
    return root.is_dir() and (root / CONFIG_FILE).is_file() and (root / WEIGHTS_FILE).is_file()


def read_checkpoint_config(root: Path) -> tuple[EncoderCheckpointConfig, dict[str, Any]]:
    """``config.json`` of a checkpoint directory, validated; also the raw dict."""
    path = root / CONFIG_FILE
    raw = read_json(path)
    try:
        cfg = EncoderCheckpointConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        what = "missing key" if first["type"] == "missing" else f"bad value for {key!r}:"
        raise FormatError(
            f"{path}: {what} {key!r}"
            if first["type"] == "missing"
            else f"{path}: {what} {first['msg']}",
            hint="nn_decompositions writes input_size, output_size, dict_size, encoder_type and top_k",
        ) from err
    if cfg.encoder_type not in ENCODER_TYPES:
        raise FormatError(
            f"{path}: unknown encoder_type {cfg.encoder_type!r}",
            hint=f"supported encoder types: {', '.join(ENCODER_TYPES)}",
        )
    if cfg.dtype.removeprefix("torch.") not in ("float32", "float16", "bfloat16", "float64"):
        raise FormatError(
            f"{path}: unknown dtype {cfg.dtype!r}", hint="expected e.g. torch.float32"
        )
    return cfg, raw


def load_state_dict(root: Path) -> dict[str, Tensor]:
    """``encoder.pt`` as a flat name -> tensor dict, memory-mapped, never unpickling objects."""
    path = root / WEIGHTS_FILE
    if not path.is_file():
        raise FormatError(f"{path}: file not found", hint="the checkpoint directory is incomplete")
    return read_torch_state_dict(path, hint="encoder.pt must be torch.save(module.state_dict())")


def expect_tensor(
    sd: Mapping[str, Tensor], key: str, shape: tuple[int, ...], path: Path, what: str = ""
) -> Tensor:
    """``sd[key]`` as float32 if it has ``shape``; a FormatError naming file and tensor if not."""
    if key not in sd:
        raise FormatError(
            f"{path}: missing tensor {key!r} (found: {sorted(sd)[:12]})",
            hint="the checkpoint is incomplete or was written by a different trainer version",
        )
    t = sd[key]
    if tuple(t.shape) != tuple(shape):
        extra = f" ({what})" if what else ""
        raise FormatError(
            f"{path}: tensor {key!r} has shape {list(t.shape)}, expected {list(shape)}{extra}",
            hint="the state dict does not match its config.json",
        )
    return t.to(torch.float32)


def reject_unexpected(sd: Mapping[str, Tensor], expected: set[str], path: Path) -> None:
    """Goodfire loads with ``load_state_dict`` (strict): unknown tensors are an error there too."""
    extra = sorted(set(sd) - expected)
    if extra:
        raise FormatError(
            f"{path}: unexpected tensor {extra[0]!r} for this encoder_type",
            hint="config.json's encoder_type does not match the state dict",
        )


# ----------------------------------------------------------------------------- activations


def trained_activation(cfg: EncoderCheckpointConfig, where: str) -> Activation:
    """The activation the checkpoint was trained with (JumpReLU thresholds set at load)."""
    kind = {"batchtopk": "batchtopk", "topk": "topk", "vanilla": "relu", "jumprelu": "jumprelu"}[
        cfg.encoder_type
    ]
    act = Activation(kind, k=cfg.top_k if kind in ("batchtopk", "topk") else None, rectify=True)
    if kind in ("batchtopk", "topk"):
        act.check(cfg.dict_size, where)
    return act


def check_inference(mode: str | None, encoder_type: str, where: str) -> None:
    if mode is None:
        return
    if mode == "threshold":
        raise FormatError(
            f"{where}: inference 'threshold' is not defined for this checkpoint",
            hint="nn_decompositions' BatchTopK saves no learned threshold; use batch_topk or topk",
        )
    if mode not in INFERENCE_MODES:
        raise FormatError(
            f"{where}: unknown inference {mode!r}",
            hint=f"choose one of {', '.join(INFERENCE_MODES)}",
        )
    if encoder_type != "batchtopk":
        raise FormatError(
            f"{where}: inference {mode!r} applies to batchtopk checkpoints, this one is {encoder_type}",
            hint="drop the inference option; the checkpoint's own activation is used",
        )


def with_inference(act: Activation, mode: str | None) -> Activation:
    """BatchTopK, or its per-token form (``topk``: the same ``k`` for every token)."""
    if act.kind == "batchtopk" and mode == "topk":
        return replace(act, kind="topk")
    return act


def describe(cfg: EncoderCheckpointConfig, mode: str | None) -> str:
    if cfg.encoder_type == "batchtopk" and mode != "topk":
        trained = f", trained on batches of {cfg.batch_size} tokens" if cfg.batch_size else ""
        return (
            f"BatchTopK (k={cfg.top_k} per token on average: the top k*N activations of each "
            f"batch of N tokens{trained})"
        )
    if cfg.encoder_type == "batchtopk":
        return f"BatchTopK checkpoint read per token (top {cfg.top_k} of each token)"
    return {"topk": f"TopK (k={cfg.top_k})", "vanilla": "ReLU", "jumprelu": "JumpReLU"}[
        cfg.encoder_type
    ]


def batch_metadata(cfg: EncoderCheckpointConfig, mode: str | None) -> dict[str, Any]:
    """What ``defaults.extra`` records about the batch dependence of the activations."""
    out: dict[str, Any] = {
        "encoder_type": cfg.encoder_type,
        "inference": (mode or "batch_topk") if cfg.encoder_type == "batchtopk" else None,
        "top_k": cfg.top_k if cfg.encoder_type in ("batchtopk", "topk") else None,
        "train_batch_tokens": cfg.batch_size,
    }
    if cfg.encoder_type == "batchtopk" and mode != "topk":
        out["batch_dependent"] = True
        out["batch_scope"] = (
            "top_k * N over the N = batch_size * seq_len tokens of each harvest batch (per site)"
        )
        out["goodfire_harvest_batch_size"] = GOODFIRE_HARVEST_BATCH_SIZE
    return out


# ----------------------------------------------------------------------------- artifacts


def artifact_cache_dir(name: str) -> Path:
    """Where a wandb artifact is (or will be) downloaded: ``cache/wandb-artifacts/<name>``."""
    from spd_host.paths import cache_dir

    full = name if ":" in name else f"{name}:latest"
    return cache_dir("wandb-artifacts") / full.replace("/", "__").replace(":", "__")


def fetch_artifact(name: str) -> Path:
    """A wandb artifact's files, downloaded once (a complete cached copy works offline)."""
    target = artifact_cache_dir(name)
    marker = target / ".complete"
    if marker.exists():
        return target
    full = name if ":" in name else f"{name}:latest"
    try:
        import wandb

        artifact = wandb.Api().artifact(full)
        artifact.download(root=str(target))
    except Exception as err:  # wandb raises CommError, ValueError, ... for missing/offline
        raise SourceNotFoundError(
            f"wandb artifact {full!r} is not in the cache ({target}) and could not be downloaded: "
            f"{type(err).__name__}: {str(err)[:200]}",
            hint="go online (and set WANDB_API_KEY for private projects), or download the "
            "artifact's config.json and encoder.pt into a directory and use its path",
        ) from err
    marker.write_text(full)
    return target


def resolve_wandb_id(did: Any) -> Path:
    """``<method>:wandb:<entity>/<project>/<name>``: an artifact (``<name>:latest``) or a run.

    A cached artifact or run is used offline; online, the artifact is tried first (Goodfire's
    checkpoints are artifacts), then the run's files (``spd_host.ids.fetch_source``).
    """
    from spd_host.ids import fetch_source

    name = str(did.wandb_path)
    if (artifact_cache_dir(name) / ".complete").exists():
        return artifact_cache_dir(name)
    try:
        return fetch_artifact(name)
    except SourceNotFoundError as artifact_err:
        try:
            return fetch_source(did)
        except SourceNotFoundError as run_err:
            raise SourceNotFoundError(
                f"{did.raw}: neither a wandb artifact nor a wandb run could be read "
                f"(artifact: {artifact_err.args[0] if artifact_err.args else artifact_err}; "
                f"run: {run_err.args[0] if run_err.args else run_err})",
                hint="check the name, go online, or download the files and use a local path",
            ) from run_err


def resolve_artifact(ref: str, base: Path, where: str) -> Path:
    """A local checkpoint directory (absolute or relative to ``base``) or a wandb artifact name."""
    local = Path(ref).expanduser()
    local = local if local.is_absolute() else base / local
    if local.exists():
        if not is_checkpoint_dir(local):
            raise FormatError(
                f"{where}: {local} is not a checkpoint directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})",
                hint="point at the directory a wandb artifact download produces",
            )
        return local
    if not _ARTIFACT_RE.match(ref):
        raise SourceNotFoundError(
            f"{where}: artifact {ref!r} is neither a local directory nor a wandb artifact name",
            hint="use <entity>/<project>/<artifact>[:<version>] or a path to a checkpoint directory",
        )
    root = fetch_artifact(ref)
    if not is_checkpoint_dir(root):
        raise FormatError(
            f"{where}: wandb artifact {ref!r} ({root}) has no {CONFIG_FILE} + {WEIGHTS_FILE}",
            hint="this is not a checkpoint written by nn_decompositions' save_checkpoint",
        )
    return root


def resolve_base_model(name: str, base: Path) -> str:
    """``base_model_path`` as written, or an existing local path relative to the config file."""
    if name.startswith("wandb:") or "://" in name:
        return name
    local = Path(name).expanduser()
    local = local if local.is_absolute() else base / local
    return str(local) if local.exists() else name


# ----------------------------------------------------------------------------- transcoders


def load_transcoder(root: Path, mode: str | None = None) -> Dictionary:
    """One checkpoint directory as a normalised :class:`Dictionary` (see the module docstring)."""
    cfg, _ = read_checkpoint_config(root)
    where = str(root / CONFIG_FILE)
    check_inference(mode, cfg.encoder_type, where)
    t = transcoder_tensors(load_state_dict(root), cfg, root / WEIGHTS_FILE)
    act = trained_activation(cfg, where)
    if "jumprelu.log_threshold" in t:
        act = replace(act, threshold=t["jumprelu.log_threshold"].exp())
    i, o = cfg.input_size, cfg.output_size
    return Dictionary(
        W_enc=t["W_enc"].T.contiguous(),
        b_enc=t["b_enc"],
        activation=with_inference(act, mode),
        W_dec=t["W_dec"],
        b_dec=t["b_dec"],
        input_bias=t["b_dec"] if cfg.pre_enc_bias and i == o else None,
        input_norm=cfg.input_unit_norm,
    )


def transcoder_tensors(
    sd: Mapping[str, Tensor], cfg: EncoderCheckpointConfig, path: Path
) -> dict[str, Tensor]:
    """The state dict checked key by key and shape by shape against ``config.json`` (strict)."""
    i, o, n = cfg.input_size, cfg.output_size, cfg.dict_size
    shapes = {
        "W_enc": ((i, n), "[input_size, dict_size]"),
        "b_enc": ((n,), "[dict_size]"),
        "W_dec": ((n, o), "[dict_size, output_size]"),
        "b_dec": ((o,), "[output_size]"),
    }
    if cfg.encoder_type == "jumprelu":
        shapes["jumprelu.log_threshold"] = ((n,), "[dict_size]")
    out = {k: expect_tensor(sd, k, shape, path, what) for k, (shape, what) in shapes.items()}
    reject_unexpected(sd, set(shapes), path)
    return out


def read_goodfire_transcoders(path: Path, *, inference: str | None = None) -> Any:
    """A ``TranscoderHarvestConfig`` file -> ``TranscoderLayout`` (one site per module path).

    ``inference`` overrides the file's own ``inference`` option (``batch_topk`` / ``topk``).
    """
    from spd_adapters.transcoder.formats import SiteSource, TranscoderLayout

    spec = validate_spec(TranscoderHarvestSpec, read_harvest_spec(path), path)
    if inference is not None:
        check_inference(inference, "batchtopk", str(path))
        spec = spec.model_copy(update={"inference": inference})
    if not spec.artifact_paths:
        raise FormatError(f"{path}: artifact_paths is empty", hint="map module paths to artifacts")
    base = path.parent
    sites = []
    shared: dict[str, Any] = {}
    for module_path, ref in spec.artifact_paths.items():
        where = f"{path} (artifact_paths[{module_path!r}])"
        root = resolve_artifact(ref, base, where)
        cfg, _ = read_checkpoint_config(root)
        check_inference(spec.inference, cfg.encoder_type, where)
        inp = _hooks.from_module_path(module_path, "input", where=where)
        out = _hooks.from_module_path(module_path, "output", where=where)
        # encoder.pt is memory-mapped: checking names and shapes here reads no weights
        transcoder_tensors(load_state_dict(root), cfg, root / WEIGHTS_FILE)

        def load(root: Path = root) -> Dictionary:
            return load_transcoder(root, spec.inference)

        sites.append(
            SiteSource(
                input_hook=inp,
                output_hook=out,
                native_input=f"{module_path} (input)",
                native_output=f"{module_path} (output)",
                n_features=cfg.dict_size,
                d_in=cfg.input_size,
                d_out=cfg.output_size,
                activation=describe(cfg, spec.inference),
                config_file=root / CONFIG_FILE,
                load=load,
            )
        )
        shared.setdefault("batch", batch_metadata(cfg, spec.inference))
    return TranscoderLayout(
        format="goodfire",
        root=path,
        model_name=resolve_base_model(spec.base_model_path, base),
        sites=sites,
        extra={
            # Goodfire's harvest data loader never prepends BOS (add_bos_token=False)
            "prepend_bos": False,
            "artifact_paths": dict(spec.artifact_paths),
            **shared.get("batch", {}),
        },
    )


def lone_checkpoint_error(root: Path, method: str) -> FormatError:
    """Why a bare checkpoint directory does not load as a transcoder (or as the wrong method)."""
    is_clt = "layers" in read_json(root / CONFIG_FILE)
    if is_clt and method == "transcoder":
        return FormatError(
            f"{root / CONFIG_FILE}: has 'layers': this is a cross-layer transcoder checkpoint",
            hint=f"load it with the clt method: clt:{root}",
        )
    kind = "TranscoderHarvestConfig" if method == "transcoder" else "CLTHarvestConfig"
    field = (
        "artifact_paths: {h.0.mlp: <this directory>, ...}"
        if method == "transcoder"
        else "artifact_path: <this directory>"
    )
    return FormatError(
        f"{root}: a Goodfire/nn_decompositions transcoder checkpoint records neither the layer it "
        "reads nor its base model",
        hint=f"write a YAML with type: {kind}, base_model_path: <model>, {field}; then use "
        f"{method}:<that file>",
    )
