"""Does a component fire on a window run alone? Batched, cached by window, all components at once.

The trial builders ask ``fires(key, tokens)`` for every shown positive, every negative
candidate and every widened window. Asked one window per forward, that is most of a suite's
build time. ``FiringChecker`` answers the same question from batched forwards:

- one forward serves every component: a window's firings of *all* sites and components are
  kept (as the flat indices where they fire), keyed by the window's token tuple;
- windows waiting for a check are grouped by length and run ``batch_size`` at a time (equal
  lengths, so no padding: the answer is the same for causal and non-causal decompositions,
  e.g. SPD runs whose ``extra["ci_causal"]`` is false);
- a decomposition whose activations depend on the batch (``extra["batch_dependent"]``,
  BatchTopK's ``top_k * N`` over the tokens encoded together) is run one window per forward,
  as the window-alone question asks;
- ``prefetch(windows)`` lets a builder announce windows it will ask about, so they share
  forwards; under ``speculating()`` a miss is queued instead of run and answered "fires
  nowhere" for now, which lets a caller run its whole (deterministic) build once to learn
  which windows it needs, ``flush()`` them in batches, and run it again until a run needs
  nothing new: that run's answers all came from real forwards, so its result is exactly the
  one-window-at-a-time result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from spd_host.adapter import parse_component_key

Window = tuple[int, ...]
T = TypeVar("T")
SPECULATIVE_PASSES = 3
"""Speculative runs before a plain one: most windows show up in the first, the rest in a
few more, while every run costs the draws' own CPU time again."""


class FiringChecker:
    """``(key, tokens) -> per-token firing of key`` with the window run alone (see module doc)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], Any],
        device: torch.device | str,
        *,
        batch_size: int = 32,
        batch_dependent: bool = False,
    ) -> None:
        self._fn = fn
        self._device = device
        self._batch = 1 if batch_dependent else max(1, int(batch_size))
        # window -> site -> flat (position * C + component) indices where it fires, and C
        self._cache: dict[Window, dict[str, tuple[torch.Tensor, int]]] = {}
        self._pending: dict[Window, None] = {}  # insertion-ordered set
        self._speculating = False
        self.misses = 0  # windows answered by a guess while speculating
        self.forwards = 0
        self.windows_run = 0

    # -- the question ----------------------------------------------------------------------
    def __call__(self, key: str, tokens: Sequence[int]) -> list[bool]:
        t = tuple(int(x) for x in tokens)
        if t not in self._cache:
            if self._speculating:
                self._pending[t] = None
                self.misses += 1
                return [False] * len(t)
            self._pending[t] = None
            self.flush()
        site, idx = parse_component_key(key)
        flat, n_comp = self._cache[t][site]
        out = [False] * len(t)
        for pos in (flat[flat % n_comp == idx] // n_comp).tolist():
            out[pos] = True
        return out

    def prefetch(self, windows: Iterable[Sequence[int]]) -> None:
        """Queue windows that will be asked about; run them now unless speculating."""
        for w in windows:
            t = tuple(int(x) for x in w)
            if t not in self._cache:
                self._pending[t] = None
        if not self._speculating:
            self.flush()

    @contextlib.contextmanager
    def speculating(self) -> Iterator[None]:
        """Within: a miss is queued and answered all-False (see the module docstring)."""
        before, self._speculating, self.misses = self._speculating, True, 0
        try:
            yield
        finally:
            self._speculating = before

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- the forwards ------------------------------------------------------------------------
    def flush(self) -> None:
        """Run every queued window: equal lengths together, ``batch_size`` per forward."""
        by_len: dict[int, list[Window]] = {}
        for w in self._pending:
            by_len.setdefault(len(w), []).append(w)
        self._pending = {}
        for group in by_len.values():
            for i in range(0, len(group), self._batch):
                self._run(group[i : i + self._batch])

    def _run(self, windows: list[Window]) -> None:
        if not windows[0]:
            for w in windows:
                self._cache[w] = _EmptyFirings()
            return
        with torch.no_grad():
            batch = self._fn(torch.tensor(windows, dtype=torch.long, device=self._device))
        self.forwards += 1
        self.windows_run += len(windows)
        per_site = {s: f.to("cpu", torch.bool) for s, f in batch.firings.items()}
        for row, w in enumerate(windows):
            self._cache[w] = {
                s: (torch.nonzero(f[row].flatten()).flatten(), int(f.shape[-1]))
                for s, f in per_site.items()
            }


class _EmptyFirings(dict):  # type: ignore[type-arg]
    """The firings of an empty window: nothing, at every site."""

    def __missing__(self, site: str) -> tuple[torch.Tensor, int]:
        return torch.zeros(0, dtype=torch.long), 1


def exactly(fires: Any, build: Callable[[], T], passes: int = SPECULATIVE_PASSES) -> T:
    """``build()`` (deterministic given the firing answers) with its checks batched.

    With a ``FiringChecker``: run ``build`` speculating, run the windows it asked about in
    batches, and again, until a run asks about nothing new (its answers all came from real
    forwards, so its result is the one-window-at-a-time result); after ``passes`` runs, one
    last plain run. Any other ``fires`` function: ``build()``.
    """
    if isinstance(fires, FiringChecker):
        for _ in range(passes):
            with fires.speculating():
                out = build()
            if fires.misses == 0:
                return out
            fires.flush()
    return build()
