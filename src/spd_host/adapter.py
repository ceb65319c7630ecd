"""The data a method plugin hands the host: method info, sites, adapters and harvest batches.

These types are the boundary between the host and every method plugin. They are deliberately
small: anything method-specific stays inside the plugin, behind ``DecompositionAdapter``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from spd_host.errors import HarvestBatchError

if TYPE_CHECKING:
    import torch


class Frozen(BaseModel):
    """Base for boundary models: immutable and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class MethodInfo(Frozen):
    """What a decomposition method is, for people and for LLM prompts.

    ``description`` is one paragraph that explains what a "component" of this method is and
    what its activation means; autointerp puts it verbatim into prompts, so it must not assume
    the reader knows the method.
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    description: str
    short_id_pattern: str | None = Field(
        default=None,
        description="Regex (full match) for short IDs this method owns, e.g. SPD's 's-[0-9a-z]{8}'.",
    )


class Site(Frozen):
    """One place in the model where a decomposition has components.

    A site is what components are counted per: an SPD-decomposed module, a transcoder's layer,
    a CLT's source layer. ``reads_from`` and ``writes_to`` are canonical hook points or module
    addresses (see ``spd_host.topology``) so that results from two formats of the same
    decomposition line up. Component keys are ``f"{site.name}:{index}"``.
    """

    name: str = Field(pattern=r"^[^:\s]+$")
    n_components: int = Field(gt=0)
    reads_from: str
    writes_to: tuple[str, ...]
    address: str | None = Field(
        default=None, description="Canonical module address when the site is a module (SPD)."
    )
    description: str = ""


class DecompositionDefaults(Frozen):
    """What the decomposition itself records about how it was trained (all optional)."""

    dataset: str | None = None
    dataset_column: str | None = None
    seq_len: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class HarvestOptions(Frozen):
    """Options the host passes to a plugin's ``harvest_fn`` hook."""

    threshold: float = Field(
        default=0.0, description="A component fires where its primary activation > threshold."
    )
    device: str = "cpu"
    next_token: bool = Field(
        default=True, description="Whether the batch must carry next-token logits or probs."
    )


@runtime_checkable
class DecompositionAdapter(Protocol):
    """A loaded decomposition, method-agnostic from the outside.

    Metadata (everything but ``load_base_model`` / ``load_tokenizer``) must be available
    without loading model weights, so ``spd-host info`` stays cheap.
    """

    @property
    def decomposition_id(self) -> str:
        """The normalised decomposition ID (``spd_host.ids.DecompositionId.normalized``)."""
        ...

    @property
    def method(self) -> MethodInfo: ...

    @property
    def sites(self) -> Sequence[Site]: ...

    @property
    def activation_types(self) -> Sequence[str]:
        """Activation types per component; the first is the one firings are thresholded on."""
        ...

    @property
    def base_model_name(self) -> str:
        """A Hub name, local path, or ``demo``; informational."""
        ...

    @property
    def defaults(self) -> DecompositionDefaults: ...

    def load_base_model(self) -> torch.nn.Module:
        """The base causal LM (cached after the first call), in eval mode."""
        ...

    def load_tokenizer(self) -> Any:
        """A Hugging Face tokenizer for the base model (cached)."""
        ...


@runtime_checkable
class SupportsSplice(Protocol):
    """Optional adapter capability the fidelity evals use.

    ``splice`` returns a context manager inside which a forward pass of ``model`` uses the
    decomposition's reconstruction at the chosen sites (all when ``None``). ``variant`` names
    one of ``splice_variants`` (SPD: CI-masked, all-ones, rounded-CI, zero-mask).
    """

    @property
    def splice_variants(self) -> Sequence[str]: ...

    def splice(
        self,
        model: torch.nn.Module,
        *,
        sites: Sequence[str] | None = None,
        variant: str | None = None,
    ) -> AbstractContextManager[None]: ...


@dataclass
class HarvestBatch:
    """What a HarvestFn returns for one batch of token sequences.

    - ``tokens``: ``[B, S]`` int64 token ids (the batch that was passed in).
    - ``firings[site]``: ``[B, S, C]`` bool, where each component fires.
    - ``activations[site][activation_type]``: ``[B, S, C]`` float, finite.
    - exactly one of ``next_token_logits`` / ``next_token_probs``: ``[B, S, V]`` float, the
      base model's prediction for the token after each position (absent when the host asked
      for ``next_token=False``).
    """

    tokens: torch.Tensor
    firings: Mapping[str, torch.Tensor]
    activations: Mapping[str, Mapping[str, torch.Tensor]]
    next_token_logits: torch.Tensor | None = None
    next_token_probs: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


HarvestFn = Callable[["torch.Tensor"], HarvestBatch]


def component_key(site: str, index: int) -> str:
    """The stable key of a component: ``<site>:<index>``."""
    return f"{site}:{index}"


def parse_component_key(key: str) -> tuple[str, int]:
    """Inverse of :func:`component_key`; raises ``ValueError`` with the accepted form."""
    site, sep, idx = key.rpartition(":")
    if not sep or not site or not idx.isdigit():
        raise ValueError(f"component key {key!r} is not of the form '<site>:<index>'")
    return site, int(idx)


def validate_harvest_batch(
    batch: HarvestBatch,
    *,
    sites: Sequence[Site],
    activation_types: Sequence[str],
    plugin: str,
    expect_next_token: bool = True,
) -> None:
    """Check a plugin's HarvestBatch against the contract; raise naming the plugin.

    Cheap relative to a forward pass: shape/dtype checks plus one min/max reduction per tensor.
    """
    import torch

    def fail(what: str) -> HarvestBatchError:
        return HarvestBatchError(
            f"plugin {plugin!r} returned an invalid HarvestBatch: {what}",
            hint="this is a bug in the plugin's harvest_fn; report it to the plugin's authors",
        )

    tokens = batch.tokens
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise fail(f"tokens must be a [B, S] tensor, got {_describe(tokens)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise fail(f"tokens must be int64, got {tokens.dtype}")
    B, S = tokens.shape
    expected = {s.name: s.n_components for s in sites}
    if set(batch.firings) != set(expected):
        raise fail(f"firings has sites {sorted(batch.firings)}, expected {sorted(expected)}")
    if set(batch.activations) != set(expected):
        raise fail(
            f"activations has sites {sorted(batch.activations)}, expected {sorted(expected)}"
        )
    for name, C in expected.items():
        fired = batch.firings[name]
        if not isinstance(fired, torch.Tensor) or tuple(fired.shape) != (B, S, C):
            raise fail(f"firings[{name!r}] must be [{B}, {S}, {C}], got {_describe(fired)}")
        if fired.dtype != torch.bool:
            raise fail(f"firings[{name!r}] must be bool, got {fired.dtype}")
        acts = batch.activations[name]
        if set(acts) != set(activation_types):
            raise fail(
                f"activations[{name!r}] has types {sorted(acts)}, expected {sorted(activation_types)}"
            )
        for kind, t in acts.items():
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, S, C):
                raise fail(
                    f"activations[{name!r}][{kind!r}] must be [{B}, {S}, {C}], got {_describe(t)}"
                )
            if not t.is_floating_point():
                raise fail(f"activations[{name!r}][{kind!r}] must be float, got {t.dtype}")
            if not _all_finite(t):
                raise fail(f"activations[{name!r}][{kind!r}] contains NaN or inf")
    if not expect_next_token:
        return
    given = [t for t in (batch.next_token_logits, batch.next_token_probs) if t is not None]
    if len(given) != 1:
        raise fail("exactly one of next_token_logits / next_token_probs must be set")
    nt = given[0]
    if nt.ndim != 3 or tuple(nt.shape[:2]) != (B, S):
        raise fail(f"next-token tensor must be [{B}, {S}, V], got {_describe(nt)}")
    if not nt.is_floating_point():
        raise fail(f"next-token tensor must be float, got {nt.dtype}")
    if batch.next_token_probs is not None and not _all_finite(nt):
        raise fail("next_token_probs contains NaN or inf")


def _all_finite(t: Any) -> bool:
    """No NaN or inf in ``t``: min and max are finite (NaN propagates through both).

    One reduction without a boolean temporary, ~10x cheaper than ``isfinite(t).all()``.
    """
    import torch

    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _describe(obj: object) -> str:
    shape = getattr(obj, "shape", None)
    if shape is not None:
        return f"{type(obj).__name__} of shape {list(shape)}"
    return type(obj).__name__
