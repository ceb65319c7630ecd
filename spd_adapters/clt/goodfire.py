"""Goodfire's cross-layer transcoder checkpoints (nn_decompositions ``CrossLayerTranscoder``).

On disk (one wandb artifact, ``{run name}_checkpoint_{step}``, downloaded to a directory):

- ``config.json``: the trainer's ``CLTConfig``, non-scalars written as ``str(value)``, so
  ``"layers": "[0, 1, 2, 3]"`` (a list's string form; a real JSON list is accepted too),
  ``input_size``, ``output_size``, ``dict_size`` (features *per layer*), ``encoder_type``,
  ``top_k``, ``batch_size`` (training batch, tokens), ``dtype``.
- ``encoder.pt``: the module's ``state_dict``. Its parameters are ``nn.ParameterList``s, so keys
  carry the *position* ``p`` in ``layers`` (0..n-1), not the layer number:
  ``W_enc.{p} [input_size, dict_size]``, ``b_enc.{p} [dict_size]``,
  ``W_dec.{p} [n - p, dict_size, output_size]`` (slice ``[q - p]`` writes into target position
  ``q >= p``), ``b_dec.{p} [output_size]`` (the bias of *target* position ``p``), and for
  ``encoder_type: jumprelu`` ``jumprelu_log_thresholds.{p} [dict_size]``.

Maths: ``dense_p = relu(x_p @ W_enc.{p} + b_enc.{p})`` (no pre-encoder bias, no input
normalisation); ``batchtopk`` keeps the ``top_k * N`` largest entries of each layer's
``[N, dict_size]`` block separately; ``topk`` keeps ``top_k`` per token; ``jumprelu`` keeps
entries above ``exp(log_threshold)``; ``vanilla`` is ``dense``. Target ``q``:
``y_q = b_dec.{q} + sum_{p <= q} acts_p @ W_dec.{p}[q - p]``. Encoder ``p`` reads the input of
module ``h.{layers[p]}.mlp`` (the output of ``rms_2``) and the decoders write that module's
output, which is how Goodfire's harvest hooks it: canonical ``{l}.mlp_in`` -> ``{l}.mlp_out``.

Goodfire's own loader reads ``W_enc.{layer}``; it therefore only ever loaded CLTs whose layers
are ``0..n-1``, where position and layer number coincide.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from torch import Tensor

from spd_adapters import _hooks
from spd_adapters._dictionary import Activation, apply_activation
from spd_adapters._files import read_json
from spd_adapters.transcoder import goodfire as gf
from spd_host.errors import FormatError


class CLTCheckpointConfig(BaseModel):
    """The fields of a CLT ``config.json`` this reader uses."""

    model_config = ConfigDict(extra="allow", frozen=True)

    layers: list[int]
    input_size: int
    output_size: int | None = None
    dict_size: int
    encoder_type: str
    top_k: int = 32
    batch_size: int | None = None
    input_unit_norm: bool = False

    @field_validator("layers", mode="before")
    @classmethod
    def _layers_from_string(cls, v: Any) -> Any:
        # save_checkpoint writes str([0, 1, 2, 3]); Goodfire's loader json-decodes it.
        if isinstance(v, str):
            try:
                return json.loads(v)
            except json.JSONDecodeError as err:
                raise ValueError(f"layers {v!r} is not a list") from err
        return v


@dataclass(frozen=True)
class GoodfireCLTLayer:
    layer: int  # the model layer (site name layer_{layer})
    input_hook: str
    output_hook: str


@dataclass
class GoodfireCLTLayout:
    """A Goodfire CLT checkpoint's metadata; weights are read by :meth:`model`."""

    root: Path  # what the ID names: the checkpoint directory or a CLTHarvestConfig file
    checkpoint: Path
    cfg: CLTCheckpointConfig
    model_name: str | None
    inference: str | None
    layers: list[GoodfireCLTLayer]
    d_out: int
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = "goodfire"
    native_input: str = "h.{i}.mlp (input)"
    native_output: str = "h.{i}.mlp (output)"

    @property
    def config_file(self) -> Path:
        return self.checkpoint / gf.CONFIG_FILE

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_features(self) -> int:
        return self.cfg.dict_size

    @property
    def activation_name(self) -> str:
        return gf.describe(_as_encoder_cfg(self.cfg, self.d_out), self.inference)

    def model(self) -> GoodfireCLT:
        return GoodfireCLT(self)


def _as_encoder_cfg(cfg: CLTCheckpointConfig, d_out: int) -> gf.EncoderCheckpointConfig:
    return gf.EncoderCheckpointConfig(
        input_size=cfg.input_size,
        output_size=d_out,
        dict_size=cfg.dict_size,
        encoder_type=cfg.encoder_type,
        top_k=cfg.top_k,
        batch_size=cfg.batch_size,
    )


def read_checkpoint_config(root: Path) -> CLTCheckpointConfig:
    path = root / gf.CONFIG_FILE
    raw = read_json(path)
    if "layers" not in raw:
        raise FormatError(
            f"{path}: missing key 'layers': not a cross-layer transcoder checkpoint",
            hint="a per-layer transcoder checkpoint loads with the transcoder method, through a "
            "TranscoderHarvestConfig YAML",
        )
    try:
        cfg = CLTCheckpointConfig.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = f"missing key {key!r}" if first["type"] == "missing" else f"{key}: {first['msg']}"
        raise FormatError(
            f"{path}: {msg}",
            hint="nn_decompositions writes layers, input_size, output_size, dict_size, "
            "encoder_type and top_k",
        ) from err
    if cfg.encoder_type not in gf.ENCODER_TYPES:
        raise FormatError(
            f"{path}: unknown encoder_type {cfg.encoder_type!r}",
            hint=f"supported encoder types: {', '.join(gf.ENCODER_TYPES)}",
        )
    if not cfg.layers or len(set(cfg.layers)) != len(cfg.layers):
        raise FormatError(
            f"{path}: layers {cfg.layers} must be a non-empty list of distinct layers"
        )
    if cfg.input_unit_norm:
        raise FormatError(f"{path}: input_unit_norm is not part of nn_decompositions' CLT")
    return cfg


def read_goodfire_clt(
    root: Path, *, model_name: str | None = None, inference: str | None = None
) -> GoodfireCLTLayout:
    """A CLT checkpoint directory (or a ``CLTHarvestConfig`` file naming one) -> layout."""
    checkpoint = root
    if root.is_file():
        spec = gf.validate_spec(gf.CLTHarvestSpec, gf.read_harvest_spec(root), root)
        where = f"{root} (artifact_path)"
        checkpoint = gf.resolve_artifact(spec.artifact_path, root.parent, where)
        model_name = gf.resolve_base_model(spec.base_model_path, root.parent)
        inference = inference if inference is not None else spec.inference
    cfg = read_checkpoint_config(checkpoint)
    where = str(checkpoint / gf.CONFIG_FILE)
    gf.check_inference(inference, cfg.encoder_type, where)
    sd = gf.load_state_dict(checkpoint)  # memory-mapped: shapes without reading weights
    path = checkpoint / gf.WEIGHTS_FILE
    n = len(cfg.layers)
    d_out = cfg.output_size
    if d_out is None:
        b = sd.get("b_dec.0")
        if b is None or b.dim() != 1:
            raise FormatError(f"{where}: missing key 'output_size' (and no 'b_dec.0' to infer it)")
        d_out = int(b.shape[0])
    for p in range(n):
        gf.expect_tensor(
            sd, f"W_enc.{p}", (cfg.input_size, cfg.dict_size), path, "[input_size, dict_size]"
        )
        gf.expect_tensor(sd, f"b_enc.{p}", (cfg.dict_size,), path, "[dict_size]")
        gf.expect_tensor(
            sd, f"W_dec.{p}", (n - p, cfg.dict_size, d_out), path,
            f"[n_layers - {p}, dict_size, output_size]",
        )  # fmt: skip
        gf.expect_tensor(sd, f"b_dec.{p}", (d_out,), path, "[output_size]")
        if cfg.encoder_type == "jumprelu":
            gf.expect_tensor(
                sd, f"jumprelu_log_thresholds.{p}", (cfg.dict_size,), path, "[dict_size]"
            )
    gf.reject_unexpected(sd, expected_keys(n, cfg.encoder_type), path)
    layers = []
    for layer in cfg.layers:
        mp = f"h.{layer}.mlp"
        w = f"{where} (layer {layer})"
        layers.append(
            GoodfireCLTLayer(
                layer=layer,
                input_hook=_hooks.from_module_path(mp, "input", where=w),
                output_hook=_hooks.from_module_path(mp, "output", where=w),
            )
        )
    return GoodfireCLTLayout(
        root=root,
        checkpoint=checkpoint,
        cfg=cfg,
        model_name=model_name,
        inference=inference,
        layers=layers,
        d_out=d_out,
        extra={
            "prepend_bos": False,  # Goodfire's harvest data loader: add_bos_token=False
            "layers": list(cfg.layers),
            **gf.batch_metadata(_as_encoder_cfg(cfg, d_out), inference),
        },
    )


def expected_keys(n: int, encoder_type: str) -> set[str]:
    keys = {f"{k}.{p}" for k in ("W_enc", "b_enc", "W_dec", "b_dec") for p in range(n)}
    if encoder_type == "jumprelu":
        keys |= {f"jumprelu_log_thresholds.{p}" for p in range(n)}
    return keys


class GoodfireCLT:
    """The CLT's maths over positions ``0..n-1`` (``layout.layers[p]`` is the model layer)."""

    def __init__(self, layout: GoodfireCLTLayout) -> None:
        self.layout = layout
        self.device: torch.device = torch.device("cpu")
        self._weights: dict[str, Tensor] | None = None

    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    def to(self, device: str | torch.device) -> GoodfireCLT:
        self.device = torch.device(device)
        if self._weights is not None:
            self._weights = {k: v.to(self.device) for k, v in self._weights.items()}
        return self

    def _w(self, key: str) -> Tensor:
        if self._weights is None:
            sd = gf.load_state_dict(self.layout.checkpoint)
            self._weights = {
                k: v.to(device=self.device, dtype=torch.float32) for k, v in sd.items()
            }
        return self._weights[key]

    def activation(self, p: int) -> Activation:
        cfg = self.layout.cfg
        act = gf.trained_activation(
            _as_encoder_cfg(cfg, self.layout.d_out), str(self.layout.config_file)
        )
        if cfg.encoder_type == "jumprelu":
            act = replace(act, threshold=self._w(f"jumprelu_log_thresholds.{p}").exp())
        return gf.with_inference(act, self.layout.inference)

    def encode_layer(self, p: int, x: Tensor) -> Tensor:
        """Feature activations ``[..., n]`` of position ``p`` for its input ``x [..., d]``.

        BatchTopK ranks all ``N`` tokens of ``x`` together (all leading dims flattened).
        """
        pre, act = self.encoder_parts(p)
        return apply_activation(pre(x), act)

    def encoder_parts(self, p: int) -> tuple[Callable[[Tensor], Tensor], Activation]:
        """``(pre-activation function, activation)`` of position ``p``: ``encode_layer`` is
        ``activation(pre(x))`` (the harvest applies them a block of positions at a time)."""
        W, b = self._w(f"W_enc.{p}"), self._w(f"b_enc.{p}")

        def pre(x: Tensor) -> Tensor:
            return x.to(W.dtype) @ W + b

        return pre, self.activation(p)

    def decode_layer(self, q: int, acts: Mapping[int, Tensor]) -> Tensor:
        """Target position ``q``'s MLP output from the activations of positions ``<= q``."""
        out = self._w(f"b_dec.{q}")
        for p in range(q + 1):
            if p not in acts:
                raise ValueError(f"decoding position {q} needs the activations of position {p}")
            out = out + acts[p].to(out.dtype) @ self.decoder(p, q)
        return out

    def decoder(self, p: int, q: int) -> Tensor:
        """``W_dec.{p}[q - p]`` (``[n, d]``): position ``p`` writing into position ``q``."""
        if not 0 <= p <= q < self.n_layers:
            raise ValueError(f"position {p} cannot write to position {q}")
        return self._w(f"W_dec.{p}")[q - p]

    def reconstruct(self, inputs: Mapping[int, Tensor]) -> dict[int, Tensor]:
        acts = {p: self.encode_layer(p, x) for p, x in inputs.items()}
        return {
            q: self.decode_layer(q, acts)
            for q in range(self.n_layers)
            if all(p in acts for p in range(q + 1))
        }
