"""Reading Goodfire ``spd`` run directories: discovery, the state dict, key layout, validation.

A run directory holds ``final_config.yaml`` and one or more ``model_<step>.pth`` (the latest step
wins). The ``.pth`` is a plain state dict of tensors, read with ``torch.load(weights_only=True)``
only. Current key layout::

    target_model.<module path>.<param>              the frozen base model
    _components.<module path, '.'->'-'>.{V,U}        V [d_in, C], U [C, d_out] (+ .bias buffer)
    ci_fn._ci_fns.<module path, '.'->'-'>.layers.<i>.{W,b}   layerwise CI functions
    ci_fn._global_ci_fn.layers.<i>.{W,b}             the global CI function

Older runs are normalised first (:func:`normalize_keys`): ``_gates.`` -> ``_ci_fns.``,
``patched_model.`` -> ``target_model.``, ``*.original.weight`` -> ``*.weight``,
``target_model.<path>.components.{U,V}`` -> ``_components.<dashed path>.{U,V}``, and a top-level
``_ci_fns.`` -> ``ci_fn._ci_fns.``.
"""

from __future__ import annotations

import fnmatch
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from spd_adapters.spd.config import SpdRunConfig, load_config
from spd_adapters.spd.model import (
    Components,
    DenseLayer,
    GlobalCiFn,
    LayerwiseCiFn,
    ModuleKind,
    SpdModel,
)
from spd_host.errors import FormatError, SourceNotFoundError

CONFIG_FILENAME = "final_config.yaml"
_CKPT_RE = re.compile(r"^model(?:_(\d+))?\.pth$")
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(W|b)$")


@dataclass(frozen=True)
class RunFiles:
    run_dir: Path
    config_path: Path
    checkpoint_path: Path
    step: int | None


def discover_run(path: Path) -> RunFiles:
    """A run directory (or a ``.pth`` inside one) -> its config and latest checkpoint."""
    if not path.exists():
        raise SourceNotFoundError(f"SPD run not found: {path}")
    if path.is_file():
        if not path.name.endswith(".pth"):
            raise FormatError(
                f"{path} is not an SPD checkpoint",
                hint="pass the run directory or a model_<step>.pth",
            )
        run_dir, ckpts = path.parent, [path]
    else:
        run_dir = path
        ckpts = [p for p in path.iterdir() if _CKPT_RE.match(p.name)]
    config_path = run_dir / CONFIG_FILENAME
    if not config_path.is_file():
        raise FormatError(
            f"{run_dir}: no {CONFIG_FILENAME} (the SPD run's config)",
            hint="an SPD run directory holds final_config.yaml next to model_<step>.pth",
        )
    if not ckpts:
        others = sorted(p.name for p in run_dir.iterdir())
        raise FormatError(
            f"{run_dir}: no checkpoint named model_<step>.pth (found: {others or 'nothing'})",
            hint="copy the run's latest model_<step>.pth next to final_config.yaml",
        )

    def step_of(p: Path) -> int:
        m = _CKPT_RE.match(p.name)
        return int(m.group(1)) if m and m.group(1) else -1

    best = max(ckpts, key=step_of)
    step = step_of(best)
    return RunFiles(run_dir, config_path, best, None if step < 0 else step)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Load a ``.pth`` as tensors only; anything pickled beyond that is refused, not run."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        what = (
            f"it holds an object of type {found.group(1)}"
            if found
            else "it holds a non-tensor object"
        )
        raise FormatError(
            f"{path}: refused to unpickle the checkpoint: {what}",
            hint="an SPD checkpoint must be a plain state dict of tensors; re-save it with "
            "torch.save(model.state_dict(), ...) in a trusted environment",
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise FormatError(f"{path}: not a readable PyTorch checkpoint: {err}") from err
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise FormatError(
            f"{path}: expected a state dict (str -> Tensor), got {type(obj).__name__}",
            hint="SPD checkpoints are ComponentModel.state_dict() saved with torch.save",
        )
    return dict(obj)


def normalize_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map the key names of older runs onto the current layout (see module docstring)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        k = key.replace("_gates.", "_ci_fns.")
        if k.startswith("patched_model."):
            k = "target_model." + k.removeprefix("patched_model.")
        if k.endswith(".original.weight"):
            k = k.removesuffix(".original.weight") + ".weight"
        if k.endswith((".components.U", ".components.V")):
            path = k.removeprefix("target_model.").rsplit(".components.", 1)[0]
            k = f"_components.{path.replace('.', '-')}.{k[-1]}"
        if k.startswith("_ci_fns."):
            k = "ci_fn." + k
        if k.endswith(".original.bias"):
            k = k.removesuffix(".original.bias") + ".bias"
        if k in out:
            raise FormatError(f"checkpoint has two keys that both mean {k!r} (one is {key!r})")
        out[k] = value
    return out


@dataclass
class CheckpointParts:
    """A normalised state dict split by owner."""

    target: dict[str, Tensor]
    components: dict[str, dict[str, Tensor]]  # dashed path -> {"V","U","bias"}
    layerwise_ci: dict[str, dict[str, Tensor]]  # dashed path -> {"layers.i.W", ...}
    global_ci: dict[str, Tensor]  # "layers.i.W" -> tensor
    unknown: list[str]


def split_state_dict(sd: Mapping[str, Tensor]) -> CheckpointParts:
    parts = CheckpointParts({}, {}, {}, {}, [])
    for key, t in sd.items():
        if key.startswith("target_model."):
            parts.target[key.removeprefix("target_model.")] = t
        elif key.startswith("_components."):
            name, _, leaf = key.removeprefix("_components.").rpartition(".")
            parts.components.setdefault(name, {})[leaf] = t
        elif key.startswith("ci_fn._ci_fns."):
            name, _, rest = key.removeprefix("ci_fn._ci_fns.").partition(".")
            parts.layerwise_ci.setdefault(name, {})[rest] = t
        elif key.startswith("ci_fn._global_ci_fn."):
            parts.global_ci[key.removeprefix("ci_fn._global_ci_fn.")] = t
        else:
            parts.unknown.append(key)
    return parts


def dashed(path: str) -> str:
    return path.replace(".", "-")


def expand_module_info(
    config: SpdRunConfig, module_paths: Iterable[str], *, where: Path | str
) -> dict[str, int]:
    """fnmatch every ``module_info`` pattern over the base model's module paths -> {path: C}."""
    paths = [p for p in module_paths if p]
    out: dict[str, int] = {}
    owner: dict[str, str] = {}
    for info in config.module_info:
        hits = [p for p in paths if fnmatch.fnmatch(p, info.module_pattern)]
        if not hits:
            raise FormatError(
                f"{where}: module_info pattern {info.module_pattern!r} matches no module of the base model",
                hint=f"some module paths: {', '.join(paths[:8])}{' ...' if len(paths) > 8 else ''}",
            )
        for p in hits:
            if p in out:
                raise FormatError(
                    f"{where}: module {p!r} matches two module_info patterns "
                    f"({owner[p]!r} and {info.module_pattern!r})"
                )
            out[p], owner[p] = info.C, info.module_pattern
    return out


def module_paths_from_checkpoint(parts: CheckpointParts) -> list[str]:
    """Module paths for pattern matching without building the base model.

    From the ``target_model.*`` keys when present (every ancestor of every parameter), else from
    the component names with '-' read back as '.'.
    """
    if parts.target:
        paths: set[str] = set()
        for key in parts.target:
            bits = key.split(".")[:-1]
            paths.update(".".join(bits[: i + 1]) for i in range(len(bits)))
        return sorted(paths)
    return sorted(name.replace("-", ".") for name in parts.components)


def check_component_keys(
    parts: CheckpointParts, module_to_c: Mapping[str, int], *, where: Path | str
) -> None:
    """Every decomposed module has V and U of C columns/rows, and nothing else is there."""
    expected = {dashed(p): p for p in module_to_c}
    extra = sorted(set(parts.components) - set(expected))
    missing = sorted(set(expected) - set(parts.components))
    if missing or extra:
        raise FormatError(
            f"{where}: checkpoint components do not match module_info: "
            f"missing for {[expected[m] for m in missing]}, unexpected {[f'_components.{e}' for e in extra]}",
            hint="the config and checkpoint must come from the same run",
        )
    for name, path in expected.items():
        tensors = parts.components[name]
        for leaf in ("V", "U"):
            if leaf not in tensors:
                raise FormatError(f"{where}: missing tensor _components.{name}.{leaf}")
        V, U, C = tensors["V"], tensors["U"], module_to_c[path]
        if V.ndim != 2 or U.ndim != 2 or V.shape[1] != C or U.shape[0] != C:
            raise FormatError(
                f"{where}: _components.{name}: V {list(V.shape)} / U {list(U.shape)} do not have "
                f"C={C} (expected V [d_in, {C}], U [{C}, d_out])",
                hint="module_info's C must equal the checkpoint's",
            )
    if parts.unknown:
        raise FormatError(
            f"{where}: unrecognised checkpoint keys {parts.unknown[:5]}",
            hint="expected target_model.*, _components.*, ci_fn._ci_fns.* or ci_fn._global_ci_fn.*",
        )


def _dense_layers(tensors: Mapping[str, Tensor], *, what: str) -> list[DenseLayer]:
    idx: dict[int, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = _LAYER_RE.match(key)
        if not m:
            raise FormatError(f"{what}: unexpected tensor {key!r} (expected layers.<i>.W / .b)")
        idx.setdefault(int(m.group(1)), {})[m.group(2)] = t
    order = sorted(idx)
    if not order or order != list(range(0, 2 * len(order), 2)):
        raise FormatError(
            f"{what}: layer indices {order} are not 0, 2, 4, ... (Linear, GELU, Linear, ...)"
        )
    layers = []
    for i in order:
        if set(idx[i]) != {"W", "b"}:
            raise FormatError(f"{what}: layers.{i} needs both W and b, has {sorted(idx[i])}")
        layers.append(DenseLayer(idx[i]["W"].float(), idx[i]["b"].float()))
    return layers


def _check_chain(
    layers: list[DenseLayer], dims: list[int], *, per_component: int | None, what: str
) -> None:
    """Shapes must follow ``dims`` (in, hidden..., out); per-component layers carry a C axis."""
    if len(layers) != len(dims) - 1:
        raise FormatError(
            f"{what}: {len(layers)} layers, but ci_config.hidden_dims implies {len(dims) - 1}",
            hint="ci_config.hidden_dims must match the checkpoint",
        )
    for k, layer in enumerate(layers):
        want_W = (
            (dims[k], dims[k + 1])
            if per_component is None
            else (per_component, dims[k], dims[k + 1])
        )
        want_b = (dims[k + 1],) if per_component is None else (per_component, dims[k + 1])
        if tuple(layer.W.shape) != want_W or tuple(layer.b.shape) != want_b:
            raise FormatError(
                f"{what}: layers.{2 * k}.W {list(layer.W.shape)} / b {list(layer.b.shape)}, "
                f"expected {list(want_W)} / {list(want_b)}",
                hint="ci_config (fn_type, hidden_dims) and module_info must match the checkpoint",
            )


@dataclass(frozen=True)
class ModuleSpec:
    """What the loader needs to know about one target module."""

    kind: ModuleKind
    d_in: int  # vocab size for an embedding
    d_out: int
    bias: Tensor | None


def build_spd_model(
    config: SpdRunConfig,
    parts: CheckpointParts,
    modules: Mapping[str, ModuleSpec],
    *,
    where: Path | str,
) -> SpdModel:
    """Components + CI functions, every shape checked against the config and the base model."""
    comps: dict[str, Components] = {}
    for path, spec in modules.items():
        t = parts.components[dashed(path)]
        V, U = t["V"].float(), t["U"].float()
        if V.shape[0] != spec.d_in or U.shape[1] != spec.d_out:
            raise FormatError(
                f"{where}: _components.{dashed(path)}: V {list(V.shape)}, U {list(U.shape)} do "
                f"not fit {spec.kind} module {path!r} (d_in={spec.d_in}, d_out={spec.d_out})"
            )
        comps[path] = Components(V=V, U=U, bias=spec.bias, kind=spec.kind)

    ci = config.ci_config
    hidden = list(ci.hidden_dims)
    if ci.mode == "layerwise":
        if parts.global_ci:
            raise FormatError(
                f"{where}: config says layerwise CI but the checkpoint has ci_fn._global_ci_fn.* keys"
            )
        expected = {dashed(p) for p in modules}
        if set(parts.layerwise_ci) != expected:
            raise FormatError(
                f"{where}: layerwise CI functions in the checkpoint "
                f"{sorted(parts.layerwise_ci)} do not match the decomposed modules {sorted(expected)}",
                hint="the config and checkpoint must come from the same run",
            )
        layerwise: dict[str, LayerwiseCiFn] = {}
        for path, spec in modules.items():
            what = f"{where}: ci_fn._ci_fns.{dashed(path)}"
            layers = _dense_layers(parts.layerwise_ci[dashed(path)], what=what)
            C = comps[path].C
            if spec.kind == "embedding" and ci.fn_type != "mlp":
                raise FormatError(
                    f"{what}: embeddings only support ci fn_type 'mlp', config has {ci.fn_type!r}"
                )
            if ci.fn_type == "mlp":
                _check_chain(layers, [1, *hidden, 1], per_component=C, what=what)
            elif ci.fn_type == "vector_mlp":
                _check_chain(layers, [spec.d_in, *hidden, 1], per_component=C, what=what)
            else:
                _check_chain(layers, [spec.d_in, *hidden, C], per_component=None, what=what)
            layerwise[path] = LayerwiseCiFn(ci.fn_type, layers)
        return SpdModel(comps, layerwise, None, config.sigmoid_type)

    if parts.layerwise_ci:
        raise FormatError(
            f"{where}: config says global CI but the checkpoint has ci_fn._ci_fns.* keys"
        )
    what = f"{where}: ci_fn._global_ci_fn"
    if not parts.global_ci:
        raise FormatError(f"{what}: missing (config ci_config.mode is 'global')")
    layers = _dense_layers(parts.global_ci, what=what)
    order = sorted(modules)
    d_total = sum(comps[p].C if modules[p].kind == "embedding" else modules[p].d_in for p in order)
    sizes = [comps[p].C for p in order]
    _check_chain(layers, [d_total, *hidden, sum(sizes)], per_component=None, what=what)
    return SpdModel(comps, None, GlobalCiFn(layers, order, sizes), config.sigmoid_type)


def read_run(path: Path) -> tuple[RunFiles, SpdRunConfig, CheckpointParts]:
    """Discover, read the config and the (normalised, split) checkpoint of a run."""
    files = discover_run(path)
    config = load_config(files.config_path)
    parts = split_state_dict(normalize_keys(read_state_dict(files.checkpoint_path)))
    return files, config, parts
