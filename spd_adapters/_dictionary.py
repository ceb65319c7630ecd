"""The maths shared by transcoders, SAEs and CLT encoders: one sparse dictionary per site.

Every format we read (sparsify, SAELens, circuit-tracer) is normalised on load into the same
orientation so that one implementation of ``encode``/``decode`` serves all of them:

- ``W_enc [n, d_in]`` and ``b_enc [n]``: ``pre = (x - input_bias) @ W_enc.T + b_enc``;
- ``pre_scale [n]`` (optional): ``pre *= pre_scale`` before the activation (SAELens
  ``rescale_acts_by_decoder_norm``), undone before decoding;
- ``input_norm`` (optional): ``x = (x - mean(x)) / (std(x) + 1e-5)`` per token before
  everything else (nn_decompositions' ``input_unit_norm``); the reconstruction is then mapped
  back with the *target's* own mean and std, so decoding needs the target (see ``decode``);
- the activation (:class:`Activation`): ReLU, JumpReLU, TopK, BatchTopK or GroupMax, each with
  the exact sign convention of the library that wrote the file (``rectify``);
- ``W_dec [n, d_out]``, ``b_dec [d_out]``: ``out = acts @ W_dec + b_dec``;
- ``W_skip [d_out, d_in]`` (optional): ``out += x @ W_skip.T``.

The formats differ in orientation (SAELens stores ``W_enc [d_in, n]``), in whether ``b_dec``
is subtracted before encoding (SAEs yes, transcoders no) and in JumpReLU/TopK sign handling;
the readers in ``formats.py`` resolve those differences, this module does not guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from spd_host.errors import FormatError

ActivationKind = Literal["relu", "jumprelu", "topk", "batchtopk", "groupmax"]
ACTIVATION_KINDS: tuple[str, ...] = ("relu", "jumprelu", "topk", "batchtopk", "groupmax")
UNIT_NORM_EPS = 1e-5  # nn_decompositions' input_unit_norm: (x - mean) / (std + 1e-5)


@dataclass(frozen=True)
class Activation:
    """A sparsifying nonlinearity, exactly as one library defines it.

    - ``relu``: ``relu(pre)``.
    - ``jumprelu``: ``relu(pre) * (pre > threshold)`` when ``rectify`` (SAELens; the
      issue's definition), ``pre * (pre > threshold)`` otherwise (circuit-tracer; the two agree
      whenever ``threshold >= 0``). ``threshold`` is the raw threshold, one per feature.
    - ``topk``: keep the ``k`` largest pre-activations along the feature dim, zero the rest;
      with ``rectify`` the kept values are clamped at 0 (sparsify and SAELens), without it
      they are kept as they are (circuit-tracer's ``TopK``).
    - ``batchtopk``: ``relu(pre)``, then keep the ``k * N`` largest values of the whole
      ``[N, n]`` block of the ``N`` tokens passed in one call (all leading dims flattened), zero
      the rest (nn_decompositions' BatchTopK, which Goodfire's adapters use at harvest time).
      ``k`` is the *average* number of active features per token; a token's activations depend
      on the other tokens of its batch.
    - ``groupmax``: split the ``n`` features into ``k`` contiguous groups of ``n // k`` and
      keep each group's maximum of ``relu(pre)`` (sparsify).
    """

    kind: str  # one of ACTIVATION_KINDS (checked by check())
    k: int | None = None
    rectify: bool = True
    threshold: Tensor | None = field(default=None, compare=False)

    def describe(self) -> str:
        if self.kind in ("topk", "groupmax"):
            return f"{self.kind}(k={self.k})"
        if self.kind == "batchtopk":
            return f"batchtopk(k={self.k} per token, over each batch)"
        return self.kind

    def check(self, n: int, where: str) -> None:
        """Validate against a dictionary of ``n`` features; ``where`` names the file."""
        if self.kind not in ACTIVATION_KINDS:
            raise FormatError(
                f"{where}: unknown activation {self.kind!r}",
                hint=f"supported activations: {', '.join(ACTIVATION_KINDS)}",
            )
        if self.kind in ("topk", "batchtopk", "groupmax"):
            if self.k is None or self.k <= 0 or self.k > n:
                raise FormatError(
                    f"{where}: activation {self.kind} needs 0 < k <= {n} (the number of features), got k={self.k}",
                    hint="set k in the config to the number of active features the dictionary was trained with",
                )
            if self.kind == "groupmax" and n % self.k:
                raise FormatError(
                    f"{where}: groupmax needs the number of features ({n}) to be divisible by k={self.k}",
                )
        if self.kind == "jumprelu":
            t = self.threshold
            if t is None:
                raise FormatError(f"{where}: jumprelu activation but no threshold tensor")
            if tuple(t.shape) != (n,):
                raise FormatError(
                    f"{where}: threshold has shape {list(t.shape)}, expected [{n}] (one per feature)",
                    hint="the threshold must have one entry per dictionary feature",
                )

    def __call__(self, pre: Tensor) -> Tensor:
        return apply_activation(pre, self)


def apply_activation(pre: Tensor, act: Activation) -> Tensor:
    """Apply ``act`` along the last dimension of ``pre`` (dense output, same shape)."""
    if act.kind == "relu":
        return torch.relu(pre)
    if act.kind == "jumprelu":
        assert act.threshold is not None
        t = act.threshold.to(device=pre.device, dtype=pre.dtype)
        base = torch.relu(pre) if act.rectify else pre
        return base * (pre > t).to(pre.dtype)
    if act.kind == "topk":
        assert act.k is not None
        values, indices = pre.topk(act.k, dim=-1, sorted=False)
        if act.rectify:
            values = values.clamp_min(0)
        return torch.zeros_like(pre).scatter(-1, indices, values)
    if act.kind == "batchtopk":
        assert act.k is not None
        return batch_topk(torch.relu(pre), act.k)
    if act.kind == "groupmax":
        assert act.k is not None
        n = pre.shape[-1]
        grouped = torch.relu(pre).unflatten(-1, (act.k, n // act.k))
        values, idx = grouped.max(dim=-1, keepdim=True)
        return torch.zeros_like(grouped).scatter(-1, idx, values).flatten(-2)
    raise FormatError(f"unknown activation {act.kind!r}", hint=f"supported: {ACTIVATION_KINDS}")


def batch_topk(acts: Tensor, k: int) -> Tensor:
    """Keep the ``k * N`` largest entries of ``acts [..., n]`` over all ``N`` leading positions."""
    n_tokens = acts.numel() // acts.shape[-1] if acts.shape[-1] else 0
    if n_tokens == 0:
        return torch.zeros_like(acts)
    flat = acts.reshape(-1)
    values, indices = flat.topk(min(k * n_tokens, flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).reshape(acts.shape)


def unit_normalise(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``((x - mean) / (std + eps), mean, std)`` per token (std unbiased, as torch's default)."""
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    std = centred.std(dim=-1, keepdim=True)
    return centred / (std + UNIT_NORM_EPS), mean, std


@dataclass
class Dictionary:
    """One site's encoder and decoder, in the normalised orientation (module docstring)."""

    W_enc: Tensor
    b_enc: Tensor
    activation: Activation
    W_dec: Tensor | None
    b_dec: Tensor | None
    input_bias: Tensor | None = None
    W_skip: Tensor | None = None
    pre_scale: Tensor | None = None
    input_norm: bool = False

    @property
    def n_features(self) -> int:
        return int(self.W_enc.shape[0])

    def preactivations(self, x: Tensor) -> Tensor:
        x = x.to(self.W_enc.dtype)
        if self.input_norm:
            x = unit_normalise(x)[0]
        if self.input_bias is not None:
            x = x - self.input_bias
        pre = x @ self.W_enc.T + self.b_enc
        if self.pre_scale is not None:
            pre = pre * self.pre_scale
        return pre

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``[..., n]`` for inputs ``[..., d_in]``."""
        return apply_activation(self.preactivations(x), self.activation)

    def decode(self, acts: Tensor, x: Tensor | None = None, target: Tensor | None = None) -> Tensor:
        """Reconstruction ``[..., d_out]``; ``x`` (the encoder input) feeds the skip connection.

        With ``input_norm`` the dictionary was trained to predict the unit-normalised target,
        so the prediction is mapped back with ``target``'s own per-token mean and std (exactly
        what the trainer reports as its output); ``target`` is then required.
        """
        if self.W_dec is None or self.b_dec is None:
            raise FormatError("this dictionary was loaded without a decoder")
        if self.pre_scale is not None:
            acts = acts / self.pre_scale
        out = acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("this dictionary has a skip connection: pass the encoder input x")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        if self.input_norm:
            if target is None:
                raise ValueError(
                    "this dictionary normalises its input and target (input_unit_norm): pass the "
                    "target activations so the reconstruction can be mapped back to their scale"
                )
            _, mean, std = unit_normalise(target.to(out.dtype))
            out = out * std + mean
        return out

    def reconstruct(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        return self.decode(self.encode(x), x, target)

    def to(self, device: str | torch.device) -> Dictionary:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        act = self.activation
        if act.threshold is not None:
            act = Activation(act.kind, act.k, act.rectify, act.threshold.to(device))
        return Dictionary(
            W_enc=self.W_enc.to(device),
            b_enc=self.b_enc.to(device),
            activation=act,
            W_dec=mv(self.W_dec),
            b_dec=mv(self.b_dec),
            input_bias=mv(self.input_bias),
            W_skip=mv(self.W_skip),
            pre_scale=mv(self.pre_scale),
            input_norm=self.input_norm,
        )


def expect_shape(
    t: Tensor, shape: tuple[int, ...], *, file: str, tensor: str, what: str = ""
) -> Tensor:
    """Raise a ``FormatError`` naming ``file`` and ``tensor`` unless ``t.shape == shape``."""
    if tuple(t.shape) != tuple(shape):
        extra = f" ({what})" if what else ""
        raise FormatError(
            f"{file}: tensor {tensor!r} has shape {list(t.shape)}, expected {list(shape)}{extra}",
            hint="the file does not match its config; re-export it with the library that trained it",
        )
    return t


LazyDictionary = Callable[[], Dictionary]
