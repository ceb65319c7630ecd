"""circuit-tracer cross-layer transcoders: reader and the lazy maths behind them.

On disk (as circuit-tracer's ``CrossLayerTranscoder.to_safetensors`` writes and ``load_clt``
reads it): ``config.yaml`` with ``model_kind: cross_layer_transcoder``, ``model_name``,
``feature_input_hook`` (default ``hook_resid_mid``) and ``feature_output_hook`` (default
``hook_mlp_out``); for each source layer ``i`` of ``L``:

- ``W_enc_{i}.safetensors``: ``W_enc_{i} [n, d]``, ``b_enc_{i} [n]``, ``b_dec_{i} [d]`` (the
  output bias of *target* layer ``i``), optional ``threshold_{i} [n]``;
- ``W_dec_{i}.safetensors``: ``W_dec_{i} [n, L - i, d]``; slice ``[:, j - i, :]`` is what the
  features read at layer ``i`` write into the MLP output of layer ``j >= i``.

Semantics: ``acts_i = act(x_i @ W_enc_i.T + b_enc_i)`` with ``act`` = ReLU, or JumpReLU as
circuit-tracer computes it (``pre * (pre > threshold_i)``, no clamping) when thresholds are
present; ``mlp_out_j = b_dec_j + sum_{i <= j} acts_i @ W_dec_i[:, j - i, :]``.

Decoders are never loaded whole: each target layer reads ``W_dec_i[:, j - i, :]`` through
``safe_open(...).get_slice`` (so a CLT larger than RAM still harvests, which needs encoders
only, and still splices). Slices are cached up to a byte budget.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spd_adapters import _hooks
from spd_adapters._dictionary import Activation, apply_activation
from spd_adapters._files import TensorFile, read_yaml
from spd_host.errors import FormatError

DEFAULT_INPUT_HOOK = "hook_resid_mid"
DEFAULT_OUTPUT_HOOK = "hook_mlp_out"
DECODER_CACHE_BYTES = 512 * 2**20


@dataclass
class CLTLayer:
    """One source layer: where it reads, its encoder file and its decoder file."""

    layer: int
    input_hook: str  # canonical
    output_hook: str  # canonical (this layer's MLP output, a decoder target)
    enc: TensorFile
    dec: TensorFile


@dataclass
class CLTLayout:
    root: Path
    config_file: Path
    model_name: str | None
    n_layers: int
    n_features: int
    d_model: int
    jumprelu: bool
    native_input: str
    native_output: str
    layers: list[CLTLayer]
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = "circuit-tracer"

    @property
    def activation_name(self) -> str:
        return "JumpReLU" if self.jumprelu else "ReLU"

    def model(self) -> CrossLayerTranscoder:
        return CrossLayerTranscoder(self)


def read_clt(root: Path) -> CLTLayout:
    cfg_path = root / "config.yaml"
    if not cfg_path.is_file():
        raise FormatError(
            f"{root}: no config.yaml",
            hint="a circuit-tracer CLT directory has config.yaml, W_enc_{i}.safetensors and W_dec_{i}.safetensors",
        )
    cfg = read_yaml(cfg_path)
    where = str(cfg_path)
    kind = cfg.get("model_kind")
    if kind != "cross_layer_transcoder":
        hint = (
            f"per-layer transcoders load with the transcoder method: transcoder:{root}"
            if kind == "transcoder_set"
            else "set model_kind: cross_layer_transcoder"
        )
        raise FormatError(f"{where}: model_kind is {kind!r}, not cross_layer_transcoder", hint=hint)
    act = cfg.get("activation")
    if act is not None and act not in ("relu", "jumprelu", "jump_relu"):
        raise FormatError(
            f"{where}: unknown activation {act!r}",
            hint="circuit-tracer CLTs use relu, or JumpReLU with threshold_{i} tensors",
        )
    in_hook = cfg.get("feature_input_hook", DEFAULT_INPUT_HOOK)
    out_hook = cfg.get("feature_output_hook", DEFAULT_OUTPUT_HOOK)
    enc_ids = sorted(
        int(m.group(1))
        for p in root.glob("W_enc_*.safetensors")
        if (m := re.fullmatch(r"W_enc_(\d+)\.safetensors", p.name))
    )
    if not enc_ids:
        raise FormatError(
            f"{root}: no W_enc_{{i}}.safetensors files", hint="the CLT's encoders are missing"
        )
    L = max(enc_ids) + 1
    missing = sorted(set(range(L)) - set(enc_ids))
    if missing:
        raise FormatError(f"{root}: missing W_enc_{missing[0]}.safetensors (have {enc_ids})")
    layers: list[CLTLayer] = []
    n = d = -1
    jumprelu = False
    for i in range(L):
        enc = TensorFile(root / f"W_enc_{i}.safetensors")
        dec = TensorFile(root / f"W_dec_{i}.safetensors")
        shape = enc.shape(f"W_enc_{i}")
        if i == 0:
            if len(shape) != 2:
                raise FormatError(
                    f"{enc.path}: tensor 'W_enc_0' has shape {list(shape)}, expected [n_features, d_model]"
                )
            n, d = shape
            jumprelu = "threshold_0" in enc
            if act in ("jumprelu", "jump_relu") and not jumprelu:
                raise FormatError(
                    f"{enc.path}: config says JumpReLU but tensor 'threshold_0' is missing"
                )
        enc.expect(f"W_enc_{i}", (n, d), "[n_features, d_model], as in layer 0")
        enc.expect(f"b_enc_{i}", (n,))
        enc.expect(f"b_dec_{i}", (d,))
        if jumprelu:
            enc.expect(f"threshold_{i}", (n,), "one threshold per feature")
        elif f"threshold_{i}" in enc:
            raise FormatError(
                f"{enc.path}: has 'threshold_{i}' but W_enc_0.safetensors has no threshold_0"
            )
        dec.expect(f"W_dec_{i}", (n, L - i, d), f"[n_features, n_layers - {i}, d_model]")
        w = f"{where} (layer {i})"
        layers.append(
            CLTLayer(
                layer=i,
                input_hook=_hooks.from_block_relative(in_hook, i, where=w),
                output_hook=_hooks.from_block_relative(out_hook, i, where=w),
                enc=enc,
                dec=dec,
            )
        )
    model = cfg.get("model_name")
    return CLTLayout(
        root=root,
        config_file=cfg_path,
        model_name=model if isinstance(model, str) else None,
        n_layers=L,
        n_features=n,
        d_model=d,
        jumprelu=jumprelu,
        native_input=in_hook,
        native_output=out_hook,
        layers=layers,
        extra={k: v for k, v in cfg.items() if k in ("scan", "dataset")},
    )


class CrossLayerTranscoder:
    """Encoders loaded per layer on first use; decoder slices read lazily (module docstring)."""

    def __init__(self, layout: CLTLayout, *, decoder_cache_bytes: int = DECODER_CACHE_BYTES):
        self.layout = layout
        self._enc: dict[int, tuple[Tensor, Tensor, Activation]] = {}
        self._b_dec: dict[int, Tensor] = {}
        self._dec: dict[tuple[int, int], Tensor] = {}
        self._dec_bytes = 0
        self.decoder_cache_bytes = decoder_cache_bytes
        self.decoder_reads = 0  # slices read from disk (observable in tests)
        self.device: torch.device = torch.device("cpu")

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    def to(self, device: str | torch.device) -> CrossLayerTranscoder:
        self.device = torch.device(device)
        self._enc.clear()
        self._b_dec.clear()
        self._dec.clear()
        self._dec_bytes = 0
        return self

    def _encoder(self, i: int) -> tuple[Tensor, Tensor, Activation]:
        if i not in self._enc:
            enc = self.layout.layers[i].enc
            W = enc.get(f"W_enc_{i}").to(self.device)
            b = enc.get(f"b_enc_{i}").to(self.device)
            thr = enc.get(f"threshold_{i}").to(self.device) if self.layout.jumprelu else None
            act = Activation(
                "jumprelu" if thr is not None else "relu", rectify=False, threshold=thr
            )
            self._enc[i] = (W, b, act)
        return self._enc[i]

    def encode_layer(self, i: int, x: Tensor) -> Tensor:
        """Feature activations ``[..., n]`` of source layer ``i`` for its input ``x [..., d]``."""
        pre, act = self.encoder_parts(i)
        return apply_activation(pre(x), act)

    def encoder_parts(self, i: int) -> tuple[Callable[[Tensor], Tensor], Activation]:
        """``(pre-activation function, activation)`` of source layer ``i``: ``encode_layer``
        is ``activation(pre(x))`` (the harvest applies them a block of positions at a time)."""
        W, b, act = self._encoder(i)

        def pre(x: Tensor) -> Tensor:
            return x.to(W.dtype) @ W.T + b

        return pre, act

    def b_dec(self, j: int) -> Tensor:
        if j not in self._b_dec:
            self._b_dec[j] = self.layout.layers[j].enc.get(f"b_dec_{j}").to(self.device)
        return self._b_dec[j]

    def decoder(self, i: int, j: int) -> Tensor:
        """``W_dec_i[:, j - i, :]`` (``[n, d]``): source layer ``i`` writing into layer ``j``."""
        if not 0 <= i <= j < self.n_layers:
            raise ValueError(f"source layer {i} cannot write to layer {j}")
        key = (i, j)
        hit = self._dec.get(key)
        if hit is not None:
            return hit
        dec = self.layout.layers[i].dec
        t = dec.get_slice(f"W_dec_{i}", (slice(None), slice(j - i, j - i + 1), slice(None)))
        t = t[:, 0, :].contiguous().to(self.device)
        self.decoder_reads += 1
        size = t.numel() * t.element_size()
        if self._dec_bytes + size <= self.decoder_cache_bytes:
            self._dec[key] = t
            self._dec_bytes += size
        return t

    def decode_layer(self, j: int, acts: Mapping[int, Tensor]) -> Tensor:
        """Reconstruction of layer ``j``'s MLP output from the activations of sources ``<= j``."""
        out = self.b_dec(j)
        for i in range(j + 1):
            if i not in acts:
                raise ValueError(f"decoding layer {j} needs the activations of source layer {i}")
            out = out + acts[i].to(out.dtype) @ self.decoder(i, j)
        return out

    def reconstruct(self, inputs: Mapping[int, Tensor]) -> dict[int, Tensor]:
        acts = {i: self.encode_layer(i, x) for i, x in inputs.items()}
        return {
            j: self.decode_layer(j, acts)
            for j in range(self.n_layers)
            if all(i in acts for i in range(j + 1))
        }
