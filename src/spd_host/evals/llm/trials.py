"""Building judge trials from a harvest: which examples, which negatives, which highlights.

Rules that make the scores mean what they say:

- intruder: 4 real examples of the target + 1 example of another component whose firing
  density is within a relative tolerance of the target's, and which, as shown, does not make
  the target fire (checked by running the method's HarvestFn on the shown window);
- detection: activating examples of the target drawn by population quantile, and negatives
  that truly do not fire the target (same HarvestFn check); see ``populations`` for the
  named options (``positives``, ``negatives``, ``window``);
- fuzzing: activating examples drawn the same way; some marked at their real firings, the
  others at as many random positions where the target does *not* fire;
- every detection/fuzzing item carries its ``ExampleOrigin`` in ``Trial.extras["examples"]``
  (in the order shown), including whether its window alone reproduces the firing;
- windows are cut around their recorded firing centre (``ActivationExample.centre``), never
  at ``len // 2``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from spd_host.evals.llm.populations import (
    Drawn,
    ExampleOrigin,
    PopulationOptions,
    SequenceFn,
    cut_at,
    draw_negatives,
    draw_positives,
)

Kind = Literal["intruder", "detection", "fuzzing"]
FiresFn = Callable[[str, Sequence[int]], list[bool]]  # (key, tokens) -> per-token firing of key


@dataclass(frozen=True)
class Shown:
    """One example as the judge sees it."""

    tokens: tuple[int, ...]
    marks: tuple[bool, ...]


@dataclass
class Trial:
    trial_id: str
    key: str
    kind: Kind
    items: list[Shown]
    truth: frozenset[int]  # 1-based indices of the "positive" items
    label: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def cut(ex: Any, max_tokens: int) -> Shown:
    """The example's window, at most ``max_tokens`` long, around its recorded firing centre."""
    return cut_at(ex, max_tokens)[0]


def unmarked(s: Shown) -> Shown:
    return Shown(s.tokens, tuple(False for _ in s.tokens))


def spread(examples: Sequence[Any], n: int, rng: random.Random, act_type: str) -> list[Any]:
    """``n`` examples, one from each of ``n`` equal bins of increasing peak activation."""
    ranked = sorted(examples, key=lambda e: max(e.activations[act_type], default=0.0))
    if len(ranked) <= n:
        return list(ranked)
    return [rng.choice(ranked[i * len(ranked) // n : (i + 1) * len(ranked) // n]) for i in range(n)]


@dataclass
class Pool:
    """What trial builders need from the harvest: examples and densities per component.

    ``load_examples(key)`` is called lazily (and cached): only the components a trial touches
    are read from the harvest.
    """

    density: dict[str, float]
    site: dict[str, str]
    fires: FiresFn
    act_type: str
    load_examples: Callable[[str], list[Any]]
    max_tokens: int = 64
    populations: PopulationOptions = field(default_factory=PopulationOptions)
    sequence: SequenceFn | None = None
    """position -> its harvest sequence (for ``window="widen"``); None when not on record."""
    _cache: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def examples(self) -> _Examples:
        return _Examples(self)

    def positives(self, key: str, n: int, rng: random.Random, visible: Any = "any") -> list[Drawn]:
        """``populations.draw_positives`` with this pool's options."""
        return draw_positives(self, key, n, rng, visible=visible)

    def negatives(self, key: str, n: int, rng: random.Random) -> list[Drawn]:
        """``populations.draw_negatives`` with this pool's options."""
        return draw_negatives(self, key, n, rng)

    def others(self, key: str) -> list[str]:
        return [k for k, d in self.density.items() if k != key and d > 0]

    def negative(self, key: str, candidates: Sequence[str], rng: random.Random) -> Shown | None:
        """A window from one of ``candidates`` on which ``key`` does not fire anywhere."""
        for _ in range(40):
            if not candidates:
                return None
            other = rng.choice(list(candidates))
            pool = self.examples[other]
            if not pool:
                continue
            shown = cut(rng.choice(pool), self.max_tokens)
            if not any(self.fires(key, shown.tokens)):
                return shown
        return None


class _Examples:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    def __getitem__(self, key: str) -> list[Any]:
        cache = self._pool._cache
        if key not in cache:
            cache[key] = list(self._pool.load_examples(key))
        return cache[key]


def intruder_trial(
    pool: Pool, key: str, idx: int, rng: random.Random, *, n_real: int, tolerance: float
) -> Trial | str:
    """A trial, or the reason none can be built."""
    reals = pool.examples[key]
    if len(reals) < n_real:
        return f"fewer than {n_real} examples"
    d = pool.density[key]
    similar = [k for k in pool.others(key) if abs(pool.density[k] - d) <= tolerance * d]
    same_site = [k for k in similar if pool.site[k] == pool.site[key]]
    intruder = pool.negative(key, same_site, rng) or pool.negative(key, similar, rng)
    if intruder is None:
        return (
            f"no component within {tolerance:.0%} of its density has a window it does not fire on"
        )
    shown = [cut(e, pool.max_tokens) for e in rng.sample(reals, n_real)]
    pos = rng.randint(0, n_real)
    shown.insert(pos, intruder)
    return Trial(f"intruder:{key}:{idx}", key, "intruder", shown, frozenset({pos + 1}))


def detection_trial(
    pool: Pool, key: str, idx: int, rng: random.Random, *, n_pos: int, n_neg: int, label: str
) -> Trial | str:
    if len(pool.examples[key]) < 1:
        return "no examples"
    pos = pool.positives(key, n_pos, rng, visible="any")
    neg = pool.negatives(key, n_neg, rng)
    if not neg:
        return "no window found on which it does not fire"
    items = [(Drawn(unmarked(d.shown), d.origin), True) for d in pos] + [(d, False) for d in neg]
    rng.shuffle(items)
    truth = frozenset(i + 1 for i, (_, p) in enumerate(items) if p)
    return Trial(
        f"detection:{key}:{idx}",
        key,
        "detection",
        [d.shown for d, _ in items],
        truth,
        label,
        extras={"examples": _numbered([d.origin for d, _ in items])},
    )


def _numbered(origins: list[ExampleOrigin]) -> list[ExampleOrigin]:
    return [o.model_copy(update={"item": i}) for i, o in enumerate(origins, 1)]


def fuzzing_trial(
    pool: Pool, key: str, idx: int, rng: random.Random, *, n_examples: int, label: str
) -> Trial | str:
    drawn = pool.positives(key, n_examples, rng, visible="centre")
    chosen = [d.shown for d in drawn]
    if len(chosen) < 2:
        return "fewer than 2 examples"
    items: list[tuple[Shown, bool]] = []
    origins: list[ExampleOrigin] = []
    n_correct = len(chosen) // 2
    order = list(range(len(chosen)))
    rng.shuffle(order)
    correct = set(order[:n_correct])
    for i, shown in enumerate(chosen):
        if i in correct:
            items.append((shown, True))
            origins.append(drawn[i].origin)
            continue
        # never mark a real firing: neither a recorded one nor one in the window as shown
        real = pool.fires(key, shown.tokens)
        free = [j for j, (f, m) in enumerate(zip(real, shown.marks, strict=True)) if not (f or m)]
        k = min(max(1, sum(shown.marks)), len(free))
        if k == 0:
            continue
        picked = set(rng.sample(free, k))
        items.append(
            (Shown(shown.tokens, tuple(j in picked for j in range(len(shown.tokens)))), False)
        )
        origins.append(drawn[i].origin.model_copy(update={"role": "negative"}))
    if not any(not ok for _, ok in items):
        return "no example has a token it does not fire on"
    order = list(range(len(items)))
    rng.shuffle(order)
    items, origins = [items[j] for j in order], [origins[j] for j in order]
    truth = frozenset(i + 1 for i, (_, ok) in enumerate(items) if ok)
    return Trial(
        f"fuzzing:{key}:{idx}",
        key,
        "fuzzing",
        [s for s, _ in items],
        truth,
        label,
        extras={"examples": _numbered(origins)},
    )
