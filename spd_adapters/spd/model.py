"""The maths of a trained SPD decomposition: components, causal-importance functions, sigmoids.

Plain tensors, no ``nn.Module`` state: everything here is inference on weights read from a
checkpoint, so the functions are written directly from the formulas.

- Components of a module with C subcomponents: ``V [d_in, C]``, ``U [C, d_out]``; the
  reconstructed weight is ``(V U)^T`` (``[d_out, d_in]``, nn.Linear orientation; a transformers
  Conv1D stores ``[d_in, d_out]``, i.e. ``V U`` directly; an Embedding stores ``V U``).
- Component activation ``a = x V`` (an Embedding: the row ``V[token]``); masked forward
  ``((x V) * m) U + b`` with the target module's bias ``b``.
- CI function pre-activations -> sigmoid -> causal importance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

ModuleKind = Literal["linear", "conv1d", "embedding"]


@dataclass
class Components:
    """The C rank-one subcomponents of one decomposed module."""

    V: Tensor  # [d_in, C]  (embedding: [vocab, C])
    U: Tensor  # [C, d_out]
    bias: Tensor | None
    kind: ModuleKind

    @property
    def C(self) -> int:  # noqa: N802 - the paper's name for the number of components
        return int(self.V.shape[1])

    def component_acts(self, x: Tensor) -> Tensor:
        """``a = x V`` ([..., C]); for an embedding ``x`` is token ids and ``a = V[x]``."""
        if self.kind == "embedding":
            return self.V[x]
        return x.to(self.V.dtype) @ self.V

    def u_norms(self) -> Tensor:
        """``||U_c||`` per component ([C])."""
        return self.U.norm(dim=1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``((x V) * m) U + b``."""
        a = self.component_acts(x)
        if mask is not None:
            a = a * mask.to(a.dtype)
        out = a @ self.U
        if self.bias is not None:
            out = out + self.bias
        return out

    def weight(self) -> Tensor:
        """The reconstructed weight in the target module's own storage orientation."""
        VU = self.V @ self.U
        return VU.T if self.kind == "linear" else VU


# ---------------------------------------------------------------------------------------- sigmoids
def _swish(x: Tensor, beta: float) -> Tensor:
    return x * torch.sigmoid(beta * x)


def _swish_hard(x: Tensor, beta: float = 10.0, scale: float = 0.5, shift: float = 0.5) -> Tensor:
    """Smooth hard sigmoid built from swish corners, centred at 0.5 with unit-width ramp."""
    z = x - shift
    down = lambda t: t * torch.sigmoid(-beta * t)  # noqa: E731
    return shift + (down(z - scale) - _swish(z, beta)) + (_swish(z + scale, beta) - down(z))


def _upper_leaky_hard(x: Tensor, alpha: float = 0.01) -> Tensor:
    return torch.where(x > 1, 1 + alpha * (x - 1), x.clamp(0, 1))


def _hard(x: Tensor) -> Tensor:
    return x.clamp(0, 1)


# The causal importance used for masks is the *lower-leaky* branch; its forward value is the
# hard sigmoid (the leak only shapes gradients in training). For ``leaky_hard`` runs the
# reference pairs lower_leaky_hard (masks) with upper_leaky_hard (the sparsity loss); we report
# the mask CI. Every other type uses one function for both.
CI_SIGMOIDS: dict[str, Callable[[Tensor], Tensor]] = {
    "normal": torch.sigmoid,
    "hard": _hard,
    "leaky_hard": _hard,
    "lower_leaky_hard": _hard,
    "upper_leaky_hard": _upper_leaky_hard,
    "swish_hard": _swish_hard,
}
UPPER_SIGMOIDS: dict[str, Callable[[Tensor], Tensor]] = {
    **CI_SIGMOIDS,
    "leaky_hard": _upper_leaky_hard,
}


# ------------------------------------------------------------------------------------ CI functions
@dataclass
class DenseLayer:
    """``y = x W + b`` with ``W [in, out]`` (shared) or ``W [C, in, out]`` (one per component)."""

    W: Tensor
    b: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        if self.W.ndim == 3:  # x [..., C, in]
            return torch.einsum("...ci,cio->...co", x, self.W) + self.b
        return x @ self.W + self.b


def run_mlp(layers: Sequence[DenseLayer], x: Tensor) -> Tensor:
    """Dense layers with exact (erf) GELU between them, none after the last."""
    for i, layer in enumerate(layers):
        x = layer(x)
        if i < len(layers) - 1:
            x = F.gelu(x)
    return x


@dataclass
class LayerwiseCiFn:
    """One CI function for one decomposed module.

    - ``mlp``: per component, a scalar MLP on that component's activation ``a_c``;
    - ``vector_mlp``: per component, an MLP on the module's full input ``x``;
    - ``shared_mlp``: one MLP from ``x`` to all C pre-activations.
    """

    fn_type: str
    layers: list[DenseLayer]

    def pre_sigmoid(self, x: Tensor, components: Components) -> Tensor:
        if self.fn_type == "mlp":
            a = components.component_acts(x)  # [..., C]
            return run_mlp(self.layers, a.unsqueeze(-1))[..., 0]
        if self.fn_type == "vector_mlp":
            return run_mlp(self.layers, x.to(self.layers[0].W.dtype).unsqueeze(-2))[..., 0]
        if self.fn_type == "shared_mlp":
            return run_mlp(self.layers, x.to(self.layers[0].W.dtype))
        raise ValueError(f"unknown layerwise CI fn type {self.fn_type!r}")


@dataclass
class GlobalCiFn:
    """``global_shared_mlp``: concatenate every site's input in sorted module-path order
    (embeddings contribute their component activations), one MLP, split by C."""

    layers: list[DenseLayer]
    order: list[str]  # sorted module paths
    sizes: list[int]  # C per module, same order
    causal: bool = True

    def pre_sigmoid(
        self, inputs: Mapping[str, Tensor], components: Mapping[str, Components]
    ) -> dict[str, Tensor]:
        parts = []
        for path in self.order:
            comp = components[path]
            x = inputs[path]
            parts.append(
                comp.component_acts(x) if comp.kind == "embedding" else x.to(self.layers[0].W.dtype)
            )
        out = run_mlp(self.layers, torch.cat(parts, dim=-1))
        return dict(zip(self.order, torch.split(out, self.sizes, dim=-1), strict=True))

    def to(self, device: torch.device | str) -> None:
        for layer in self.layers:
            layer.W, layer.b = layer.W.to(device), layer.b.to(device)


class GlobalFn(Protocol):
    """A global CI function: every site's input at once -> pre-sigmoid CI per site."""

    @property
    def causal(self) -> bool:
        """Whether the CI at a position depends only on that position's inputs (and earlier)."""
        ...

    def pre_sigmoid(
        self, inputs: Mapping[str, Tensor], components: Mapping[str, Components]
    ) -> dict[str, Tensor]: ...

    def to(self, device: torch.device | str) -> None: ...


@dataclass
class SpdModel:
    """Every decomposed module's components plus the CI function(s), keyed by module path."""

    components: dict[str, Components]
    layerwise: dict[str, LayerwiseCiFn] | None
    global_fn: GlobalFn | None
    sigmoid_type: str

    @property
    def paths(self) -> list[str]:
        return sorted(self.components)

    def to(self, device: torch.device | str) -> SpdModel:
        """Move every tensor in place (returns self)."""
        for c in self.components.values():
            c.V, c.U = c.V.to(device), c.U.to(device)
            c.bias = None if c.bias is None else c.bias.to(device)
        if self.global_fn is not None:
            self.global_fn.to(device)
        for layers in [f.layers for f in (self.layerwise or {}).values()]:
            for layer in layers:
                layer.W, layer.b = layer.W.to(device), layer.b.to(device)
        return self

    def pre_sigmoid(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.global_fn is not None:
            return self.global_fn.pre_sigmoid(inputs, self.components)
        assert self.layerwise is not None
        return {p: self.layerwise[p].pre_sigmoid(inputs[p], self.components[p]) for p in inputs}

    def causal_importance(
        self, inputs: Mapping[str, Tensor], sampling: str | None = None
    ) -> dict[str, Tensor]:
        """Causal importances (the value masks are built from), ``[..., C]`` each.

        Noiseless by default. ``sampling="binomial"`` reproduces the reference's CI under that
        sampling: the mask branch sees ``1.05 z - 0.05 u`` (``u`` uniform) instead of ``z``.
        """
        sig = CI_SIGMOIDS[self.sigmoid_type]
        out = {}
        for p, z in self.pre_sigmoid(inputs).items():
            if sampling == "binomial":
                z = 1.05 * z - 0.05 * torch.rand_like(z)
            out[p] = sig(z)
        return out
