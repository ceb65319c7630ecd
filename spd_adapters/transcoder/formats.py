"""Readers for the per-layer transcoder / SAE formats researchers publish.

Each reader turns a directory into a :class:`TranscoderLayout`: one :class:`SiteSource` per
dictionary, with canonical hook points, sizes read from safetensors headers (no weights), and a
``load()`` that reads the tensors and returns a :class:`~spd_adapters._dictionary.Dictionary`
in the normalised orientation. Semantics per format (checked against each library's source):

sparsify (EleutherAI) — ``<hookpoint>/cfg.json`` + ``<hookpoint>/sae.safetensors``:
  ``encoder.weight [n, d_in]``, ``encoder.bias [n]``, ``W_dec [n, d_in]``, ``b_dec [d_in]``,
  optional ``W_skip [d_in, d_in]``. ``pre = relu((x - b_dec·[not transcode]) @ encoder.weight.T
  + encoder.bias)``, then TopK (k largest) or GroupMax (max of each of k contiguous groups);
  ``out = acts @ W_dec + b_dec (+ x @ W_skip.T)``. Hookpoints are module paths: an SAE reads and
  writes the module's output; a transcoder (``transcode: true``) reads its input, writes its
  output. The run's ``config.json`` (next to the hookpoint folders) names the model.

SAELens — ``cfg.json`` + ``sae_weights.safetensors``: ``W_enc [d_in, n]``, ``b_enc [n]``,
  ``W_dec [n, d_out]``, ``b_dec [d_out]``, ``threshold [n]`` (jumprelu), ``W_skip [d_out, d_in]``
  (skip transcoders). ``pre = (x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc``; standard:
  ``relu``; jumprelu: ``relu(pre) * (pre > threshold)``; topk: top-k then ``relu`` (with
  ``rescale_acts_by_decoder_norm``, ``pre`` is scaled by ``|W_dec|`` rows and acts divided back
  before decoding). Transcoders never subtract ``b_dec``. Hooks: ``hook_name`` /
  ``hook_name_out`` (TransformerLens names) at top level (SAELens < 6) or under ``metadata``.

circuit-tracer transcoder set — ``config.yaml`` (``model_kind: transcoder_set``, ``model_name``,
  ``feature_input_hook``, ``feature_output_hook``, optional ``activation``/``k``,
  optional ``transcoders`` list of file paths) + ``layer_{i}.safetensors``: ``W_enc [n, d]``,
  ``W_dec [n, d]``, ``b_enc [n]``, ``b_dec [d]``, optional ``activation_function.threshold [n]``
  and ``W_skip [d, d]``. ``pre = x @ W_enc.T + b_enc``; JumpReLU is ``pre * (pre > threshold)``;
  TopK keeps the k largest *without* clamping; ``out = acts @ W_dec + b_dec + x @ W_skip.T``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spd_adapters import _hooks
from spd_adapters._dictionary import Activation, Dictionary
from spd_adapters._files import TensorFile, read_json, read_yaml
from spd_host.errors import FormatError

FORMATS = ("sparsify", "saelens", "circuit-tracer", "goodfire")


@dataclass(frozen=True)
class SiteSource:
    """One dictionary of a decomposition, before its weights are read."""

    input_hook: str  # canonical hook point
    output_hook: str  # canonical hook point
    native_input: str  # the name the files use (for messages)
    native_output: str
    n_features: int
    d_in: int
    d_out: int
    activation: str
    config_file: Path
    load: Callable[[], Dictionary] = field(compare=False, repr=False)
    # the encoder half only (no W_dec / W_skip), for a harvest; None: ``load`` it all
    load_encoder: Callable[[], Dictionary] | None = field(default=None, compare=False, repr=False)

    @property
    def layer(self) -> int:
        return _hooks.layer_of(self.input_hook)

    @property
    def is_sae(self) -> bool:
        return self.input_hook == self.output_hook


@dataclass(frozen=True)
class TranscoderLayout:
    format: str
    root: Path
    model_name: str | None
    sites: list[SiteSource]
    dataset: str | None = None
    seq_len: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- detection


def detect_format(root: Path) -> str:
    """Which format ``root`` is in, from its files; FormatError if none or ambiguous."""
    from spd_adapters.transcoder import goodfire

    if root.is_file():
        kind = goodfire.harvest_spec_type(root)
        if kind == "TranscoderHarvestConfig":
            return "goodfire"
        if kind == "CLTHarvestConfig":
            raise FormatError(
                f"{root}: type is CLTHarvestConfig", hint=f"load it with the clt method: clt:{root}"
            )
        raise FormatError(
            f"{root}: is a file; a transcoder is a directory or a Goodfire TranscoderHarvestConfig YAML",
            hint="point at the directory that holds config.yaml / cfg.json, or at a YAML with "
            "type: TranscoderHarvestConfig",
        )
    if goodfire.is_checkpoint_dir(root):
        raise goodfire.lone_checkpoint_error(root, "transcoder")
    found: list[str] = []
    if (root / "config.yaml").is_file():
        kind = read_yaml(root / "config.yaml").get("model_kind")
        if kind == "cross_layer_transcoder":
            raise FormatError(
                f"{root / 'config.yaml'}: model_kind is cross_layer_transcoder",
                hint=f"load it with the clt method: clt:{root}",
            )
        if kind != "transcoder_set":
            raise FormatError(
                f"{root / 'config.yaml'}: model_kind {kind!r} is not transcoder_set",
                hint="circuit-tracer per-layer transcoders have model_kind: transcoder_set",
            )
        found.append("circuit-tracer")
    if (root / "cfg.json").is_file():
        if (root / "sae_weights.safetensors").is_file():
            found.append("saelens")
        if (root / "sae.safetensors").is_file():
            found.append("sparsify")
        if (
            not (root / "sae_weights.safetensors").is_file()
            and not (root / "sae.safetensors").is_file()
        ):
            raise FormatError(
                f"{root}: has cfg.json but neither sae_weights.safetensors (SAELens) nor sae.safetensors (sparsify)",
                hint="the weights file is missing; download the directory again",
            )
    if not found:
        subs = _sub_dirs(root)
        if subs["sparsify"] and not subs["saelens"]:
            found.append("sparsify")
        elif subs["saelens"] and not subs["sparsify"]:
            found.append("saelens")
        elif subs["saelens"] and subs["sparsify"]:
            found.extend(["sparsify", "saelens"])
    if len(found) > 1:
        raise FormatError(
            f"{root}: ambiguous transcoder directory: it matches {', '.join(found)}",
            hint="keep one format per directory",
        )
    if not found:
        entries = sorted(p.name for p in root.iterdir())[:20] if root.is_dir() else []
        raise FormatError(
            f"{root}: not a transcoder directory in any known format (found: {entries})",
            hint="expected circuit-tracer config.yaml + layer_{i}.safetensors, SAELens cfg.json + "
            "sae_weights.safetensors, or sparsify <hookpoint>/cfg.json + sae.safetensors",
        )
    return found[0]


def _sub_dirs(root: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {"sparsify": [], "saelens": []}
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if d.is_dir() and (d / "cfg.json").is_file():
            if (d / "sae.safetensors").is_file():
                out["sparsify"].append(d)
            elif (d / "sae_weights.safetensors").is_file():
                out["saelens"].append(d)
    return out


def read_layout(root: Path) -> TranscoderLayout:
    fmt = detect_format(root)
    if fmt == "goodfire":
        from spd_adapters.transcoder.goodfire import read_goodfire_transcoders

        layout: TranscoderLayout = read_goodfire_transcoders(root)
        return layout
    if fmt == "circuit-tracer":
        return read_circuit_tracer(root)
    if fmt == "saelens":
        return read_saelens(root)
    return read_sparsify(root)


# ----------------------------------------------------------------------------- sparsify


def read_sparsify(root: Path) -> TranscoderLayout:
    dirs = [root] if (root / "cfg.json").is_file() else _sub_dirs(root)["sparsify"]
    sites = [_sparsify_site(d) for d in dirs]
    run_cfg: dict[str, Any] = {}
    for cand in (root / "config.json", root.parent / "config.json"):
        if cand.is_file():
            run_cfg = read_json(cand)
            break
    model = run_cfg.get("model")
    return TranscoderLayout(
        format="sparsify",
        root=root,
        model_name=model if isinstance(model, str) else None,
        sites=sites,
        dataset=run_cfg.get("dataset") if isinstance(run_cfg.get("dataset"), str) else None,
        seq_len=run_cfg.get("ctx_len") if isinstance(run_cfg.get("ctx_len"), int) else None,
    )


def _sparsify_site(d: Path) -> SiteSource:
    cfg_path = d / "cfg.json"
    cfg = read_json(cfg_path)
    for flag in ("embed_skip", "gram_lookup"):
        if cfg.get(flag):
            raise FormatError(
                f"{cfg_path}: {flag}=true is not supported (it needs inputs other than the hookpoint's)",
            )
    if "d_in" not in cfg:
        raise FormatError(
            f"{cfg_path}: missing key 'd_in'", hint="sparsify writes d_in into cfg.json"
        )
    d_in = int(cfg["d_in"])
    act_name = cfg.get("activation", "topk")
    if act_name not in ("topk", "groupmax"):
        raise FormatError(
            f"{cfg_path}: unknown activation {act_name!r}",
            hint="sparsify sparse coders use 'topk' or 'groupmax'",
        )
    k = int(cfg.get("k", 32))
    transcode = bool(cfg.get("transcode", False))
    tf = TensorFile(d / "sae.safetensors")
    expected_n = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    tf.expect("encoder.weight", (expected_n, d_in), "[num_latents, d_in]")
    n = expected_n
    tf.expect("encoder.bias", (n,))
    tf.expect("W_dec", (n, d_in), "[num_latents, d_in]")
    tf.expect("b_dec", (d_in,))
    skip = bool(cfg.get("skip_connection", False))
    if skip:
        tf.expect("W_skip", (d_in, d_in))
    elif "W_skip" in tf:
        raise FormatError(f"{tf.path}: has tensor 'W_skip' but cfg.json says skip_connection=false")
    act = Activation(act_name, k=k, rectify=True)
    act.check(n, str(cfg_path))
    hookpoint = d.name
    where = str(cfg_path)
    if transcode:
        inp = _hooks.from_module_path(hookpoint, "input", where=where)
    else:
        inp = _hooks.from_module_path(hookpoint, "output", where=where)
    out = _hooks.from_module_path(hookpoint, "output", where=where)

    def load(decoder: bool = True) -> Dictionary:
        b_dec = tf.get("b_dec")
        return Dictionary(
            W_enc=tf.get("encoder.weight"),
            b_enc=tf.get("encoder.bias"),
            activation=act,
            W_dec=tf.get("W_dec") if decoder else None,
            b_dec=b_dec,
            input_bias=None if transcode else b_dec,
            W_skip=tf.get("W_skip") if skip and decoder else None,
        )

    return SiteSource(
        input_hook=inp,
        output_hook=out,
        native_input=f"{hookpoint} ({'input' if transcode else 'output'})",
        native_output=f"{hookpoint} (output)",
        n_features=n,
        d_in=d_in,
        d_out=d_in,
        activation=act.describe(),
        config_file=cfg_path,
        load=load,
        load_encoder=lambda: load(decoder=False),
    )


# ----------------------------------------------------------------------------- SAELens

_SAELENS_ARCHS = {
    # architecture -> (activation, is_transcoder, has_skip)
    "standard": ("relu", False, False),
    "jumprelu": ("jumprelu", False, False),
    "topk": ("topk", False, False),
    "transcoder": ("relu", True, False),
    "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}


def read_saelens(root: Path) -> TranscoderLayout:
    dirs = [root] if (root / "cfg.json").is_file() else _sub_dirs(root)["saelens"]
    sites: list[SiteSource] = []
    model = dataset = None
    seq_len = None
    prepend_bos: bool | None = None
    for d in dirs:
        site, meta = _saelens_site(d)
        sites.append(site)
        model = model or meta.get("model_name")
        dataset = dataset or meta.get("dataset_path")
        seq_len = seq_len or meta.get("context_size")
        if prepend_bos is None and isinstance(meta.get("prepend_bos"), bool):
            prepend_bos = meta["prepend_bos"]
    return TranscoderLayout(
        format="saelens",
        root=root,
        model_name=model if isinstance(model, str) else None,
        sites=sites,
        dataset=dataset if isinstance(dataset, str) else None,
        seq_len=seq_len if isinstance(seq_len, int) else None,
        # how the SAE's training sequences began: the host's harvest/eval default
        extra={} if prepend_bos is None else {"prepend_bos": prepend_bos},
    )


def _saelens_site(d: Path) -> tuple[SiteSource, dict[str, Any]]:
    cfg_path = d / "cfg.json"
    cfg = read_json(cfg_path)
    where = str(cfg_path)
    meta_raw = cfg.get("metadata")
    meta: dict[str, Any] = dict(meta_raw) if isinstance(meta_raw, dict) else {}
    # SAELens < 6 kept these at the top level; >= 6 moved them under "metadata" (some 6.x
    # releases wrote the SAEMetadata dict as "meta").
    alt_raw = cfg.get("meta")
    alt: dict[str, Any] = dict(alt_raw) if isinstance(alt_raw, dict) else {}
    keys = ("model_name", "hook_name", "hook_name_out", "dataset_path", "context_size")
    for key in (*keys, "prepend_bos"):
        if meta.get(key) is None and cfg.get(key) is not None:
            meta[key] = cfg[key]
        if meta.get(key) is None and alt.get(key) is not None:
            meta[key] = alt[key]
    arch = cfg.get("architecture", "standard")
    if arch not in _SAELENS_ARCHS:
        raise FormatError(
            f"{where}: unknown SAELens architecture {arch!r}",
            hint=f"supported architectures: {', '.join(_SAELENS_ARCHS)}",
        )
    act_name, is_tc, has_skip = _SAELENS_ARCHS[arch]
    # SAELens < 6: "standard" with activation_fn_str "topk" and activation_fn_kwargs {"k": ..}.
    legacy_act = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    if arch == "standard" and legacy_act is not None:
        if legacy_act == "topk":
            act_name = "topk"
        elif legacy_act != "relu":
            raise FormatError(
                f"{where}: unknown activation {legacy_act!r}",
                hint="supported SAELens activations: relu, topk (and the jumprelu architecture)",
            )
    for key in ("d_in", "d_sae"):
        if key not in cfg:
            raise FormatError(f"{where}: missing key {key!r}")
    d_in, n = int(cfg["d_in"]), int(cfg["d_sae"])
    d_out = int(cfg.get("d_out", d_in)) if is_tc else d_in
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise FormatError(
            f"{where}: normalize_activations={norm!r} is not supported",
            hint="fold the normalisation into the weights (SAELens fold_activation_norm_scaling_factor) and save again",
        )
    if cfg.get("reshape_activations", "none") not in (None, "none"):
        raise FormatError(
            f"{where}: reshape_activations={cfg['reshape_activations']!r} (attention hook_z SAEs) is not supported"
        )
    hook_in = meta.get("hook_name")
    if not isinstance(hook_in, str):
        raise FormatError(f"{where}: missing 'hook_name' (top level or under 'metadata')")
    hook_out = meta.get("hook_name_out") if is_tc else None
    if is_tc and not isinstance(hook_out, str):
        raise FormatError(
            f"{where}: transcoder architecture {arch!r} but no 'hook_name_out'",
            hint="SAELens transcoders record the output hook as metadata.hook_name_out",
        )
    inp = _hooks.from_transformerlens(hook_in, where=where)
    out = _hooks.from_transformerlens(hook_out, where=where) if isinstance(hook_out, str) else inp
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", not is_tc)) and not is_tc
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False)) and act_name == "topk"

    tf = TensorFile(d / "sae_weights.safetensors")
    tf.expect("W_enc", (d_in, n), "[d_in, d_sae]")
    tf.expect("b_enc", (n,))
    tf.expect("W_dec", (n, d_out), "[d_sae, d_out]")
    tf.expect("b_dec", (d_out,))
    thr_key = None
    if act_name == "jumprelu":
        thr_key = "threshold" if "threshold" in tf or "log_threshold" not in tf else "log_threshold"
        tf.expect(thr_key, (n,), "one threshold per feature")
    if has_skip:
        tf.expect("W_skip", (d_out, d_in), "[d_out, d_in]")
    if act_name == "topk":
        if k is None:
            raise FormatError(f"{where}: topk architecture but no 'k'")
        Activation("topk", k=int(k)).check(n, where)

    def load(decoder: bool = True) -> Dictionary:
        threshold = None
        if thr_key is not None:
            threshold = tf.get(thr_key)
            if thr_key == "log_threshold":
                threshold = threshold.exp()
        act = Activation(
            act_name, k=int(k) if k is not None else None, rectify=True, threshold=threshold
        )
        act.check(n, str(tf.path))
        W_dec = tf.get("W_dec") if decoder or rescale else None
        b_dec = tf.get("b_dec")
        return Dictionary(
            W_enc=tf.get("W_enc").T.contiguous(),
            b_enc=tf.get("b_enc"),
            activation=act,
            W_dec=W_dec if decoder else None,
            b_dec=b_dec,
            input_bias=b_dec if apply_b_dec else None,
            W_skip=tf.get("W_skip") if has_skip and decoder else None,
            pre_scale=W_dec.norm(dim=-1) if rescale and W_dec is not None else None,
        )

    desc = act_name if act_name != "topk" else f"topk(k={k})"
    site = SiteSource(
        input_hook=inp,
        output_hook=out,
        native_input=hook_in,
        native_output=hook_out if isinstance(hook_out, str) else hook_in,
        n_features=n,
        d_in=d_in,
        d_out=d_out,
        activation=desc,
        config_file=cfg_path,
        load=load,
        load_encoder=lambda: load(decoder=False),
    )
    return site, meta


# ----------------------------------------------------------------------------- circuit-tracer


def read_circuit_tracer(root: Path) -> TranscoderLayout:
    cfg_path = root / "config.yaml"
    cfg = read_yaml(cfg_path)
    where = str(cfg_path)
    for key in ("feature_input_hook", "feature_output_hook"):
        if not isinstance(cfg.get(key), str):
            raise FormatError(
                f"{where}: missing key {key!r}", hint="circuit-tracer configs name both hooks"
            )
    files = _circuit_tracer_files(root, cfg, where)
    act_cfg = cfg.get("activation")
    if act_cfg is not None and act_cfg not in ("relu", "topk", "jumprelu", "jump_relu"):
        raise FormatError(
            f"{where}: unknown activation {act_cfg!r}",
            hint="circuit-tracer transcoders use relu, topk (with k) or JumpReLU (threshold in the weights)",
        )
    sites = [_circuit_tracer_site(i, path, cfg, cfg_path) for i, path in enumerate(files)]
    model = cfg.get("model_name")
    return TranscoderLayout(
        format="circuit-tracer",
        root=root,
        model_name=model if isinstance(model, str) else None,
        sites=sites,
        dataset=cfg.get("dataset") if isinstance(cfg.get("dataset"), str) else None,
        extra={k: v for k, v in cfg.items() if k in ("scan", "activation", "k")},
    )


def _circuit_tracer_files(root: Path, cfg: dict[str, Any], where: str) -> list[Path]:
    listed = cfg.get("transcoders")
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise FormatError(f"{where}: 'transcoders' must be a list of file paths")
        out = []
        for p in listed:
            if p.startswith("hf://"):
                raise FormatError(
                    f"{where}: transcoder file {p!r} lives in another Hub repo",
                    hint="download it next to config.yaml and list the local file name instead",
                )
            out.append(Path(p) if Path(p).is_absolute() else root / p)
        return out
    layer_files = {}
    for p in root.glob("layer_*.safetensors"):
        m = re.fullmatch(r"layer_(\d+)\.safetensors", p.name)
        if m:
            layer_files[int(m.group(1))] = p
    if not layer_files:
        raise FormatError(
            f"{root}: config.yaml says transcoder_set but there is no layer_{{i}}.safetensors",
            hint="circuit-tracer writes one layer_{i}.safetensors per layer",
        )
    missing = sorted(set(range(max(layer_files) + 1)) - set(layer_files))
    if missing:
        raise FormatError(
            f"{root}: missing layer_{missing[0]}.safetensors (have layers {sorted(layer_files)})",
            hint="a transcoder set needs every layer from 0 to the last one",
        )
    return [layer_files[i] for i in range(len(layer_files))]


def _circuit_tracer_site(layer: int, path: Path, cfg: dict[str, Any], cfg_path: Path) -> SiteSource:
    where = str(cfg_path)
    tf = TensorFile(path)
    n, d = tf.shape("W_enc") if len(tf.shape("W_enc")) == 2 else (0, 0)
    if n == 0:
        raise FormatError(
            f"{path}: tensor 'W_enc' has shape {list(tf.shape('W_enc'))}, expected [d_transcoder, d_model]"
        )
    tf.expect("b_enc", (n,))
    d_out = tf.shape("b_dec")[0] if len(tf.shape("b_dec")) == 1 else -1
    tf.expect("b_dec", (d_out,))
    tf.expect("W_dec", (n, d_out), "[d_transcoder, d_model]")
    has_skip = "W_skip" in tf
    if has_skip:
        tf.expect("W_skip", (d_out, d), "[d_model_out, d_model_in]")
    act_cfg = cfg.get("activation")
    thr_key = "activation_function.threshold"
    if act_cfg == "topk":
        k = cfg.get("k")
        if k is None and "k" in tf:
            k = int(tf.get("k", dtype=None).item())
        act_name, kk = "topk", int(k) if k is not None else None
        Activation("topk", k=kk).check(n, where)
    elif act_cfg == "relu" or (act_cfg is None and thr_key not in tf):
        act_name, kk = "relu", None
    else:
        if thr_key not in tf:
            raise FormatError(
                f"{path}: activation is JumpReLU but tensor {thr_key!r} is missing",
                hint="JumpReLU transcoders store their thresholds as activation_function.threshold",
            )
        shape = tf.shape(thr_key)
        if math.prod(shape) != n or (len(shape) > 1 and any(s != 1 for s in shape[:-1])):
            raise FormatError(
                f"{path}: tensor {thr_key!r} has shape {list(shape)}, expected [{n}] (one threshold per feature)",
                hint="the threshold must have one entry per transcoder feature",
            )
        act_name, kk = "jumprelu", None
    hooks_where = f"{where} (layer {layer})"
    inp = _hooks.from_block_relative(cfg["feature_input_hook"], layer, where=hooks_where)
    out = _hooks.from_block_relative(cfg["feature_output_hook"], layer, where=hooks_where)

    def load(decoder: bool = True) -> Dictionary:
        threshold = tf.get(thr_key).reshape(n) if act_name == "jumprelu" else None
        act = Activation(act_name, k=kk, rectify=False, threshold=threshold)
        return Dictionary(
            W_enc=tf.get("W_enc"),
            b_enc=tf.get("b_enc"),
            activation=act,
            W_dec=tf.get("W_dec") if decoder else None,
            b_dec=tf.get("b_dec"),
            W_skip=tf.get("W_skip") if has_skip and decoder else None,
        )

    return SiteSource(
        input_hook=inp,
        output_hook=out,
        native_input=cfg["feature_input_hook"],
        native_output=cfg["feature_output_hook"],
        n_features=n,
        d_in=d,
        d_out=d_out,
        activation=act_name if kk is None else f"topk(k={kk})",
        config_file=cfg_path,
        load=load,
        load_encoder=lambda: load(decoder=False),
    )
