"""Reading Goodfire ``spd`` run directories: discovery, the state dict, key layout, validation.

A run directory holds ``final_config.yaml`` and one or more ``model_<step>.pth`` (the latest step
wins). The ``.pth`` is a plain state dict of tensors, read with ``torch.load(weights_only=True)``
only. Current key layout::

    target_model.<module path>.<param>              the frozen base model
    _components.<module path, '.'->'-'>.{V,U}        V [d_in, C], U [C, d_out] (+ .bias buffer)
    ci_fn._ci_fns.<module path, '.'->'-'>.layers.<i>.{W,b}   layerwise CI functions
    ci_fn._global_ci_fn.layers.<i>.{W,b}             the global CI function (global_shared_mlp)
    ci_fn._global_ci_fn.{_input_projector,_blocks.<i>...,_output_head}...   global_shared_transformer
    ci_fn._global_ci_fn.{_inp_projectors,_readers,_reader_norms,_transitions,
                         _transition_norms,_attn_transitions,_attn_norms}.<block>...  global_reverse_residual

(see :func:`build_shared_transformer` / :func:`build_reverse_residual` for their exact keys).
Inserted identity modules (``identity_module_info``) add ``_components.<dashed path>-pre_identity``.

Older runs are normalised first (:func:`normalize_keys`): ``_gates.`` -> ``_ci_fns.``,
``patched_model.`` -> ``target_model.``, ``*.original.weight`` -> ``*.weight``,
``target_model.<path>.components.{U,V}`` -> ``_components.<dashed path>.{U,V}``, and a top-level
``_ci_fns.`` -> ``ci_fn._ci_fns.``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from spd_adapters._files import read_torch_state_dict
from spd_adapters.spd.ci_transformer import (
    Attention,
    ResidualBlock,
    ReverseResidualCiFn,
    SharedTransformerCiFn,
    TransformerBlock,
)
from spd_adapters.spd.config import IDENTITY_NAME, AttnConfig, SpdRunConfig, load_config
from spd_adapters.spd.identity import identity_targets, with_identity_paths
from spd_adapters.spd.model import (
    Components,
    DenseLayer,
    GlobalCiFn,
    GlobalFn,
    LayerwiseCiFn,
    ModuleKind,
    SpdModel,
)
from spd_host.errors import FormatError, SourceNotFoundError

CONFIG_FILENAME = "final_config.yaml"
#: torch-era param-decomp (``param_decomp_lab``) runs: the same checkpoint, another config
EXPERIMENT_CONFIG_FILENAME = "experiment_config.yaml"
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
    if not config_path.is_file() and (run_dir / EXPERIMENT_CONFIG_FILENAME).is_file():
        config_path = run_dir / EXPERIMENT_CONFIG_FILENAME  # torch-era param-decomp
    if not config_path.is_file():
        raise FormatError(
            f"{run_dir}: no {CONFIG_FILENAME} (the SPD run's config)",
            hint="an SPD run directory holds final_config.yaml (torch-era param-decomp: "
            "experiment_config.yaml) next to model_<step>.pth",
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
    return read_torch_state_dict(
        path, hint="an SPD checkpoint is ComponentModel.state_dict() saved with torch.save"
    )


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
    """fnmatch every ``module_info`` pattern (then every identity pattern + ``.pre_identity``)
    over the base model's module paths -> {path: C}, ordered as the reference orders them: by
    pattern, then in ``module_paths`` order (the model's ``named_modules`` order)."""
    paths = [p for p in module_paths if p]
    out: dict[str, int] = {}
    owner: dict[str, str] = {}
    for info in config.all_module_info():
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
    names = (name.replace("-", ".") for name in parts.components)
    return sorted(n.removesuffix(f".{IDENTITY_NAME}") for n in names)


def checkpoint_module_paths(
    config: SpdRunConfig, parts: CheckpointParts, *, where: Path | str
) -> list[str]:
    """Module paths from the checkpoint, with the identity modules the config inserts."""
    paths = module_paths_from_checkpoint(parts)
    if not config.identity_module_info:
        return paths
    return with_identity_paths(
        paths, identity_targets(config.identity_module_info, paths, where=where)
    )


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
            hint="final_config.yaml's module_info and this checkpoint must come from the same run",
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
                hint="module_info's C in final_config.yaml must equal the checkpoint's",
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
            hint="ci_config.hidden_dims in final_config.yaml must match the checkpoint",
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
                hint="final_config.yaml's ci_config (fn_type, hidden_dims) and module_info must match the checkpoint",
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
    config_where: Path | str | None = None,
) -> SpdModel:
    """Components + CI functions, every shape checked against the config and the base model.

    ``modules`` must be in the reference's module order (see :func:`expand_module_info`): the
    reverse-residual CI function orders each block's inputs by it. ``config_where`` names
    ``final_config.yaml`` in errors that are config mistakes.
    """
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
    hidden = list(ci.hidden_dims or [])
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
    widths = {p: comps[p].C if modules[p].kind == "embedding" else modules[p].d_in for p in modules}
    sizes_of = {p: comps[p].C for p in modules}
    fn: GlobalFn
    if ci.fn_type == "global_shared_transformer":
        fn = build_shared_transformer(config, parts.global_ci, widths, sizes_of, where=where)
    elif ci.fn_type == "global_reverse_residual":
        fn = build_reverse_residual(
            config,
            parts.global_ci,
            widths,
            sizes_of,
            where=where,
            config_where=config_where or where,
        )
    else:
        layers = _dense_layers(parts.global_ci, what=what)
        order = sorted(modules)
        sizes = [sizes_of[p] for p in order]
        d_total = sum(widths[p] for p in order)
        _check_chain(layers, [d_total, *hidden, sum(sizes)], per_component=None, what=what)
        fn = GlobalCiFn(layers, order, sizes)
    return SpdModel(comps, None, fn, config.sigmoid_type)


class _GlobalTensors:
    """Takes the tensors of a global CI function one key at a time, checking each shape."""

    PREFIX = "ci_fn._global_ci_fn."

    def __init__(self, tensors: Mapping[str, Tensor], *, where: Path | str, fn_type: str):
        self.left = dict(tensors)
        self.where = where
        self.fn_type = fn_type

    def take(self, key: str, shape: Sequence[int]) -> Tensor:
        full = self.PREFIX + key
        if key not in self.left:
            raise FormatError(
                f"{self.where}: missing tensor {full} (ci_config fn_type {self.fn_type!r})",
                hint="final_config.yaml's ci_config must be the one this checkpoint was trained with",
            )
        t = self.left.pop(key)
        if tuple(t.shape) != tuple(shape):
            raise FormatError(
                f"{self.where}: tensor {full} has shape {list(t.shape)}, but final_config.yaml's "
                f"ci_config and module_info imply {list(shape)}",
                hint="the config and checkpoint must come from the same run",
            )
        return t.float()

    def linear(self, key: str, d_in: int, d_out: int) -> DenseLayer:
        """The reference's own ``Linear``: ``W [in, out]``, ``b [out]``."""
        return DenseLayer(self.take(f"{key}.W", (d_in, d_out)), self.take(f"{key}.b", (d_out,)))

    def mlp(self, key: str, dims: Sequence[int]) -> list[DenseLayer]:
        """An ``nn.Sequential`` of Linear, GELU, Linear, ...: layers at even indices."""
        return [self.linear(f"{key}.{2 * k}", dims[k], dims[k + 1]) for k in range(len(dims) - 1)]

    def attention(self, key: str, d: int, cfg: AttnConfig) -> Attention:
        """``SelfAttention``: bias-free nn.Linear ``{q,k,v,out}_proj.weight [d, d]`` + RoPE buffer."""
        w = {n: self.take(f"{key}.{n}_proj.weight", (d, d)) for n in ("q", "k", "v", "out")}
        inv_freq = self.take(f"{key}.rope.inv_freq", (d // cfg.n_heads // 2,))
        return Attention(w["q"], w["k"], w["v"], w["out"], inv_freq, cfg.n_heads, cfg.max_len)

    def finish(self) -> None:
        if self.left:
            extra = sorted(self.PREFIX + k for k in self.left)
            raise FormatError(
                f"{self.where}: unexpected tensors for ci_config fn_type {self.fn_type!r}: "
                f"{extra[:5]}{' ...' if len(extra) > 5 else ''}",
                hint="final_config.yaml's ci_config must be the one this checkpoint was trained with",
            )


def build_shared_transformer(
    config: SpdRunConfig,
    tensors: Mapping[str, Tensor],
    widths: Mapping[str, int],
    sizes: Mapping[str, int],
    *,
    where: Path | str,
) -> SharedTransformerCiFn:
    """``GlobalSharedTransformerCiFn``'s keys: ``_input_projector.{W,b}``,
    ``_blocks.<i>.attn.{q,k,v,out}_proj.weight``, ``_blocks.<i>.attn.rope.inv_freq``,
    ``_blocks.<i>.mlp.<2j>.{W,b}``, ``_output_head.{W,b}``."""
    cfg = config.ci_config.simple_transformer_ci_cfg
    assert cfg is not None  # checked with the config
    t = _GlobalTensors(tensors, where=where, fn_type="global_shared_transformer")
    order = sorted(widths)
    d = cfg.d_model
    projector = t.linear("_input_projector", sum(widths[p] for p in order), d)
    blocks = [
        TransformerBlock(
            attn=t.attention(f"_blocks.{i}.attn", d, cfg.attn_config),
            mlp=t.mlp(f"_blocks.{i}.mlp", [d, *cfg.mlp_dims(), d]),
        )
        for i in range(cfg.n_blocks)
    ]
    head = t.linear("_output_head", d, sum(sizes[p] for p in order))
    t.finish()
    return SharedTransformerCiFn(order, [sizes[p] for p in order], projector, blocks, head)


def block_members(
    config: SpdRunConfig, module_order: Sequence[str], *, where: Path | str
) -> list[tuple[str, list[str]]]:
    """``block_groups`` -> [(name, modules)]: per pattern its matches in module order; every
    module in exactly one block (the reference's rules)."""
    groups = config.ci_config.block_groups or []
    out: list[tuple[str, list[str]]] = []
    owner: dict[str, str] = {}
    for group in groups:
        members: list[str] = []
        for pattern in group.patterns:
            hits = [m for m in module_order if fnmatch.fnmatch(m, pattern)]
            if not hits:
                raise FormatError(
                    f"{where}: ci_config.block_groups[{group.name!r}] pattern {pattern!r} matches "
                    f"no decomposed module",
                    hint=f"decomposed modules: {', '.join(module_order)}",
                )
            for m in hits:
                if m in members:
                    raise FormatError(
                        f"{where}: module {m!r} matches two patterns of block {group.name!r}"
                    )
            members.extend(hits)
        for m in members:
            if m in owner:
                raise FormatError(
                    f"{where}: module {m!r} is in two block groups ({owner[m]!r} and {group.name!r})"
                )
            owner[m] = group.name
        out.append((group.name, members))
    missing = [m for m in module_order if m not in owner]
    if missing:
        raise FormatError(
            f"{where}: ci_config.block_groups leave modules out: {missing}",
            hint="global_reverse_residual needs every decomposed module in one block group",
        )
    return out


def build_reverse_residual(
    config: SpdRunConfig,
    tensors: Mapping[str, Tensor],
    widths: Mapping[str, int],
    sizes: Mapping[str, int],
    *,
    where: Path | str,
    config_where: Path | str,
) -> ReverseResidualCiFn:
    """``GlobalReverseResidualCiFn``'s keys, per block ``<b>`` (name with '.' -> '-'):
    ``_inp_projectors.<b>.{W,b}``, ``_readers.<b>.<2j>.{W,b}``, ``_reader_norms.<b>.weight``;
    for all but the last block ``_transitions.<b>.{W,b}`` (or ``.0``/``.2`` with
    ``transition_hidden_dim``), ``_transition_norms.<b>.weight``, and with
    ``transition_attn_config`` ``_attn_transitions.<b>.{q,k,v,out}_proj.weight``,
    ``_attn_transitions.<b>.rope.inv_freq``, ``_attn_norms.<b>.weight``."""
    ci = config.ci_config
    assert ci.d_resid_ci_fn is not None and ci.reader_hidden_dims is not None
    d = ci.d_resid_ci_fn
    t = _GlobalTensors(tensors, where=where, fn_type="global_reverse_residual")
    members = block_members(config, list(widths), where=config_where)
    blocks = []
    for idx, (name, mods) in enumerate(members):
        b = name.replace(".", "-")
        last = idx == len(members) - 1
        transition = norm = attn = attn_norm = None
        if not last:
            if ci.transition_hidden_dim is not None:
                transition = t.mlp(f"_transitions.{b}", [d, ci.transition_hidden_dim, d])
            else:
                transition = [t.linear(f"_transitions.{b}", d, d)]
            norm = t.take(f"_transition_norms.{b}.weight", (d,))
            if ci.transition_attn_config is not None:
                attn = t.attention(f"_attn_transitions.{b}", d, ci.transition_attn_config)
                attn_norm = t.take(f"_attn_norms.{b}.weight", (d,))
        blocks.append(
            ResidualBlock(
                name=name,
                modules=mods,
                sizes=[sizes[m] for m in mods],
                projector=t.linear(f"_inp_projectors.{b}", sum(widths[m] for m in mods), d),
                reader=t.mlp(
                    f"_readers.{b}", [d, *ci.reader_hidden_dims, sum(sizes[m] for m in mods)]
                ),
                reader_norm=t.take(f"_reader_norms.{b}.weight", (d,)),
                transition=transition,
                transition_norm=norm,
                attn=attn,
                attn_norm=attn_norm,
            )
        )
    t.finish()
    return ReverseResidualCiFn(d, blocks, causal=ci.causal)


def read_run(path: Path) -> tuple[RunFiles, SpdRunConfig, CheckpointParts]:
    """Discover, read the config and the (normalised, split) checkpoint of a run."""
    files = discover_run(path)
    config = load_config(files.config_path)
    parts = split_state_dict(normalize_keys(read_state_dict(files.checkpoint_path)))
    return files, config, parts
