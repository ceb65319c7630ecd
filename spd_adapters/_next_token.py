"""The base model's forward for a harvest, with the LM head applied a block of positions at a time.

When the host wants only the next-token top-k and logsumexp (``HarvestOptions.
next_token_top_k``), the ``[B, S, V]`` logits are a transient the harvest never needs whole:
at 8 x 256 positions and a 50k vocabulary they are 400 MB, plus the same again for the top-k
and logsumexp temporaries. For a Hugging Face causal LM (``model.base_model`` gives the final
hidden states, ``model.get_output_embeddings()`` is the LM head) this runs the base model, then
the head on blocks of rows, taking each block's top-k and logsumexp while it is in cache. With
``next_token=False`` the head is not run at all.

Exactness: on the first batch, its first sequences (as many as keep the full logits within
``CHECK_LOGIT_ELEMENTS``, so the check's own transient stays bounded) are also run the
ordinary way (``model(tokens)`` inside the same capture) and everything is compared bit for
bit: the captured tensors, each block's logits against the same rows of the full logits, and
the top-k / logsumexp. Any difference (a model whose forward does more than
``head(base(tokens))``, e.g. Gemma's logit soft-capping, a capture on the head's input, or a
BLAS that rounds a row block differently) switches this model to the ordinary forward for
good. What the probe cannot see is the full batch's own product: that row blocks of
``h @ W.T`` equal the rows of the whole product at every batch size is the property
``_sparse_encode`` relies on too (measured on MKL for blocks of 64-row multiples, see there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from spd_adapters._sparse_encode import block_elements, row_blocks
from spd_host.adapter import DeferredNextTokenTopK, NextTokenTopK, next_token_topk_of
from spd_host.models import no_cache_kwargs

HEAD_BLOCK_ELEMENTS = 1 << 20
"""Logit elements per block of rows on the CPU (4 MB in float32; multiples of 64 rows); on an
accelerator ``_sparse_encode.DEVICE_BLOCK_ELEMENTS``."""

CHECK_LOGIT_ELEMENTS = 1 << 24
"""The first-batch check runs on as many sequences as keep its full logits within this many
elements (64 MB in float32; at least one sequence)."""

Capture = Callable[[], AbstractContextManager[Mapping[str, Tensor]]]


def logits_of(output: Any) -> Tensor:
    """The logits of a causal-LM forward (a transformers output object or a bare tensor)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    return torch.as_tensor(output[0])


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(base transformer, LM head)`` of a Hugging Face causal LM, else None."""
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if not isinstance(base, nn.Module) or base is model or not callable(get_head):
        return None
    head = get_head()
    if not isinstance(head, nn.Module):
        return None
    return base, head


class HarvestForward:
    """``forward(tokens) -> (captured, logits or None, top-k or None)`` for one HarvestFn.

    ``capture()`` opens the adapter's capture of its encoders' inputs. ``next_token``: whether
    the batch carries next-token data; ``top_k``: the host's ``next_token_top_k`` (None: full
    logits wanted, then the ordinary forward is used); ``float_logits``: take the top-k of the
    logits cast to float32 (else in the model's dtype; the logsumexp is in float32 either way).
    See the module docstring.
    """

    def __init__(
        self,
        model: nn.Module,
        capture: Capture,
        *,
        next_token: bool,
        top_k: int | None,
        block_elements: int | None = None,
        float_logits: bool = False,
        defer: bool = False,
    ) -> None:
        self.model = model
        self.capture = capture
        self.next_token = next_token
        self.top_k = top_k
        self.defer = defer
        self.float_logits = float_logits
        self.block_elements = block_elements
        split = split_model(model) if not next_token or top_k is not None else None
        self._split = split
        # no KV cache: each batch runs once (models.no_cache_kwargs says what that saves)
        self._model_kwargs = no_cache_kwargs(model)
        self._base_kwargs = no_cache_kwargs(split[0]) if split is not None else {}
        self.split_ok: bool | None = None if split is not None else False  # None: not checked yet

    @torch.no_grad()
    def __call__(
        self, tokens: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None, NextTokenTopK | DeferredNextTokenTopK | None]:
        if self.split_ok is False:
            return self._ordinary(tokens)
        if self.split_ok is None:
            return self._checked(tokens)
        return self._split_forward(tokens)

    def _ordinary(
        self, tokens: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None, NextTokenTopK | None]:
        with self.capture() as captured:
            out = self.model(tokens, **self._model_kwargs)
        captured = dict(captured)
        if not self.next_token:
            return captured, None, None
        logits = logits_of(out)
        if self.top_k is None:
            return captured, logits, None
        return captured, None, next_token_topk_of(self._cast(logits), self.top_k)

    def _cast(self, logits: Tensor) -> Tensor:
        return logits.float() if self.float_logits else logits

    def _split_forward(
        self, tokens: Tensor, full_logits: Tensor | None = None
    ) -> tuple[dict[str, Tensor], Tensor | None, NextTokenTopK | DeferredNextTokenTopK | None]:
        assert self._split is not None
        base, head = self._split
        with self.capture() as captured:
            hidden = base(tokens, **self._base_kwargs)[0]
        captured = dict(captured)
        if not self.next_token:
            return captured, None, None
        assert self.top_k is not None
        if self.defer and full_logits is None:
            return captured, None, self._deferred_topk(head, hidden)
        return captured, None, self._head_topk(head, hidden, full_logits)

    def _deferred_topk(self, head: nn.Module, hidden: Tensor) -> DeferredNextTokenTopK:
        """The head's top-k as work for the host's accumulation thread (``defer``).

        Safe to run there, after the next batch's forward has started: it reads only
        ``hidden`` and the head's weights, and the head has no capture hook (the first-batch
        check would have found the capture that a hook on it adds to the ordinary forward, and
        taken that route for good). The same ops on the same tensors: the same bits."""
        h = hidden.reshape(-1, hidden.shape[-1])
        V = _out_features(head, h)

        def compute() -> NextTokenTopK:
            with torch.no_grad():  # autograd mode is per thread
                return self._head_topk(head, hidden, None)

        return DeferredNextTokenTopK(compute, V)

    def _head_topk(self, head: nn.Module, hidden: Tensor, full: Tensor | None) -> NextTokenTopK:
        """Top-k and logsumexp of ``head(hidden)`` one block of rows at a time; with ``full``
        (the ordinary logits) each block is also compared with its rows (AssertionError)."""
        assert self.top_k is not None
        B, S, d = hidden.shape
        h = hidden.reshape(B * S, d)
        V = _out_features(head, h)
        k = min(self.top_k, V)
        vals, idxs, lses = [], [], []
        elements = self.block_elements or block_elements(h.device, HEAD_BLOCK_ELEMENTS)
        for a, b in row_blocks(B * S, V, elements):
            logits = head(h[a:b])
            if full is not None and not torch.equal(logits, full.reshape(B * S, -1)[a:b]):
                raise _MismatchError
            tk = next_token_topk_of(self._cast(logits), self.top_k)
            vals.append(tk.values)
            idxs.append(tk.indices)
            lses.append(tk.logsumexp)
        return NextTokenTopK(
            torch.cat(vals).view(B, S, k),
            torch.cat(idxs).view(B, S, k),
            torch.cat(lses).view(B, S),
            V,
        )

    def _checked(
        self, tokens: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None, NextTokenTopK | DeferredNextTokenTopK | None]:
        """The first batch: on its first sequences (a bounded transient), the ordinary forward
        and the split one compared bit for bit; then the batch by whichever route won."""
        assert self.top_k is not None or not self.next_token
        B, S = int(tokens.shape[0]), max(int(tokens.shape[1]), 1)
        assert self._split is not None
        V = _vocab_hint(self._split[1])
        n_seq = 1 if V is None else max(1, min(B, CHECK_LOGIT_ELEMENTS // (S * max(V, 1))))
        probe = tokens[:n_seq]
        with self.capture() as cap:
            out = self.model(probe, **self._model_kwargs)
        captured = dict(cap)
        full = logits_of(out) if self.next_token else None
        topk = (
            next_token_topk_of(self._cast(full), self.top_k)
            if full is not None and self.top_k
            else None
        )
        try:
            split = self._split_forward(probe, full)
            self.split_ok = _same_capture(captured, split[0]) and _same_topk(topk, split[2])
        except _MismatchError:
            self.split_ok = False
        del out, full, captured
        return self._split_forward(tokens) if self.split_ok else self._ordinary(tokens)


class _MismatchError(Exception):
    """A block of the split forward differs from the ordinary one (internal)."""


def _vocab_hint(head: nn.Module) -> int | None:
    """The head's output size from its ``out_features`` or weight, without running it."""
    n = getattr(head, "out_features", None)
    if isinstance(n, int):
        return n
    w = getattr(head, "weight", None)
    if isinstance(w, Tensor) and w.ndim == 2:
        return int(w.shape[0])
    return None


def _out_features(head: nn.Module, h: Tensor) -> int:
    """The vocabulary size (``_vocab_hint``, else one row through the head)."""
    n = _vocab_hint(head)
    return n if n is not None else int(head(h[:1]).shape[-1])


def _same_capture(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_topk(a: NextTokenTopK | None, b: NextTokenTopK | DeferredNextTokenTopK | None) -> bool:
    # the probe is never deferred: _split_forward computes at once when given full logits
    assert not isinstance(b, DeferredNextTokenTopK)
    if a is None or b is None:
        return a is None and b is None
    return (
        a.vocab_size == b.vocab_size
        and torch.equal(a.values, b.values)
        and torch.equal(a.indices, b.indices)
        and torch.equal(a.logsumexp, b.logsumexp)
    )
