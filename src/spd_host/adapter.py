"""The data a method plugin hands the host: method info, sites, adapters and harvest batches.

These types are the boundary between the host and every method plugin. They are deliberately
small: anything method-specific stays inside the plugin, behind ``DecompositionAdapter``.
"""

from __future__ import annotations

import math
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
    sparse: bool = Field(
        default=False,
        description="The host accepts sites in the sparse form (``HarvestBatch.sparse``); "
        "without it, plugins return dense firings and activations (older hosts and direct "
        "callers expect those).",
    )
    next_token_top_k: int | None = Field(
        default=None,
        gt=0,
        description="When set, the host needs only the k most likely next tokens per position: "
        "a plugin may return ``next_token_topk`` (see ``next_token_topk_of``) instead of full "
        "``[B, S, V]`` logits, computed on its device.",
    )
    defer_next_token: bool = Field(
        default=False,
        description="With ``next_token_top_k``: the plugin may return the top-k as a "
        "``DeferredNextTokenTopK``, which the host computes when it accumulates the batch "
        "(on its accumulation thread, overlapped with the next forward).",
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

    Two optional members let the fidelity engine skip work (absent: it runs every forward in
    full and the splice does its own clean pre-pass, if it needs one):

    - ``splice_is_local: bool`` (default False): True promises that a splice of ``sites``
      changes nothing the model computes below the lowest block those sites read from or
      write to (``Site.reads_from``, ``writes_to``, ``address``), and reads nothing computed
      there beyond what the clean forward of the same tokens computed. The engine then starts
      such forwards at that block from the clean forward's block outputs (same numbers, less
      time). A splice that reads lower layers (a CLT site reads every source layer below it)
      must leave it False.
    - ``observe_clean_forward(model, tokens) -> AbstractContextManager[None]``: entered around
      the engine's unmodified forward of each batch; a splice that needs clean internals of
      that batch (SPD: every decomposed module's input, for the causal importances) records
      them there, instead of running a clean pre-pass of its own in every splice.
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
class SparseActivity:
    """One site's firings as a list of entries (the sparse form of the HarvestBatch contract).

    Entry ``e`` says component ``component[e]`` fires at flat position ``position[e]``
    (``b * S + s``) with activation ``values[type][e]`` for every activation type. By contract a
    component's activations are **zero wherever it does not fire**: use this form when that
    holds (TopK / BatchTopK / JumpReLU / ReLU encoders at threshold 0, a CI gated at the
    threshold), otherwise hand dense tensors. Entries may come in any order but must be
    distinct; all tensors on one device (the harvest device, ideally), ``[E]`` each.
    """

    position: torch.Tensor  # [E] int64 (or int32), in [0, B * S)
    component: torch.Tensor  # [E] int64 (or int32), in [0, C)
    values: Mapping[str, torch.Tensor]  # activation type -> [E] float


@dataclass
class NextTokenTopK:
    """The base model's next-token prediction reduced to the top k logits per position.

    ``values``/``indices``: ``torch.topk(logits, k)`` (any order); ``logsumexp``: of the full
    logits, so ``p = exp(values - logsumexp[..., None])`` are the exact probabilities of those
    tokens. Computing this on the model's device avoids moving ``[B, S, V]`` logits.
    """

    values: torch.Tensor  # [B, S, k] float logits
    indices: torch.Tensor  # [B, S, k] int64 token ids
    logsumexp: torch.Tensor  # [B, S] float
    vocab_size: int


class DeferredNextTokenTopK:
    """A :class:`NextTokenTopK` that the host computes when it accumulates the batch.

    Why: on a CPU the LM head with its top-k and logsumexp is a fifth of a small model's
    forward. Handed over as work still to do, it runs on the host's accumulation thread while
    the plugin computes the next batch, instead of on the thread that bounds the harvest.

    ``compute()`` returns the ``NextTokenTopK``. It must read only tensors it captured (the
    final hidden states, say), never state a later HarvestFn call changes, because it runs
    after the HarvestFn has been called again, on another thread; it must give the bits it
    would have given at once (plain tensor ops, no randomness), and it must turn off autograd
    itself (``torch.no_grad`` is per thread). Return one only when the host set
    ``HarvestOptions.defer_next_token``. ``resolve()`` computes it once and keeps the result.
    """

    def __init__(self, compute: Callable[[], NextTokenTopK], vocab_size: int) -> None:
        self.compute = compute
        self.vocab_size = int(vocab_size)
        self._value: NextTokenTopK | None = None

    def resolve(self) -> NextTokenTopK:
        if self._value is None:
            self._value = self.compute()
            self.compute = _resolved  # drop what the closure holds (hidden states)
        return self._value


def _resolved() -> NextTokenTopK:
    raise AssertionError("a resolved DeferredNextTokenTopK is not computed again")


def next_token_topk_of(logits: torch.Tensor, k: int) -> NextTokenTopK:
    """``NextTokenTopK`` from ``[B, S, V]`` logits, on their device (no softmax over V)."""
    import torch

    V = int(logits.shape[-1])
    values, indices = torch.topk(logits, min(k, V), dim=-1, sorted=False)
    return NextTokenTopK(values, indices, _logsumexp_last(logits.float()), V)


_LSE_CHUNK_ELEMENTS = 1 << 18


def _logsumexp_last(x: torch.Tensor) -> torch.Tensor:
    """``logsumexp`` over the last dim; on the CPU in row blocks of about 1 MB.

    Why blocks: over a ``[N, 50k]`` batch one ``torch.logsumexp`` streams the logits through
    memory several times (max, shifted exp, sum); blocks that stay in cache measured 2.2x
    faster on one thread (same formula: ``max + log(sum(exp(x - max)))``).
    """
    import torch

    V = int(x.shape[-1])
    if x.device.type != "cpu" or x.numel() <= _LSE_CHUNK_ELEMENTS or V == 0:
        return torch.logsumexp(x, dim=-1)
    flat = x.reshape(-1, V)
    out = torch.empty(flat.shape[0], dtype=x.dtype)
    step = max(1, _LSE_CHUNK_ELEMENTS // V)
    for r0 in range(0, flat.shape[0], step):
        out[r0 : r0 + step] = torch.logsumexp(flat[r0 : r0 + step], dim=-1)
    return out.view(x.shape[:-1])


def sparse_activity_of(
    fired: torch.Tensor, activations: Mapping[str, torch.Tensor]
) -> SparseActivity | None:
    """The sparse form of a dense site, or None when an activation is non-zero off its firings.

    One ``count_nonzero`` per type tells whether the sparse contract (zero where not firing)
    holds; when it does not, the caller should hand the dense tensors instead.
    """
    import torch

    C = int(fired.shape[-1])
    pos, comp = fired.reshape(-1, C).nonzero().unbind(1)
    values = {t: a.reshape(-1, C)[pos, comp] for t, a in activations.items()}
    for t, v in values.items():
        # every non-zero of the dense tensor is among the firing values: one dense count
        if int(torch.count_nonzero(activations[t])) != int(torch.count_nonzero(v)):
            return None
    return SparseActivity(pos, comp, values)


@dataclass
class HarvestBatch:
    """What a HarvestFn returns for one batch of token sequences.

    - ``tokens``: ``[B, S]`` int64 token ids (the batch that was passed in).
    - per site, either the dense form, ``firings[site]``: ``[B, S, C]`` bool (where each
      component fires) with ``activations[site][activation_type]``: ``[B, S, C]`` float,
      finite and below ``MAX_ABS_ACTIVATION`` (``2**30``) in magnitude; or the sparse form
      ``sparse[site]`` (:class:`SparseActivity`: one entry per firing, activations zero
      elsewhere). A site is in exactly one of the two.
    - next-token information, one of ``next_token_logits`` / ``next_token_probs`` (``[B, S, V]``
      float; logits without NaN or ``+inf``, probabilities summing to 1) or ``next_token_topk``
      (:class:`NextTokenTopK`, when the host set ``HarvestOptions.next_token_top_k``; its k must
      be at least that; or a :class:`DeferredNextTokenTopK` when the host also set
      ``defer_next_token``) — absent when the host asked for ``next_token=False``. ``V`` is the
      same for every batch and covers every id in ``tokens``.

    Tensors may live on any device; the host moves them to its harvest device (a no-op when
    the plugin already computed them there, which is what makes a GPU harvest fast).
    """

    tokens: torch.Tensor
    firings: Mapping[str, torch.Tensor]
    activations: Mapping[str, Mapping[str, torch.Tensor]]
    next_token_logits: torch.Tensor | None = None
    next_token_probs: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    sparse: Mapping[str, SparseActivity] = field(default_factory=dict)
    next_token_topk: NextTokenTopK | DeferredNextTokenTopK | None = None


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


def invalid_batch_error(plugin: str) -> Callable[[str], HarvestBatchError]:
    """``fail(what)``: the one-line error for a batch of ``plugin`` that breaks the contract."""

    def fail(what: str) -> HarvestBatchError:
        return HarvestBatchError(
            f"plugin {plugin!r} returned an invalid HarvestBatch: {what}",
            hint="this is a bug in the plugin's harvest_fn; report it to the plugin's authors",
        )

    return fail


def validate_harvest_batch(
    batch: HarvestBatch,
    *,
    sites: Sequence[Site],
    activation_types: Sequence[str],
    plugin: str,
    expect_next_token: bool = True,
    min_top_k: int | None = None,
    input_tokens: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> int | None:
    """Check a plugin's HarvestBatch against the contract; raise naming the plugin.

    ``input_tokens``: the tokens the HarvestFn was called with (``batch.tokens`` must equal
    them); ``vocab_size``: the next-token vocabulary of the earlier batches (it must not
    change). Returns this batch's vocabulary size (None without next-token data).

    Cheap relative to a forward pass: shape/dtype checks plus a few reductions per tensor on
    its device (min/max, and one sum over the vocabulary for probabilities), each read back
    once per tensor, never per element.
    """
    import torch

    fail = invalid_batch_error(plugin)

    if not isinstance(batch, HarvestBatch):
        got = "None" if batch is None else type(batch).__name__
        raise fail(f"returned {got}, expected a HarvestBatch")
    tokens = batch.tokens
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise fail(f"tokens must be a [B, S] tensor, got {_describe(tokens)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise fail(f"tokens must be int64, got {tokens.dtype}")
    if input_tokens is not None and (
        tuple(tokens.shape) != tuple(input_tokens.shape)
        or not torch.equal(tokens, input_tokens.to(tokens.device, tokens.dtype))
    ):
        raise fail("tokens differ from the tokens passed in (return the input batch as is)")
    B, S = tokens.shape
    expected = {s.name: s.n_components for s in sites}
    sparse = batch.sparse
    both = set(batch.firings) & set(sparse)
    if both:
        raise fail(f"sites {sorted(both)} are given both dense (firings) and sparse")
    dense_sites = set(expected) - set(sparse)
    if set(batch.firings) | set(sparse) != set(expected):
        if not sparse:
            raise fail(f"firings has sites {sorted(batch.firings)}, expected {sorted(expected)}")
        given = sorted(set(batch.firings) | set(sparse))
        raise fail(f"firings + sparse have sites {given}, expected {sorted(expected)}")
    if set(batch.activations) != dense_sites:
        raise fail(
            f"activations has sites {sorted(batch.activations)}, expected the dense sites "
            f"{sorted(dense_sites)}"
        )
    types = set(activation_types)
    for name, C in expected.items():
        if name in sparse:
            _validate_sparse(sparse[name], name, B * S, C, types, fail)
            continue
        fired = batch.firings[name]
        if not isinstance(fired, torch.Tensor) or tuple(fired.shape) != (B, S, C):
            raise fail(f"firings[{name!r}] must be [{B}, {S}, {C}], got {_describe(fired)}")
        if fired.dtype != torch.bool:
            raise fail(f"firings[{name!r}] must be bool, got {fired.dtype}")
        acts = batch.activations[name]
        if set(acts) != types:
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
            bad = _activation_problem(t)
            if bad:
                raise fail(f"activations[{name!r}][{kind!r}] {bad}")
    if not expect_next_token:
        return None
    topk = batch.next_token_topk
    dense_nt = [t for t in (batch.next_token_logits, batch.next_token_probs) if t is not None]
    if len(dense_nt) + (topk is not None) != 1:
        raise fail(
            "exactly one of next_token_logits / next_token_probs / next_token_topk must be set"
        )
    if isinstance(topk, DeferredNextTokenTopK):
        # checked in full when the host resolves it (validate_next_token_topk)
        n_vocab = topk.vocab_size
        if n_vocab <= 0:
            raise fail(f"next_token_topk.vocab_size must be positive, got {n_vocab}")
    elif topk is not None:
        validate_next_token_topk(topk, B, S, min_top_k, fail)
        n_vocab = int(topk.vocab_size)
    else:
        nt = dense_nt[0]
        if not isinstance(nt, torch.Tensor) or nt.ndim != 3 or tuple(nt.shape[:2]) != (B, S):
            raise fail(f"next-token tensor must be [{B}, {S}, V], got {_describe(nt)}")
        if not nt.is_floating_point():
            raise fail(f"next-token tensor must be float, got {nt.dtype}")
        if batch.next_token_probs is not None:
            _validate_probs(nt, fail)
        elif not _logits_ok(nt):
            raise fail("next_token_logits contains NaN or +inf")
        n_vocab = int(nt.shape[-1])
    if vocab_size is not None and n_vocab != vocab_size:
        raise fail(f"the next-token vocabulary changed from {vocab_size} to {n_vocab} tokens")
    if tokens.numel():
        lo, hi = torch.aminmax(tokens)
        if int(lo) < 0 or int(hi) >= n_vocab:
            raise fail(
                f"tokens has ids outside [0, {n_vocab}), the next-token vocabulary (got "
                f"{int(lo)}..{int(hi)}; the model's vocabulary must cover the tokenizer's)"
            )
    return n_vocab


def _validate_sparse(
    sp: Any, name: str, n_pos: int, C: int, types: set[str], fail: Callable[[str], Exception]
) -> None:
    """Shapes, dtypes, index ranges (one ``aminmax`` each) and finiteness of a sparse site."""
    import torch

    if not isinstance(sp, SparseActivity):
        raise fail(f"sparse[{name!r}] must be a SparseActivity, got {type(sp).__name__}")
    pos, comp = sp.position, sp.component
    for what, t in (("position", pos), ("component", comp)):
        if not isinstance(t, torch.Tensor) or t.ndim != 1:
            raise fail(f"sparse[{name!r}].{what} must be a 1-d tensor, got {_describe(t)}")
        if t.dtype not in (torch.int64, torch.int32):
            raise fail(f"sparse[{name!r}].{what} must be int64, got {t.dtype}")
    E = int(pos.shape[0])
    if int(comp.shape[0]) != E:
        raise fail(f"sparse[{name!r}] has {E} positions but {int(comp.shape[0])} components")
    for what, t, hi in (("position", pos, n_pos), ("component", comp, C)):
        if E:
            lo_v, hi_v = torch.aminmax(t)
            if int(lo_v) < 0 or int(hi_v) >= hi:
                raise fail(f"sparse[{name!r}].{what} has values outside [0, {hi})")
    if set(sp.values) != types:
        raise fail(f"sparse[{name!r}] has types {sorted(sp.values)}, expected {sorted(types)}")
    for kind, v in sp.values.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (E,):
            raise fail(f"sparse[{name!r}].values[{kind!r}] must be [{E}], got {_describe(v)}")
        if not v.is_floating_point():
            raise fail(f"sparse[{name!r}].values[{kind!r}] must be float, got {v.dtype}")
        bad = _activation_problem(v)
        if bad:
            raise fail(f"sparse[{name!r}].values[{kind!r}] {bad}")


def validate_next_token_topk(
    tk: Any, B: int, S: int, min_top_k: int | None, fail: Callable[[str], Exception]
) -> None:
    """The checks ``validate_harvest_batch`` makes on a ``NextTokenTopK`` (also applied to a
    deferred one's result, when the host resolves it); raises ``fail(what)``."""
    _validate_topk(tk, B, S, fail)
    k = int(tk.values.shape[-1])
    if min_top_k is not None and k < min(min_top_k, int(tk.vocab_size)):
        raise fail(
            f"next_token_topk carries {k} tokens per position, the host asked for {min_top_k}"
        )


def _validate_topk(tk: Any, B: int, S: int, fail: Callable[[str], Exception]) -> None:
    import torch

    if not isinstance(tk, NextTokenTopK):
        raise fail(f"next_token_topk must be a NextTokenTopK, got {type(tk).__name__}")
    v, i, lse = tk.values, tk.indices, tk.logsumexp
    if not isinstance(v, torch.Tensor) or v.ndim != 3 or tuple(v.shape[:2]) != (B, S):
        raise fail(f"next_token_topk.values must be [{B}, {S}, k], got {_describe(v)}")
    if not v.is_floating_point():
        raise fail(f"next_token_topk.values must be float, got {v.dtype}")
    if not isinstance(i, torch.Tensor) or tuple(i.shape) != tuple(v.shape):
        raise fail(f"next_token_topk.indices must be {list(v.shape)}, got {_describe(i)}")
    if i.dtype not in (torch.int64, torch.int32):
        raise fail(f"next_token_topk.indices must be int64, got {i.dtype}")
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (B, S):
        raise fail(f"next_token_topk.logsumexp must be [{B}, {S}], got {_describe(lse)}")
    if not _all_finite(lse):
        raise fail("next_token_topk.logsumexp contains NaN or inf")
    if not _logits_ok(v):
        raise fail("next_token_topk.values contains NaN or +inf")
    if i.numel():
        lo, hi = torch.aminmax(i)
        if int(lo) < 0 or int(hi) >= int(tk.vocab_size):
            raise fail(f"next_token_topk.indices has values outside [0, {tk.vocab_size})")
        # the kept probabilities exp(value - logsumexp) are part of a distribution
        kept = torch.exp(v.float() - lse.float()[..., None]).sum(-1).max()
        if float(kept) > 1.0 + _prob_tolerance(v.dtype):
            raise fail(
                f"next_token_topk probabilities sum past 1 (up to {float(kept):.4g}); "
                "logsumexp must be over the full logits"
            )


def _validate_probs(p: Any, fail: Callable[[str], Exception]) -> None:
    """Probabilities: finite, in [0, 1], and each position's sum about 1 (two reductions)."""
    import torch

    if p.numel() == 0:
        return
    lo_f, hi_f = torch.stack(torch.aminmax(p)).tolist()
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        raise fail("next_token_probs contains NaN or inf")
    tol = _prob_tolerance(p.dtype)
    if lo_f < 0 or hi_f > 1 + tol:
        raise fail(f"next_token_probs has values outside [0, 1] ({lo_f:.4g}..{hi_f:.4g})")
    s_lo, s_hi = torch.stack(torch.aminmax(p.sum(-1, dtype=torch.float32))).tolist()
    if abs(s_lo - 1) > tol or abs(s_hi - 1) > tol:
        raise fail(
            f"next_token_probs do not sum to 1 over the vocabulary (sums {s_lo:.4g}..{s_hi:.4g}); "
            "pass logits as next_token_logits instead"
        )


def _prob_tolerance(dtype: Any) -> float:
    """How far from 1 a sum of probabilities in ``dtype`` may be (rounding, not a bug)."""
    import torch

    return max(1e-3, 4 * float(torch.finfo(dtype).eps))


def _logits_ok(t: Any) -> bool:
    """No NaN and no +inf (``-inf`` is a masked token, allowed): one ``aminmax``."""
    import torch

    if t.numel() == 0:
        return True
    lo, hi = torch.stack(torch.aminmax(t)).float().tolist()  # one read-back
    return not math.isnan(lo) and math.isfinite(hi)


MAX_ABS_ACTIVATION = 2.0**30
"""Activations must be below this in magnitude: the harvest sums every value exactly in int64
fixed point at ``2**-32`` (``spd_host.harvest.exact``), which holds ``|a| < 2**30`` per value
(sums of many such values are unbounded)."""


def _activation_problem(t: Any) -> str | None:
    """Why ``t`` is not a valid activation tensor (NaN, inf, or past ``MAX_ABS_ACTIVATION``),
    or None; one ``aminmax``."""
    import torch

    if t.numel() == 0:
        return None
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one read-back
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "contains NaN or inf"
    big = max(-lo, hi)
    if big >= MAX_ABS_ACTIVATION:
        return (
            f"has values of magnitude {big:.3g}, past the {MAX_ABS_ACTIVATION:.3g} that exact "
            "accumulation holds (rescale the activations)"
        )
    return None


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
